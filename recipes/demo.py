"""`make demo` / `nemotune demo`: the whole pipeline on the embedded tiny model, on CPU, nothing downloaded.

prepare the bundled FiQA-schema sample -> write the tiny base model -> convert it to Megatron ->
two-stage LoRA on 2 processes with TP=2 -> export HF PEFT and .nemo adapters -> verify the export ->
evaluate base vs LoRA -> plots -> a summary of artifacts, metrics and time per step.
Each step is one of the product's own commands (printed as it runs), so the demo is also their tutorial.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

EXPERIMENT = "tiny_two_stage"


def _run(title: str, argv: list[str], timings: list, env: dict | None = None) -> None:
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(argv, env={**os.environ, **(env or {})})
    timings.append((title, time.perf_counter() - start))
    if result.returncode != 0:
        raise SystemExit(f"demo: step '{title}' failed with exit code {result.returncode}")


def _nemotune(verb_module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", verb_module, *map(str, args)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemotune demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="work/demo", help="where every artifact goes (replaced)")
    parser.add_argument("--eval-limit", type=int, default=12, help="test examples to generate for")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.work).resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    prep, base, mcore = work / "prep", work / "tiny_base", work / "tiny_base_mcore"
    runs, exports, report = work / "runs", work / "export", work / "eval"
    timings: list[tuple[str, float]] = []
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    data = ["data=fiqa_sample", "data.resplit=true", f"data.output_dir={prep}"]

    _run("prepare data", _nemotune("nemotune.data_prep", "model=tiny", *data), timings, env)
    _run("write the tiny base model", _nemotune("nemotune.converters.tiny_model", "--out", base), timings, env)
    _run("convert HF -> Megatron", _nemotune("nemotune.converters.convert", "hf-to-megatron", "--hf", base, "--out", mcore),
         timings, env)
    train_overrides = [f"experiment={EXPERIMENT}", f"model.hf_path={base}", f"model.checkpoint={mcore}",
                       *data[1:], f"run.output_dir={runs}"]
    _run("two-stage LoRA, 2 processes, TP=2",
         [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
          "--rdzv_endpoint", "localhost:0", "-m", "nemotune.recipes.lora_sft", *train_overrides], timings, env)
    stages = json.loads((runs / "stages.json").read_text())
    adapter = Path(stages[-1]["adapter"])
    _run("export HF PEFT", _nemotune("nemotune.converters.export", "hf-peft", "--adapter", adapter,
                                     "--out", exports / "peft"), timings, env)
    _run("export NeMo .nemo LoRA", _nemotune("nemotune.converters.export", "nemo", "--adapter", adapter,
                                             "--out", exports / "lora.nemo"), timings, env)
    _run("verify the export (Megatron + adapter vs transformers + PEFT)",
         _nemotune("nemotune.converters.convert", "verify", "--hf", base, "--ckpt", mcore, "--adapter", adapter,
                   "--peft", exports / "peft"), timings, env)
    megatron_overrides = ",".join(f"'{o}'" for o in train_overrides[:3])
    _run("evaluate base vs LoRA", _nemotune(
        "nemotune.recipes.evaluate", f"data_dir={prep}", f"base_model={base}", f"adapter={exports / 'peft'}",
        f"out_dir={report}", "eval.split=eval", f"eval.limit={args.eval_limit}",
        f"eval.max_new_tokens={args.max_new_tokens}", "eval.megatron_loss=true",
        f"eval.megatron_adapter={adapter}", f"eval.train_overrides=[{megatron_overrides}]"), timings, env)
    _run("plots", _nemotune("nemotune.recipes.plots", runs), timings, env)

    summary = json.loads((report / "summary.json").read_text())
    print("\n" + "=" * 100)
    print("nemotune demo: done\n")
    print("artifacts:")
    for label, path in (("prepared data", prep), ("tiny base (HF)", base), ("base (Megatron)", mcore),
                        ("runs (both stages)", runs), ("final adapter", adapter),
                        ("HF PEFT adapter", exports / "peft"), ("NeMo LoRA", exports / "lora.nemo"),
                        ("evaluation", report), ("plots", runs)):
        print(f"  {label:<20} {path}")
    for stage in stages:
        print(f"  stage {stage['stage']}: {stage['steps']} steps, final val_loss {stage['val_loss']:.4f}")
    print("\n" + (report / "summary.md").read_text())
    print("time per step:")
    for title, seconds in timings:
        print(f"  {title:<62} {seconds:7.1f} s")
    print(f"  {'total':<62} {sum(s for _, s in timings):7.1f} s")
    for engine, losses in summary.get("loss", {}).items():
        base_loss, lora_loss = losses["base"]["loss"], losses["lora"]["loss"]
        verdict = "lower" if lora_loss < base_loss else "NOT lower"
        print(f"held-out answer-token loss ({engine}): base {base_loss:.4f} -> LoRA {lora_loss:.4f} ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
