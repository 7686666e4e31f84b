"""`make demo` / `nemotune demo`: the whole pipeline on the embedded tiny model, on CPU, nothing downloaded.

prepare the bundled FiQA-schema sample -> write the tiny base model -> convert it to Megatron ->
two-stage LoRA on 2 processes with TP=2 -> export HF PEFT and .nemo adapters -> verify the export ->
evaluate base vs LoRA -> plots -> a summary of artifacts, metrics, whether fine-tuning helped, time per step.
Each step is one of the product's own commands (printed as it runs), so the demo is also their tutorial.
--quick runs the same steps with a few training steps and a short evaluation (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

EXPERIMENT = "tiny_demo"
# The base is the tiny model with weights drawn at std 0.1 instead of 0.02. The final RMSNorm fixes the
# hidden state's norm at about sqrt(64) = 8, so an output-layer row drawn at 0.02 (norm 0.16) yields logits
# within about +-1.3: no adapter on the linear layers can then move the loss far below ln(1024) = 6.93.
# At 0.1 the output layer can express the data's token statistics and the adapter visibly learns them.
BASE_MODEL_KWARGS = {"init_std": 0.1}
EVAL_LIMIT, MAX_NEW_TOKENS = 48, 48
QUICK_TRAIN_STEPS, QUICK_EVAL_LIMIT, QUICK_MAX_NEW_TOKENS = 12, 8, 16
# Written into --work by the demo. A directory holding anything else than MARKER or the demo's own entries
# (what demos before the marker left) is someone else's and is never replaced.
MARKER = ".nemotune-demo"
DEMO_ENTRIES = {MARKER, "prep", "tiny_base", "tiny_base_mcore", "runs", "export", "eval"}
# Higher is better for every metric but the length ratio, whose target is 1 (as long as the reference).
LENGTH_RATIO = "length_ratio"


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of every finished child process: wall time alone misleads on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(title: str, argv: list[str], timings: list, env: dict | None = None) -> None:
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    result = subprocess.run(argv, env={**os.environ, **(env or {})})
    timings.append((title, time.perf_counter() - start, _children_cpu_seconds() - cpu_start))
    if result.returncode != 0:
        raise SystemExit(f"demo: step '{title}' failed with exit code {result.returncode}")


def _nemotune(verb_module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", verb_module, *map(str, args)]


def _write_base(out: Path) -> list[str]:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in BASE_MODEL_KWARGS.items())
    code = f"from nemotune.converters.tiny_model import write_tiny_llama; write_tiny_llama({str(out)!r}, {kwargs})"
    return [sys.executable, "-c", code]


def metric_verdict(name: str, stats: Mapping) -> str:
    """'improved', 'worse' or 'no clear change': whether the CI of LoRA - base excludes zero, and which way."""
    low, high = stats.get("diff_ci_low"), stats.get("diff_ci_high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "no clear change"
    if name == LENGTH_RATIO:
        # toward 1: upward from answers shorter than the references, downward from longer ones
        toward = 1.0 if stats["base_mean"] < 1.0 else -1.0
        if (toward > 0 and stats["lora_mean"] > 1.0) or (toward < 0 and stats["lora_mean"] < 1.0):
            return "no clear change"  # overshot the references' length: not closer, just different
        low, high = sorted((toward * low, toward * high))
    if low > 0:
        return "improved"
    if high < 0:
        return "worse"
    return "no clear change"


def verdict_lines(summary: Mapping) -> list[str]:
    """The demo's plain-words ending: one line per metric and per loss, then whether fine-tuning helped."""
    from nemotune.recipes.engine.eval_metrics import METRICS

    conf = int(round(summary["bootstrap"]["confidence"] * 100))
    lines, improved = [], []
    for name, stats in summary["metrics"].items():
        verdict = metric_verdict(name, stats)
        if verdict == "improved":
            improved.append(METRICS.get(name, name))
        lines.append(f"{METRICS.get(name, name)}: base {stats['base_mean']:.4f} -> LoRA {stats['lora_mean']:.4f}, "
                     f"LoRA - base {stats['diff_mean']:+.4f}, {conf}% CI [{stats['diff_ci_low']:.4f}, "
                     f"{stats['diff_ci_high']:.4f}]: {verdict}")
    loss_fell = []
    for engine, losses in summary.get("loss", {}).items():
        base_loss, lora_loss = losses["base"]["loss"], losses["lora"]["loss"]
        loss_fell.append(lora_loss < base_loss)
        lines.append(f"held-out answer-token loss ({engine}): base {base_loss:.4f} -> LoRA {lora_loss:.4f} "
                     f"({'lower' if lora_loss < base_loss else 'NOT lower'})")
    if loss_fell and all(loss_fell) and improved:
        lines.append(f"fine-tuning worked: the held-out answer loss fell and {', '.join(improved)} improved "
                     f"({conf}% CI of LoRA - base excludes zero)")
    else:
        lines.append("fine-tuning did NOT clearly work: " + ("the held-out answer loss did not fall"
                     if not (loss_fell and all(loss_fell)) else f"no generation metric improved with a {conf}% CI "
                     "that excludes zero"))
    return lines


def example_lines(predictions: Path, width: int = 150) -> list[str]:
    """The first held-out example's reference and both answers, one line each, cut to `width` characters."""
    with predictions.open(encoding="utf-8") as f:
        row = json.loads(f.readline())
    return [f"  {label:<10} {' '.join(str(row[key]).split())[:width]!r}"
            for label, key in (("question", "prompt"), ("reference", "reference"), ("base", "base"),
                               ("LoRA", "lora"))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemotune demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="work/demo",
                        help="where every artifact goes (a previous demo's directory is replaced)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help=f"held-out examples to generate for (default {EVAL_LIMIT}; --quick {QUICK_EVAL_LIMIT})")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"generation length (default {MAX_NEW_TOKENS}; --quick {QUICK_MAX_NEW_TOKENS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TRAIN_STEPS} training steps per stage and a short evaluation: checks the "
                             "pipeline, does not show learning")
    return parser


def _prepare_work(work: Path) -> str | None:
    """Replace a previous demo's directory and mark the new one; the refusal message for any other path."""
    if work.exists():
        foreign = sorted(p.name for p in work.iterdir() if p.name not in DEMO_ENTRIES) if work.is_dir() else []
        if not work.is_dir() or (foreign and not (work / MARKER).is_file()):
            return (f"demo: --work {work} exists and was not made by the demo ({(foreign or [work.name])[0]!r} is "
                    "not the demo's); nothing was changed. Fix: choose a new or empty --work directory")
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by nemotune demo; the next demo run replaces this directory\n")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    eval_limit = args.eval_limit if args.eval_limit is not None else QUICK_EVAL_LIMIT if args.quick else EVAL_LIMIT
    max_new_tokens = (args.max_new_tokens if args.max_new_tokens is not None
                      else QUICK_MAX_NEW_TOKENS if args.quick else MAX_NEW_TOKENS)
    if eval_limit < 1 or max_new_tokens < 1:
        print(f"demo: --eval-limit {eval_limit} / --max-new-tokens {max_new_tokens}: both must be >= 1",
              file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    refusal = _prepare_work(work)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    prep, base, mcore = work / "prep", work / "tiny_base", work / "tiny_base_mcore"
    runs, exports, report = work / "runs", work / "export", work / "eval"
    timings: list[tuple[str, float, float]] = []
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    data = ["data=fiqa_sample", "data.resplit=true", f"data.output_dir={prep}"]

    _run("prepare data", _nemotune("nemotune.data_prep", "model=tiny", *data), timings, env)
    _run("write the tiny base model", _write_base(base), timings, env)
    _run("convert HF -> Megatron", _nemotune("nemotune.converters.convert", "hf-to-megatron", "--hf", base, "--out", mcore),
         timings, env)
    train_overrides = [f"experiment={EXPERIMENT}", f"model.hf_path={base}", f"model.checkpoint={mcore}",
                       *data[1:], f"run.output_dir={runs}"]
    quick = [f"trainer.sft.max_steps={QUICK_TRAIN_STEPS}"] if args.quick else []
    _run("two-stage LoRA, 2 processes, TP=2",
         [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
          "--rdzv_endpoint", "localhost:0", "-m", "nemotune.recipes.lora_sft", *train_overrides, *quick],
         timings, env)
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
        f"out_dir={report}", "eval.split=eval", f"eval.limit={eval_limit}",
        f"eval.max_new_tokens={max_new_tokens}", "eval.megatron_loss=true",
        f"eval.megatron_adapter={adapter}", f"eval.train_overrides=[{megatron_overrides}]"), timings, env)
    _run("plots", _nemotune("nemotune.recipes.plots", runs), timings, env)

    summary = json.loads((report / "summary.json").read_text())
    print("\n" + "=" * 100)
    print("nemotune demo: done" + (" (--quick: a pipeline check, too short to show learning)" if args.quick else "")
          + "\n")
    print("artifacts:")
    for label, path in (("prepared data", prep), ("tiny base (HF)", base), ("base (Megatron)", mcore),
                        ("runs (both stages)", runs), ("final adapter", adapter),
                        ("HF PEFT adapter", exports / "peft"), ("NeMo LoRA", exports / "lora.nemo"),
                        ("evaluation", report), ("plots", runs)):
        print(f"  {label:<20} {path}")
    for stage in stages:
        print(f"  stage {stage['stage']}: {stage['steps']} steps, final val_loss {stage['val_loss']:.4f}")
    print("\n" + (report / "summary.md").read_text())
    print("one held-out example (greedy; the random base babbles; the LoRA has begun to pick up the answers' common words):")
    print("\n".join(example_lines(report / "predictions.jsonl")) + "\n")
    print(f"time per step (wall; CPU = user + system seconds of its processes; load average now "
          f"{os.getloadavg()[0]:.1f}):")
    for title, seconds, cpu in timings:
        print(f"  {title:<62} {seconds:7.1f} s   CPU {cpu:7.1f} s")
    print(f"  {'total':<62} {sum(t[1] for t in timings):7.1f} s   CPU {sum(t[2] for t in timings):7.1f} s\n")
    for line in verdict_lines(summary):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
