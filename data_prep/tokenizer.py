"""Load the model's tokenizer (or the tiny packaged one) and fingerprint it for lineage checks."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nemotune.data_prep.formats import DataPrepError

TINY_TOKENIZER_NAME = "nemotune/tiny"


def tiny_tokenizer_dir() -> Path:
    """Directory of the tiny byte-level BPE tokenizer shipped with the package (see make_tiny_tokenizer.py)."""
    return Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


def resolve_tokenizer_path(name_or_path: str) -> str:
    """`nemotune/tiny` -> the packaged directory; anything else is passed to from_pretrained unchanged."""
    return str(tiny_tokenizer_dir()) if str(name_or_path) == TINY_TOKENIZER_NAME else str(name_or_path)


class TokenizerError(DataPrepError, FileNotFoundError):
    """A tokenizer that cannot be found or loaded, stated with its config key and how to get it."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub (HF_ENDPOINT): no retries, so an air-gapped node learns in seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def offline_reason() -> str | None:
    """Why the hub cannot be used now (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, or unreachable), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name}=1"
    if not hub_reachable():
        return f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable"
    return None


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, ./ ../ ~, more than one slash, or existing."""
    name = str(name)
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).expanduser().exists())


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download_hint(repo_id: str, key: str, *, what: str = "tokenizer", repo_type: str = "model") -> str:
    """What to run on a machine with network, where the files go, and which key to set."""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    files = " --include 'tokenizer*' 'special_tokens_map.json'" if what == "tokenizer" else ""
    local = repo_id.rsplit("/", 1)[-1]
    return (f"fix: on a machine with network run `hf download {repo_id}{kind}{files} --local-dir {local}`, copy "
            f"{local}/ here and set {key}={local} (or download into this machine's cache {hf_cache_dir()} "
            f"with the same HF_HOME and keep HF_HUB_OFFLINE=1)")


def tokenizer_problem(name_or_path: str, key: str = "model.tokenizer") -> str | None:
    """Why `name_or_path` cannot give a tokenizer without network, as one line with the fix; None when it can
    (a packaged name, an existing local dir, a hub id in the local cache, or a reachable hub)."""
    name = str(name_or_path)
    if name == TINY_TOKENIZER_NAME:
        return None
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            return (f"{key}={name}: no such directory; point {key} at a directory holding tokenizer.json + "
                    f"tokenizer_config.json (e.g. the model's HF dir), or use {TINY_TOKENIZER_NAME}")
        if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                       "tokenizer.model")):
            return (f"{key}={name}: holds no tokenizer files (tokenizer.json, tokenizer_config.json); point {key} "
                    f"at the model's HF dir")
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "tokenizer_config.json")
    if isinstance(cached, str):
        return None
    reason = offline_reason()
    if reason is None:
        return None
    return (f"{key}={name}: hub tokenizer not in the local cache and {reason} (no local directory "
            f"{Path(name).resolve()} either); {download_hint(name, key)}")


def load_tokenizer(name_or_path: str, key: str = "model.tokenizer"):
    """An HF tokenizer via `AutoTokenizer.from_pretrained`; `nemotune/tiny` loads the packaged tiny tokenizer.

    A hub id is loaded from the local cache first (`local_files_only`); the network is tried only when the hub
    is online and reachable, so an offline node fails at once with the download command instead of retrying.
    Every failure is a TokenizerError naming `key` and the fix."""
    from transformers import AutoTokenizer

    problem = tokenizer_problem(name_or_path, key)
    if problem:
        raise TokenizerError(problem)
    path = resolve_tokenizer_path(name_or_path)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError:
            if looks_like_path(str(name_or_path)) or str(name_or_path) == TINY_TOKENIZER_NAME:
                raise
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(
            f"{key}={name_or_path}: cannot load the tokenizer ({first}); point {key} at a local directory "
            f"holding tokenizer.json + tokenizer_config.json, or use {TINY_TOKENIZER_NAME!r}") from exc
    tokenizer.nemotune_name = str(name_or_path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise TokenizerError(f"{key}={name_or_path}: the tokenizer has no chat_template; data_prep formats "
                             f"examples with the model's own chat template (tokenizer_config.json)")
    return tokenizer


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """Identity of a tokenizer: name, sha256 of its tokenizer.json bytes and of its chat template, vocab size.

    The tokenizer.json hash is taken from the file in the tokenizer's directory when there is one (the bytes
    users can check with sha256sum), otherwise from the serialized backend tokenizer.
    """
    name = getattr(tokenizer, "nemotune_name", None) or getattr(tokenizer, "name_or_path", "")
    tokenizer_json = Path(str(getattr(tokenizer, "name_or_path", ""))) / "tokenizer.json"
    if tokenizer_json.is_file():
        json_sha, json_source = _sha256(tokenizer_json.read_bytes()), "file"
    else:
        json_sha, json_source = _sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")), "serialized"
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: hash them all, in a stable order
        template = "\n".join(f"{key}\n{template[key]}" for key in sorted(template))
    return {
        "name": str(name),
        "tokenizer_json_sha256": json_sha,
        "tokenizer_json_source": json_source,
        "chat_template_sha256": _sha256((template or "").encode("utf-8")),
        "vocab_size": len(tokenizer),
    }


def same_tokenizer(a: dict, b: dict) -> bool:
    """True when two fingerprints describe the same tokenizer (names may differ: a copy in another dir)."""
    keys = ("tokenizer_json_sha256", "chat_template_sha256", "vocab_size")
    return all(a.get(key) == b.get(key) for key in keys)
