"""Load the model's tokenizer (or the tiny packaged one) and fingerprint it for lineage checks.

Which tokenizer a model uses (`model_tokenizer`): `model.tokenizer` when the user names one; otherwise the
model's own, i.e. the tokenizer files in `model.hf_path` when that directory holds them, else the one its
config names (`model.hub_id`). Loading never waits on an unreachable hub: offline (HF_HUB_OFFLINE, or the
hub endpoint refuses a connection) it reads only local files and says at once what to download.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

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


def hub_offline() -> bool:
    """True when the Hugging Face hub must not or cannot be reached: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is
    set, or a connection to the hub endpoint fails (checked once, in milliseconds when there is no network)."""
    flags = ("1", "ON", "YES", "TRUE")
    if any(os.environ.get(name, "").upper() in flags for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=3).close()
    except OSError:
        return True
    return False


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def load_tokenizer(name_or_path: str, key: str | None = None):
    """An HF tokenizer via `AutoTokenizer.from_pretrained`; `nemotune/tiny` loads the packaged tiny tokenizer.

    `key` is the config key that named it, when known (the error messages name it). A local directory is
    read with local_files_only; a hub id is fetched only when the hub is reachable, else read from the local cache or
    refused at once with the download command. Every failure is one TokenizerError line.
    """
    from transformers import AutoTokenizer

    name = str(name_or_path)
    path = resolve_tokenizer_path(name)
    local = Path(path).is_dir()
    # the key to set in a fix: the model's own directory when its hub id was the fallback
    fix_key = {"model.hub_id": "model.hf_path", None: "model.tokenizer"}.get(key, key)
    named = f"{key}={name}" if key else f"tokenizer {name}"
    if not local and not _looks_like_hub_id(name):
        raise TokenizerError(f"{named}: no such tokenizer directory; set {fix_key} to a directory holding "
                             f"tokenizer.json + tokenizer_config.json")
    offline = not local and hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local or offline)
    except Exception as exc:  # OSError, ValueError, HF hub errors: all become one line with the fix
        if offline:
            raise TokenizerError(
                f"{named}: not a local directory, the Hugging Face hub is unreachable (offline) and {name} "
                f"is not in its local cache; download it where there is network with "
                f"`huggingface-cli download {name} --local-dir DIR` and set {fix_key}=DIR") from exc
        reason = " ".join(str(exc).split())[:300]
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
