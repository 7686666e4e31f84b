"""Build the tiny tokenizer shipped in data_prep/assets/tiny_tokenizer (loads with AutoTokenizer, offline).

A byte-level BPE with exactly 1024 entries, trained with `tokenizers` on the bundled FiQA sample, using the
Llama 3 pre-tokenizer regex, Llama 3 special tokens and a Llama 3.1-style chat template. Tests and the demo use
it in place of the 128k-entry Llama/Nemotron tokenizer, which cannot be downloaded here; everything in
data_prep goes through the same `AutoTokenizer` / `apply_chat_template` code path either way.

    python -m nemotune.data_prep.make_tiny_tokenizer            # rewrites the package's files (byte-identical)
    python -m nemotune.data_prep.make_tiny_tokenizer --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nemotune.data_prep.make_sample import SAMPLE_DIR

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
VOCAB_SIZE = 1024
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT, PAD]
# The pre-tokenizer split of Llama 3 (tiktoken cl100k-style pattern).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Llama 3.1 layout: <|begin_of_text|>, then per message a role header, the trimmed content and <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)


def _training_text(sample_dir: Path):
    for split in ("train", "validation", "test"):
        for line in (sample_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            yield row["question"]
            yield from row["ground_truths"]


def build(sample_dir: Path = SAMPLE_DIR) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(sample_dir), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tokenizer.get_vocab_size()} entries, expected {VOCAB_SIZE}")
    # Like Llama 3: encode() prepends <|begin_of_text|>; chat templates add it themselves and are encoded
    # without special tokens.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tokenizer.token_to_id(BOS))]),
    ])
    return tokenizer


def write(out_dir: Path = TOKENIZER_DIR, sample_dir: Path = SAMPLE_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build(sample_dir)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(tok)): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOT, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--sample-dir", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args(argv)
    out = write(args.out, args.sample_dir)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>8} bytes  {path}")


if __name__ == "__main__":
    main()
