"""Load the model's tokenizer (or the tiny packaged one) and fingerprint it for lineage checks.

Which tokenizer a model uses (`model_tokenizer`): `model.tokenizer` when the user names one; otherwise the
model's own, i.e. the tokenizer files in `model.hf_path` when that directory holds them, else the one its
config names (`model.hub_id`). Loading never waits on an unreachable hub: offline (HF_HUB_OFFLINE, or the
hub endpoint refuses a connection) it reads only local files and says at once what to download.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nemotune.data_prep.formats import DataPrepError

TINY_TOKENIZER_NAME = "nemotune/tiny"
# Files that make a directory a tokenizer directory (a fast tokenizer or a SentencePiece model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerError(DataPrepError, ValueError):
    """A tokenizer that cannot be loaded or does not fit: one line naming the key and the fix."""


def has_tokenizer_files(path) -> bool:
    directory = Path(str(path))
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def model_tokenizer(model) -> tuple[str, str]:
    """(name or path, the config key that chose it) of the tokenizer a `model` config node uses."""
    def get(key):
        return model.get(key) if hasattr(model, "get") else getattr(model, key, None)

    if get("tokenizer"):
        return str(get("tokenizer")), "model.tokenizer"
    if get("hf_path") and has_tokenizer_files(get("hf_path")):
        return str(get("hf_path")), "model.hf_path"
    if get("hub_id"):
        return str(get("hub_id")), "model.hub_id"
    where = f"model.hf_path={get('hf_path')} holds no {' or '.join(TOKENIZER_FILES)}" if get("hf_path") \
        else "model.hf_path is not set"
    raise TokenizerError(f"model.tokenizer: not set, {where} and model.hub_id is not set; set model.tokenizer="
                         f"<tokenizer dir or hub id> (or model.hf_path=<model dir with its tokenizer files>)")


def tiny_tokenizer_dir() -> Path:
    """Directory of the tiny byte-level BPE tokenizer shipped with the package (see make_tiny_tokenizer.py)."""
    return Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


def resolve_tokenizer_path(name_or_path: str) -> str:
    """`nemotune/tiny` -> the packaged directory; anything else is passed to from_pretrained unchanged."""
    return str(tiny_tokenizer_dir()) if str(name_or_path) == TINY_TOKENIZER_NAME else str(name_or_path)


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


def fix_key_for(key: str | None) -> str:
    """The key to set in a fix: the model's own directory when its hub id was the fallback."""
    return {"model.hub_id": "model.hf_path", None: "model.tokenizer"}.get(key, key)


def tokenizer_problem(name_or_path: str, key: str | None = "model.tokenizer") -> str | None:
    """Why `name_or_path` cannot give a tokenizer without network, as one line naming `key` and the fix; None
    when it can (the packaged name, a local tokenizer dir, a hub id in the local cache, or a reachable hub)."""
    name = str(name_or_path)
    if name == TINY_TOKENIZER_NAME:
        return None
    named, fix_key = (f"{key}={name}" if key else f"tokenizer {name}"), fix_key_for(key)
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            return (f"{named}: no such tokenizer directory; point {fix_key} at a directory holding tokenizer.json + "
                    f"tokenizer_config.json (e.g. the model's HF dir), or use {TINY_TOKENIZER_NAME}")
        if not has_tokenizer_files(path) and not (path / "tokenizer_config.json").is_file():
            return (f"{named}: holds no tokenizer files (tokenizer.json, tokenizer_config.json); point {fix_key} "
                    f"at the model's HF dir")
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
        return None
    reason = offline_reason()
    if reason is None:
        return None
    return (f"{named}: not a local directory, hub tokenizer not in the local cache and {reason}; "
            f"{download_hint(name, fix_key)}")


def load_tokenizer(name_or_path: str, key: str | None = None):
    """An HF tokenizer via `AutoTokenizer.from_pretrained`; `nemotune/tiny` loads the packaged tiny tokenizer.

    `key` is the config key that named it, when known (the error messages name it). A hub id is read from the
    local cache first (`local_files_only`); the network is tried only when the hub is online and reachable, so
    an offline node fails at once with the download command. Every failure is one TokenizerError line.
    """
    from transformers import AutoTokenizer

    name = str(name_or_path)
    problem = tokenizer_problem(name, key)
    if problem:
        raise TokenizerError(problem)
    named, fix_key = (f"{key}={name}" if key else f"tokenizer {name}"), fix_key_for(key)
    path = resolve_tokenizer_path(name)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError:
            if looks_like_path(name) or name == TINY_TOKENIZER_NAME:
                raise
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError, HF hub errors: all become one line with the fix
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise TokenizerError(f"{named}: cannot load the tokenizer ({type(exc).__name__}: {reason}); set "
                             f"{fix_key} to a local directory holding tokenizer.json + tokenizer_config.json, or "
                             f"{TINY_TOKENIZER_NAME!r} for the packaged tiny tokenizer") from exc
    tokenizer.nemotune_name = name
    if getattr(tokenizer, "chat_template", None) is None:
        raise TokenizerError(f"{named}: the tokenizer has no chat_template; data_prep formats examples with "
                             f"the model's own chat template (use the instruct/chat model's tokenizer)")
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
