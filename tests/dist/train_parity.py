"""2-rank worker for the training tests (one torchrun launch: imports cost more than the tiny steps).

argv: <out.json> <prepared dir> <converted base dir> <hf base dir> <run root> [layout,... (only these)]
Writes, from rank 0, per-step train losses of every layout, the TP=2 -> TP=1 resume, packed vs unpacked
losses for PP=1 and PP=2, and the two-stage check (stage 2's first loss vs stage 1's adapter evaluated on
stage 2's first batch).
"""
import json
import shutil
import sys
from pathlib import Path

import torch

from checks import losses_of, packed_vs_unpacked, tiny_run

from nemotune.recipes.engine import batches, distributed
from nemotune.recipes.engine.config import compose, hf_config_of
from nemotune.recipes.lora_sft import train

OUT, PREP, BASE_MCORE, BASE_HF, ROOT = sys.argv[1:6]
ROOT = Path(ROOT)
STEPS = 4
COMMON = [*tiny_run(PREP, BASE_MCORE, BASE_HF, steps=STEPS), "cluster.nproc_per_node=2"]
LAYOUTS = {
    "dp2": ["parallel=single"],
    "dp2_distopt": ["parallel=single", "parallel.use_distributed_optimizer=true"],
    "tp2": ["parallel=tp2"],
    "tp2_sp": ["parallel=tp2_sp"],
    "pp2": ["parallel=pp2"],
    "tp2_pp2": ["parallel=tp2_pp2"],  # 4 ranks
}
ONLY = sys.argv[6].split(",") if len(sys.argv) > 6 else None




def config(name: str, extra=()):
    return compose("lora_sft", ["experiment=tiny_lora", *COMMON, *LAYOUTS.get(name, []),
                                f"run.output_dir={ROOT / name}", *extra])




def two_stage() -> dict:
    from nemotune.data_prep.tokenizer import load_tokenizer, model_tokenizer
    from nemotune.recipes.engine.builders import build_lora_model, init_from_config, load_samples, seq_length
    from nemotune.recipes.engine.trainer import SupervisedTrainer
    from nemotune.recipes.two_stage import run_stages, stage_configs

    root = ROOT / "two_stage"
    cfg = compose("lora_sft", ["experiment=tiny_two_stage", f"model.hf_path={BASE_HF}",
                               f"model.checkpoint={BASE_MCORE}", f"data.output_dir={PREP}", "run.tensorboard=false",
                               f"run.output_dir={root}", "trainer.sft.max_steps=3", "peft.lora.dim=8"])
    results = run_stages(cfg)
    (_, stage2_cfg) = stage_configs(cfg)[1]
    stage2_cfg.peft.restore_from = str(results[0].adapter_dir)
    init_from_config(stage2_cfg)
    tokenizer = load_tokenizer(*model_tokenizer(stage2_cfg.model))
    samples = load_samples(stage2_cfg, stage2_cfg.trainer.train_split, tokenizer)
    hf = hf_config_of(stage2_cfg)
    evaluator = SupervisedTrainer(cfg=stage2_cfg, model=[build_lora_model(stage2_cfg, hf)], optimizer=None,
                                  scheduler=None, train_samples=samples, val_samples=samples, pad_id=0,
                                  seq_length=seq_length(stage2_cfg), hf_config=hf, run_dir=root / "check",
                                  checkpointer=None, log_metrics=False)
    first, _ = batches.global_batch_indices(len(samples), stage2_cfg.trainer.global_batch_size, 0,
                                            stage2_cfg.run.seed)
    loss, _ = evaluator._run_schedule(evaluator._micro_batches(samples, first), forward_only=True)
    return {"stage1_adapter_on_stage2_batch1": loss,
            "stage1": losses_of(root / "stage1") if distributed.is_rank_zero() else None,
            "stage2": losses_of(root / "stage2") if distributed.is_rank_zero() else None,
            "adapters": [str(r.adapter_dir) for r in results]}


def main():
    results = {"layouts": {}}
    for name in ONLY or [n for n in LAYOUTS if n != "tp2_pp2"]:
        train(config(name))
        if distributed.is_rank_zero():
            results["layouts"][name] = losses_of(ROOT / name)
    if ONLY:
        if distributed.is_rank_zero():
            Path(OUT).write_text(json.dumps(results, indent=2))
        distributed.destroy_distributed()
        return
    # a checkpoint saved at TP=2 resumes at TP=1
    resumed = ROOT / "tp2_resumed_at_tp1"
    if distributed.is_rank_zero():
        (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "tp2" / "checkpoints" / "step0000002", resumed / "checkpoints" / "step0000002")
    torch.distributed.barrier()
    train(compose("lora_sft", ["experiment=tiny_lora", *COMMON, "parallel=single", f"run.output_dir={resumed}"]))
    if distributed.is_rank_zero():
        results["tp2_resumed_at_tp1"] = losses_of(resumed)
    results["packing"] = {layout: packed_vs_unpacked(config(layout), ROOT / "packing") for layout in ("dp2", "pp2")}
    results["two_stage"] = two_stage()
    if distributed.is_rank_zero():
        Path(OUT).write_text(json.dumps(results, indent=2))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
