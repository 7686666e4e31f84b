"""Two-stage (multi-stage) SFT: each stage its own data / lr / epochs / peft scheme. Stage N+1 starts where
stage N ended: from its final adapter (LoRA after LoRA), or from its final model (after a full-SFT stage,
peft.peft_scheme=none: stage N's last step dir becomes stage N+1's model.checkpoint, LoRA or full). One
command runs them all and leaves every stage's checkpoints:

    nemotune train experiment=tiny_two_stage          (LoRA, LoRA)
    nemotune train experiment=tiny_sft_two_stage      (full SFT, then LoRA on its model)
    <run.output_dir>/<stage name>/checkpoints/step*/{adapter,dist,hf}

Stages are dotted-key overrides on the root config (`stages: [{name, overrides}]`); the metrics of all
stages share one time axis through `global_step`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from omegaconf import DictConfig

from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.config import ConfigError, apply_overrides, compose_error, validate


def stage_configs(cfg: DictConfig) -> List[tuple[str, DictConfig]]:
    """(name, config) per stage, validated together before anything runs."""
    out = []
    for stage in cfg.stages:
        try:
            stage_cfg = apply_overrides(cfg, dict(stage.overrides))
        except Exception as err:  # omegaconf: a key the schema lacks, a value of the wrong type
            rl = " (stages with rl.* keys run with `nemotune rl`)" if any(
                str(k).startswith("rl.") for k in stage.overrides) else ""
            raise ConfigError([f"stages[{stage.name}].overrides: {compose_error(err)}{rl}"]) from None
        stage_cfg.stages = []
        stage_cfg.run.stage = None  # one stage's own config is a single run (run.stage selects on the root)
        validate(stage_cfg)
        if out and out[-1][1].peft.peft_scheme == "lora" and stage_cfg.peft.peft_scheme == "none":
            raise ConfigError([f"stages[{stage.name}]: full SFT (peft.peft_scheme=none) cannot continue from the "
                               f"LoRA stage {out[-1][0]} (an adapter is no model); merge its adapter first "
                               f"(`nemotune export merge`) and run this stage on the merged model, or make it LoRA"])
        out.append((stage.name, stage_cfg))
    return out


def continue_from(stage_cfg: DictConfig, previous: Path, previous_scheme: str) -> str:
    """Point a stage at where the previous one ended (its last step dir): LoRA after LoRA restores the adapter,
    anything after full SFT starts from that step dir's model. Returns what it starts from, for the banner."""
    if previous_scheme == "none":
        stage_cfg.model.checkpoint = str(previous)
        return f"the model of {previous}"
    if not stage_cfg.peft.restore_from:
        stage_cfg.peft.restore_from = str(previous / "adapter")
    return str(stage_cfg.peft.restore_from)


def run_stages(cfg: DictConfig, train=None) -> list:
    """Every stage in order, or only `run.stage` (a dependent Slurm job per stage). `train(stage_cfg, run_dir=,
    stage=, step_offset=)` trains one stage: LoRA SFT by default (`nemotune rl` passes one that also runs RL)."""
    from nemotune.recipes.engine.checkpointing import complete_checkpoints, read_state

    if train is None:
        from nemotune.recipes.lora_sft import train

    root = Path(cfg.run.output_dir)
    results, summary, previous, previous_scheme, step_offset = [], [], None, "lora", 0
    for name, stage_cfg in stage_configs(cfg):
        stage_dir = root / name
        if cfg.run.stage is not None and name != cfg.run.stage:
            done = complete_checkpoints(stage_dir / "checkpoints")
            if done:  # an earlier stage that ran in its own job: continue from its checkpoint on disk
                previous, previous_scheme = done[-1], stage_cfg.peft.peft_scheme
                step_offset += read_state(done[-1])["step"]
            continue
        start = continue_from(stage_cfg, previous, previous_scheme) if previous is not None else None
        lora = stage_cfg.peft.peft_scheme == "lora"
        fresh = "a fresh adapter" if lora else f"model.checkpoint={stage_cfg.model.checkpoint}"
        distributed.print_rank_zero(f"==== stage {name}: {'LoRA' if lora else 'full SFT'}, "
                                    f"lr {stage_cfg.trainer.optim.lr}, {stage_cfg.trainer.sft.max_epochs} epoch(s), "
                                    f"train split {stage_cfg.trainer.train_split}, "
                                    f"starts from {start or stage_cfg.peft.restore_from or fresh}")
        result = train(stage_cfg, run_dir=stage_dir, stage=name, step_offset=step_offset)
        results.append(result)
        if not result.finished:
            distributed.print_rank_zero(f"stage {name} stopped early at step {result.steps}; rerun the same "
                                        "command to resume")
            return results
        summary.append({"stage": name, "peft_scheme": stage_cfg.peft.peft_scheme,
                        "adapter": str(result.adapter_dir) if result.adapter_dir else None,
                        "checkpoint": str(result.checkpoint), "steps": result.steps,
                        "val_loss": result.last_val_loss, "global_step_offset": step_offset})
        previous, previous_scheme = result.checkpoint, stage_cfg.peft.peft_scheme
        step_offset += result.steps
    if distributed.is_rank_zero() and cfg.run.stage is None:
        (root / "stages.json").write_text(json.dumps(summary, indent=2))
    return results


def main(argv=None) -> int:
    """`python -m nemotune.recipes.two_stage experiment=<two-stage experiment>`: the same entry as lora_sft."""
    from nemotune.recipes.lora_sft import main as lora_sft_main

    return lora_sft_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
