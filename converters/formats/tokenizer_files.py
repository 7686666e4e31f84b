"""The tokenizer files and chat template that travel with every export.

A model is served with the template that trained it only if that template is in what is shipped: every export
(the training checkpoint's ``adapter/``, HF PEFT, merged HF, full HF, the ``.nemo`` files) carries the tokenizer
files and ``chat_template.jinja`` (the file transformers 5 writes and reads; older tokenizer dirs keep the template
as ``chat_template`` in ``tokenizer_config.json``, from which it is written out here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# what `PreTrainedTokenizer.save_pretrained` may write (fast and slow tokenizers, sentencepiece, BPE files)
TOKENIZER_FILE_NAMES = ("tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                        "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", CHAT_TEMPLATE_FILE,
                        "chat_template.json")


class TokenizerFilesError(ValueError):
    """A tokenizer source holds no tokenizer files; the message names it and the fix."""


def tokenizer_files(src_dir: Path | str | None) -> list[Path]:
    """The tokenizer files present in ``src_dir`` (none when it is not a directory)."""
    if src_dir is None or not Path(src_dir).is_dir():
        return []
    return [Path(src_dir) / name for name in TOKENIZER_FILE_NAMES if (Path(src_dir) / name).is_file()]


def has_tokenizer(src_dir: Path | str | None) -> bool:
    return any(p.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
               for p in tokenizer_files(src_dir))


def chat_template_of(src_dir: Path | str) -> Optional[str]:
    """The chat template a tokenizer dir holds: ``chat_template.jinja``, else tokenizer_config.json's string."""
    src_dir = Path(src_dir)
    if (src_dir / CHAT_TEMPLATE_FILE).is_file():
        return (src_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (src_dir / TOKENIZER_CONFIG).is_file():
        try:
            template = json.loads((src_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
        return template if isinstance(template, str) else None
    return None


def write_tokenizer(dst_dir: Path, tokenizer: Any, *, what: str = "--tokenizer") -> Optional[str]:
    """Write ``tokenizer`` (an object with ``save_pretrained`` or a dir of tokenizer files) into ``dst_dir``,
    with ``chat_template.jinja``; returns the chat template (None if the tokenizer has none).

    Files already in ``dst_dir`` with the same names are replaced (callers write into their own temporary dir).
    """
    dst_dir = Path(dst_dir)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(dst_dir))
    else:
        files = tokenizer_files(tokenizer)
        if not has_tokenizer(tokenizer):
            raise TokenizerFilesError(f"{what} {tokenizer}: no tokenizer files there (tokenizer.json or "
                                      f"tokenizer.model); pass the dir the model's tokenizer was saved to")
        for path in files:
            shutil.copy2(path, dst_dir / path.name)
    return ensure_chat_template(dst_dir)


def ensure_chat_template(tokenizer_dir: Path) -> Optional[str]:
    """Write ``chat_template.jinja`` from tokenizer_config.json's template when only that holds it; returns the
    dir's chat template (None when it has none)."""
    template = chat_template_of(tokenizer_dir)
    if template is not None and not (Path(tokenizer_dir) / CHAT_TEMPLATE_FILE).is_file():
        (Path(tokenizer_dir) / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    return template


def special_token_ids(tokenizer_dir: Path | str) -> dict[str, int]:
    """{"bos" | "eos" | "pad": id} of the special tokens tokenizer_config.json names, resolved through
    tokenizer.json's added tokens (what generation_config.json needs: a chat model stops at its end of turn)."""
    tokenizer_dir = Path(tokenizer_dir)
    try:
        config = json.loads((tokenizer_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        added = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError):
        return {}
    by_content = {token.get("content"): token.get("id") for token in added if isinstance(token, dict)}
    ids = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(by_content.get(token), int):
            ids[role] = by_content[token]
    return ids


def llama3_chat_prompt_tokens(template: Optional[str]) -> Optional[dict]:
    """NeMo's ``data.chat_prompt_tokens`` for a Llama-3-style template (header / eot special tokens), else None.

    NeMo renders a turn as ``{turn_start}{name}{end_of_name}{text}{end_of_turn}`` (NeMo-Aligner
    examples/nlp/gpt/conf/gpt_sft.yaml, ``model.data.chat_prompt_tokens``); the Llama-3 template is the same shape
    with these tokens. The Jinja template itself is authoritative and is stored beside (``tokenizer.chat_template``).
    """
    if not template or "<|start_header_id|>" not in template or "<|eot_id|>" not in template:
        return None
    return {"system_turn_start": "<|begin_of_text|><|start_header_id|>", "turn_start": "<|start_header_id|>",
            "label_start": "<|start_header_id|>", "end_of_turn": "<|eot_id|>", "end_of_name": "<|end_header_id|>\n\n"}
