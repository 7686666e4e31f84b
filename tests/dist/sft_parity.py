"""2-rank worker for the full-parameter SFT tests (peft=none; one torchrun launch runs every case in turn).

argv: <out.json> <prepared dir> <converted base dir> <hf base dir> <run root>
Writes, from rank 0: per-step losses (and consumed samples) of each layout, of a run stopped after step 3
whose step-3 checkpoint is then lost (as after a SIGKILL before that save) and rerun, of a TP=2 checkpoint
resumed at TP=1, of LoRA with the distributed optimizer uninterrupted and stopped after step 2 then rerun, and of
a mixed two-stage run (stage 1 full SFT, stage 2 LoRA on stage 1's step dir) with stage 1's model evaluated on stage
2's first batch.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from checks import tiny_run

from nemotune.recipes.engine import batches, distributed
from nemotune.recipes.engine.config import compose, distributed_optimizer, hf_config_of
from nemotune.recipes.lora_sft import train

OUT, PREP, BASE_MCORE, BASE_HF, ROOT = sys.argv[1:6]
ROOT = Path(ROOT)
STEPS = 4
COMMON = [*tiny_run(PREP, BASE_MCORE, BASE_HF, steps=STEPS), "cluster.nproc_per_node=2", "trainer.optim.lr=1e-3"]
LAYOUTS = {
    "dp2": ["parallel=single", "parallel.use_distributed_optimizer=false"],
    "dp2_distopt": ["parallel=single"],  # the distributed optimizer: full SFT's default
    "tp2": ["parallel=tp2"],
    "tp2_sp": ["parallel=tp2_sp"],
    "pp2": ["parallel=pp2"],
    "tp2_sp_recompute_full": ["parallel=tp2_sp", "trainer.recompute=full"],
    "dp2_recompute_selective": ["parallel=single", "trainer.recompute=selective"],
}


def config(name: str, run_dir: Path, extra=()):
    return compose("lora_sft", ["experiment=tiny_sft", *COMMON, *LAYOUTS.get(name, []), f"run.output_dir={run_dir}",
                                *extra])


def steps_of(run_dir: Path) -> dict:
    """{step: [loss, consumed_samples]}, the last record of each step winning (a rerun re-logs its steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = [row["train/loss"], row["train/consumed_samples"]]
    return out


def stopped_and_rerun() -> dict:
    """Stop after step 3, lose its checkpoint (a kill between step 3 and its save), rerun: steps 3-4 again."""
    run_dir = ROOT / "stopped"
    train(config("dp2_distopt", run_dir, ["trainer.stop_after_steps=3"]))
    torch.distributed.barrier()
    first = steps_of(run_dir) if distributed.is_rank_zero() else None
    if distributed.is_rank_zero():
        shutil.rmtree(run_dir / "checkpoints" / "step0000003")
    torch.distributed.barrier()
    result = train(config("dp2_distopt", run_dir))
    return {"before_rerun": first, "steps": steps_of(run_dir) if distributed.is_rank_zero() else None,
            "last_checkpoint": str(result.checkpoint)}


def lora_distributed_optimizer_resume() -> dict:
    """LoRA at DP=2 with the distributed optimizer (its adapters' Adam state sharded over DP): an uninterrupted run,
    and one stopped after step 2 (checkpointed there) then rerun to step 4."""
    lora = ["experiment=tiny_lora", *COMMON, "parallel.use_distributed_optimizer=true"]
    out = {}
    for name, extra in (("uninterrupted", []), ("stopped", ["trainer.stop_after_steps=2"])):
        train(compose("lora_sft", [*lora, f"run.output_dir={ROOT / 'lora_distopt' / name}", *extra]))
        torch.distributed.barrier()
        out[name] = steps_of(ROOT / "lora_distopt" / name) if distributed.is_rank_zero() else None
    out["before_rerun"] = out["stopped"]
    out["distributed_optimizer"] = distributed_optimizer(compose("lora_sft", lora))
    train(compose("lora_sft", [*lora, f"run.output_dir={ROOT / 'lora_distopt' / 'stopped'}"]))
    out["stopped"] = steps_of(ROOT / "lora_distopt" / "stopped") if distributed.is_rank_zero() else None
    return out


def tp2_resumed_at_tp1() -> dict:
    resumed = ROOT / "tp2_resumed_at_tp1"
    if distributed.is_rank_zero():
        (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "tp2" / "checkpoints" / "step0000002", resumed / "checkpoints" / "step0000002")
    torch.distributed.barrier()
    train(config("dp2_distopt", resumed))
    return steps_of(resumed) if distributed.is_rank_zero() else None


def optimizer_state_bytes() -> dict:
    """Bytes of optimizer state (Adam's exp_avg + exp_avg_sq, fp32) each rank holds at DP=2, with and without
    the distributed optimizer, and the model's parameter count. (The checkpoint's fully reshardable format is
    written by DP rank 0 alone, so its files cannot show the per-rank split; the live state does.)"""
    from nemotune.recipes.engine.builders import build_model, init_from_config, wrap_for_training

    out = {}
    for name in ("dp2", "dp2_distopt"):
        cfg = config(name, ROOT / "state_bytes")
        init_from_config(cfg)
        model = build_model(cfg, hf_config_of(cfg))
        _, optimizer = wrap_for_training(cfg, model)
        size = 0
        for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
            opt.init_state_fn(opt.optimizer)  # allocates the state a first step would (megatron's own hook)
            size += sum(t.numel() * t.element_size() for state in opt.optimizer.state.values()
                        for key, t in state.items() if key != "step")
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, size)
        out[name] = gathered
        out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def mixed_two_stage() -> dict:
    """Stage 1 full SFT, stage 2 LoRA from stage 1's last step dir (model.checkpoint, through
    open_megatron_checkpoint): stage 2's first loss is stage 1's model on that batch (LoRA B starts at 0)."""
    from nemotune.data_prep.tokenizer import load_tokenizer, model_tokenizer
    from nemotune.recipes.engine.builders import build_model, init_from_config, load_samples, seq_length
    from nemotune.recipes.engine.trainer import SupervisedTrainer
    from nemotune.recipes.two_stage import run_stages, stage_configs

    root = ROOT / "mixed_two_stage"
    cfg = compose("lora_sft", ["experiment=tiny_sft_two_stage", f"model.hf_path={BASE_HF}",
                               f"model.checkpoint={BASE_MCORE}", f"data.output_dir={PREP}", "run.tensorboard=false",
                               f"run.output_dir={root}", "trainer.sft.max_steps=2", "trainer.sft.limit_val_batches=1"])
    results = run_stages(cfg)
    (_, stage1_cfg), (_, stage2_cfg) = stage_configs(cfg)
    stage1_cfg.model.checkpoint = str(results[0].checkpoint)  # stage 1's trained model, no adapter
    init_from_config(stage1_cfg)
    tokenizer = load_tokenizer(*model_tokenizer(stage1_cfg.model))
    samples = load_samples(stage2_cfg, stage2_cfg.trainer.train_split, tokenizer)
    hf = hf_config_of(stage1_cfg)
    evaluator = SupervisedTrainer(cfg=stage1_cfg, model=[build_model(stage1_cfg, hf)], optimizer=None,
                                  scheduler=None, train_samples=samples, val_samples=samples, pad_id=0,
                                  seq_length=seq_length(stage1_cfg), hf_config=hf, run_dir=root / "check",
                                  checkpointer=None, log_metrics=False)
    first, _ = batches.global_batch_indices(len(samples), stage2_cfg.trainer.global_batch_size, 0,
                                            stage2_cfg.run.seed)
    loss, _ = evaluator._run_schedule(evaluator._micro_batches(samples, first), forward_only=True)
    return {"stage1_model_on_stage2_batch1": loss, "stage1_checkpoint": str(results[0].checkpoint),
            "stage2_adapter": str(results[1].adapter_dir),
            "stage2": steps_of(root / "stage2") if distributed.is_rank_zero() else None}


def main():
    results = {"layouts": {}, "seconds": {}}

    def timed(name, fn):
        start = time.perf_counter()
        results[name] = fn()
        results["seconds"][name] = round(time.perf_counter() - start, 1)

    for name in LAYOUTS:
        train(config(name, ROOT / name))
        if distributed.is_rank_zero():
            results["layouts"][name] = steps_of(ROOT / name)
    timed("optimizer_state_bytes", optimizer_state_bytes)
    timed("stopped_and_rerun", stopped_and_rerun)
    timed("tp2_resumed_at_tp1", tp2_resumed_at_tp1)
    timed("lora_distributed_optimizer_resume", lora_distributed_optimizer_resume)
    timed("mixed_two_stage", mixed_two_stage)
    if distributed.is_rank_zero():
        Path(OUT).write_text(json.dumps(results, indent=2))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
