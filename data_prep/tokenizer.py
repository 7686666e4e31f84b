"""Load the model's tokenizer (or the tiny packaged one) and fingerprint it for lineage checks."""
from __future__ import annotations

import hashlib
from pathlib import Path

TINY_TOKENIZER_NAME = "nemotune/tiny"


def tiny_tokenizer_dir() -> Path:
    """Directory of the tiny byte-level BPE tokenizer shipped with the package (see make_tiny_tokenizer.py)."""
    return Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


def resolve_tokenizer_path(name_or_path: str) -> str:
    """`nemotune/tiny` -> the packaged directory; anything else is passed to from_pretrained unchanged."""
    return str(tiny_tokenizer_dir()) if str(name_or_path) == TINY_TOKENIZER_NAME else str(name_or_path)


def load_tokenizer(name_or_path: str):
    """An HF tokenizer via `AutoTokenizer.from_pretrained`; `nemotune/tiny` loads the packaged tiny tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(name_or_path))
    except OSError as exc:
        raise OSError(
            f"cannot load tokenizer {name_or_path!r}: {exc}\n"
            f"fix: point model.tokenizer at a local directory holding tokenizer.json + tokenizer_config.json "
            f"(no downloads happen offline), or use {TINY_TOKENIZER_NAME!r} for the packaged tiny tokenizer"
        ) from exc
    tokenizer.nemotune_name = str(name_or_path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no chat_template; data_prep formats examples with the "
                         f"model's own chat template")
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
