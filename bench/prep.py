"""Prep throughput: examples/s of the tokenize+mask stage and of the whole pipeline (load, validate, split,
tokenize, pack, write with hashes), with num_proc 1 and 2, on the bundled sample and the real FiQA rows.

    python bench/prep.py [--num-proc 1 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_FIQA = REPO.parent / "shared" / "data" / "fiqa" / "test.jsonl"


def configs(out_root: Path) -> dict:
    from nemotune.data_prep.config import DataConfig, FieldsConfig

    sets = {"fiqa_sample": DataConfig(name="fiqa_sample", source="local", path="nemotune/fiqa_sample",
                                      max_seq_length=4096, pack_size=4096)}
    if SHARED_FIQA.is_file():
        sets["fiqa_real_test"] = DataConfig(name="fiqa_real", source="local", path=str(SHARED_FIQA),
                                            fields=FieldsConfig(prompt="question", response="answer"),
                                            max_seq_length=4096, pack_size=4096)
    else:
        print(f"note: {SHARED_FIQA} absent; benchmarking the bundled sample only")
    for name, cfg in sets.items():
        cfg.output_dir = str(out_root / name)
    return sets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    parser.add_argument("--tokenizer", default="nemotune/tiny")
    args = parser.parse_args(argv)

    from nemotune.data_prep import pipeline
    from nemotune.data_prep.sources import load_rows, to_examples
    from nemotune.data_prep.tokenizer import load_tokenizer

    print(f"command: python {shlex.join(['bench/prep.py', *(argv if argv is not None else sys.argv[1:])])}")
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"{'dataset':<15} {'num_proc':>8} {'examples':>8} {'tokenize ex/s':>14} {'full prep ex/s':>15} "
          f"{'full prep s':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs(Path(tmp)).items():
            examples, problems = to_examples(load_rows(cfg), cfg)
            assert not problems, problems[:3]
            for num_proc in args.num_proc:
                cfg.num_proc = num_proc
                tokenize_s, full_s = float("inf"), float("inf")
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    pipeline.tokenize_all(examples, tokenizer, args.tokenizer, cfg)
                    tokenize_s = min(tokenize_s, time.perf_counter() - start)
                    start = time.perf_counter()
                    pipeline.run(cfg, args.tokenizer, quiet=True)
                    full_s = min(full_s, time.perf_counter() - start)
                n = len(examples)
                print(f"{name:<15} {num_proc:>8} {n:>8} {n / tokenize_s:>14.0f} {n / full_s:>15.0f} {full_s:>11.2f}")
    print("tokenize = apply_chat_template + offsets + answer-only mask + decode check per example; "
          "full prep includes process start-up for num_proc > 1 (best of --repeat runs).")


if __name__ == "__main__":
    main()
