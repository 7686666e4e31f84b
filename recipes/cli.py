"""`nemotune <verb> ...`: one entry point dispatching to each folder's own main.

Every verb also runs as a module: prep = python -m nemotune.data_prep, convert = python -m nemotune.converters.convert,
export = python -m nemotune.converters.export, train = python -m nemotune.recipes.lora_sft,
rl = python -m nemotune.recipes.rl, eval = python -m nemotune.recipes.evaluate,
launch = python -m nemotune.recipes.launch, demo = python -m nemotune.recipes.demo.
"""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "prep": ("nemotune.data_prep", "dataset -> chat JSONL -> templated tokens + answer-only masks -> packed sequences"),
    "convert": ("nemotune.converters.convert", "HF <-> Megatron checkpoint <-> .nemo, and verify logits"),
    "export": ("nemotune.converters.export", "LoRA adapter -> HF PEFT / NeMo .nemo / merged; full model -> HF / .nemo"),
    "train": ("nemotune.recipes.lora_sft", "LoRA or full-parameter SFT on megatron-core (single or multi-stage)"),
    "rl": ("nemotune.recipes.rl", "RL after SFT on the LoRA policy: GRPO on the rl split, or DPO on pairs"),
    "eval": ("nemotune.recipes.evaluate", "base vs LoRA on the held-out split: loss, generation, metrics"),
    "launch": ("nemotune.recipes.launch", "run training with torchrun locally or submit it to Slurm"),
    "plan": ("nemotune.recipes.plan", "per-GPU memory by part and step time of a config; layouts that fit N GPUs"),
    "demo": ("nemotune.recipes.demo", "the whole pipeline on the embedded tiny model, on CPU"),
}


def usage() -> str:
    lines = ["usage: nemotune <verb> [args ...]", "", "verbs:"]
    lines += [f"  {verb:<8} {text}   (python -m {module})" for verb, (module, text) in VERBS.items()]
    lines += ["", "`nemotune <verb> --help` explains each verb."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a verb is required: say which exist, and fail so scripts notice
        print(f"nemotune: no verb given\n\n{usage()}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"nemotune: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
