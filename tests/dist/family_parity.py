"""2-rank worker: per-step LoRA training losses of each family's tiny model under DP=2 (TP=1), TP=2 and PP=2
(one torchrun launch for every family: imports cost more than the tiny steps).

argv: <out.json> <prepared dir> <run root> <family>=<hf dir>:<converted dir> ...
Writes, from rank 0, {family: {layout: {step: loss}}}.
"""
import json
import sys
from pathlib import Path

from checks import losses_of, tiny_run

from nemotune.data_prep.tokenizer import tiny_tokenizer_dir
from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.config import compose
from nemotune.recipes.lora_sft import train

OUT, PREP, ROOT = sys.argv[1:4]
FAMILIES = dict(arg.split("=", 1) for arg in sys.argv[4:])
LAYOUTS = {"tp1": ["parallel=single"], "tp2": ["parallel=tp2"], "pp2": ["parallel=pp2"]}
STEPS = 3


def main():
    results = {}
    for family, dirs in FAMILIES.items():
        base_hf, base_mcore = dirs.split(":")
        for layout, overrides in LAYOUTS.items():
            run_dir = Path(ROOT) / family / layout
            train(compose("lora_sft", ["experiment=tiny_lora", *tiny_run(PREP, base_mcore, base_hf, steps=STEPS),
                                       "cluster.nproc_per_node=2", "trainer.sft.val_check_interval=100",
                                       "peft.lora.target_modules=[all-linear]", *overrides,
                                       # the prepared data's tokenizer (transformers would load a qwen2 dir's
                                       # copy of it as a Qwen2Tokenizer, another fingerprint)
                                       f"model.tokenizer={tiny_tokenizer_dir()}",
                                       f"run.output_dir={run_dir}"]))
            if distributed.is_rank_zero():
                results.setdefault(family, {})[layout] = losses_of(run_dir)
    if distributed.is_rank_zero():
        Path(OUT).write_text(json.dumps(results, indent=2))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
