"""Packing vs padding every example to the longest in its batch: real tokens per step and padding waste.

Data: the real FiQA test rows beside the checkout (../shared/data/fiqa/test.jsonl, when present) and the bundled
FiQA-schema sample, chat-templated (system + question + answer, as data_prep does) with --tokenizer: the packaged
tiny one by default, or a real one, e.g. the Llama-3.1 tokenizer beside the checkout (128,256 tokens):

    python bench/packing.py --tokenizer ../shared/data/llama3_tokenizer

Token lengths, and so packing figures, depend on the tokenizer: quote them with its name.
A step processes `pack_size` token slots in both cases: one packed sequence (micro batch 1), or a batch of
B examples padded to the longest of them, with B = the packing factor (same examples per step on average).

    python bench/packing.py [--pack-sizes 2048 4096 8192] [--tokenizer nemotune/tiny]
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_FIQA = REPO.parent / "shared" / "data" / "fiqa" / "test.jsonl"


def datasets_to_bench() -> dict[str, list[tuple[str, str]]]:
    from nemotune.data_prep.make_sample import SAMPLE_DIR

    sets = {}
    if SHARED_FIQA.is_file():
        rows = [json.loads(l) for l in SHARED_FIQA.read_text(encoding="utf-8").splitlines() if l.strip()]
        sets["fiqa_real_test"] = [(r["question"], r["answer"]) for r in rows]
    else:
        print(f"note: {SHARED_FIQA} absent; benchmarking the bundled sample only")
    sample = []
    for split in ("train", "validation", "test"):
        for line in (SAMPLE_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            sample.append((row["question"], row["ground_truths"][0]))
    sets["fiqa_sample"] = sample
    return sets


def token_lengths(pairs, tokenizer, max_len: int) -> list[int]:
    from nemotune.data_prep import templating
    from nemotune.data_prep.config import FIQA_SYSTEM_PROMPT

    lengths = []
    for question, answer in pairs:
        messages = [{"role": "system", "content": FIQA_SYSTEM_PROMPT}, {"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        encoded = templating.encode(tokenizer, messages, max_len)
        if encoded.status == templating.OK:
            lengths.append(len(encoded.input_ids))
    return lengths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack-sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tokenizer", default="nemotune/tiny")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    from nemotune.data_prep import packing
    from nemotune.data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, key="--tokenizer")
    print(f"tokenizer: {args.tokenizer} ({len(tokenizer):,} tokens)")
    print(f"command: python {shlex.join(['bench/packing.py', *(argv if argv is not None else sys.argv[1:])])}")
    header = (f"{'dataset':<15} {'pack':>5} {'ex':>4} {'drop':>4} {'packs':>5} {'factor':>6} {'pack eff':>8} "
              f"{'B':>3} {'pad eff':>8} {'real tok/step packed':>20} {'padded':>8} {'speed-up':>8} {'FFD s':>6}")
    print(header)
    print("-" * len(header))
    for name, pairs in datasets_to_bench().items():
        for pack_size in args.pack_sizes:
            lengths = token_lengths(pairs, tokenizer, pack_size)
            start = time.perf_counter()
            bins = packing.first_fit_decreasing(lengths, pack_size)
            ffd_seconds = time.perf_counter() - start
            stats = packing.packing_stats(lengths, bins, pack_size)
            batch = max(1, round(stats["packing_factor"]))
            order = list(lengths)
            random.Random(args.seed).shuffle(order)
            padded = packing.pad_to_longest_stats(order, batch)
            packed_per_step = stats["packing_efficiency"] * pack_size
            padded_per_step = padded["efficiency"] * pack_size
            print(f"{name:<15} {pack_size:>5} {len(lengths):>4} {len(pairs) - len(lengths):>4} {stats['n_packs']:>5} "
                  f"{stats['packing_factor']:>6.2f} {100 * stats['packing_efficiency']:>7.2f}% {batch:>3} "
                  f"{100 * padded['efficiency']:>7.2f}% {packed_per_step:>20.0f} {padded_per_step:>8.0f} "
                  f"{packed_per_step / padded_per_step:>7.2f}x {ffd_seconds:>6.3f}")
    print("pack eff = real tokens / (packs x pack size), every pack counted; pad eff = real tokens / padded slots "
          "(batches of B shuffled examples padded to their longest); speed-up = real tokens per step, packed / padded.")


if __name__ == "__main__":
    main()
