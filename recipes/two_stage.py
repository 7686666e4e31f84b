"""Two-stage (multi-stage) LoRA SFT: each stage its own data / lr / epochs; stage N+1 starts from stage N's
final adapter. One command runs them all and leaves every stage's adapter:

    nemotune train experiment=tiny_two_stage
    <run.output_dir>/<stage name>/checkpoints/step*/adapter

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
        validate(stage_cfg)
        out.append((stage.name, stage_cfg))
    return out


def run_stages(cfg: DictConfig, train=None) -> list:
    """Every stage in order, or only `run.stage` (a dependent Slurm job per stage). `train(stage_cfg, run_dir=,
    stage=, step_offset=)` trains one stage: LoRA SFT by default (`nemotune rl` passes one that also runs RL)."""
    from nemotune.recipes.engine.checkpointing import complete_checkpoints, read_state

    if train is None:
        from nemotune.recipes.lora_sft import train

    root = Path(cfg.run.output_dir)
    results, summary, previous_adapter, step_offset = [], [], None, 0
    for name, stage_cfg in stage_configs(cfg):
        stage_dir = root / name
        if cfg.run.stage is not None and name != cfg.run.stage:
            done = complete_checkpoints(stage_dir / "checkpoints")
            if done:  # an earlier stage that ran in its own job: continue from its adapter on disk
                previous_adapter = done[-1] / "adapter"
                step_offset += read_state(done[-1])["step"]
            continue
        if previous_adapter is not None and not stage_cfg.peft.restore_from:
            stage_cfg.peft.restore_from = str(previous_adapter)
        distributed.print_rank_zero(f"==== stage {name}: lr {stage_cfg.trainer.optim.lr}, "
                                    f"{stage_cfg.trainer.sft.max_epochs} epoch(s), "
                                    f"train split {stage_cfg.trainer.train_split}, "
                                    f"starts from {stage_cfg.peft.restore_from or 'a fresh adapter'}")
        result = train(stage_cfg, run_dir=stage_dir, stage=name, step_offset=step_offset)
        results.append(result)
        if not result.finished:
            distributed.print_rank_zero(f"stage {name} stopped early at step {result.steps}; rerun the same "
                                        "command to resume")
            return results
        summary.append({"stage": name, "adapter": str(result.adapter_dir), "steps": result.steps,
                        "val_loss": result.last_val_loss, "global_step_offset": step_offset})
        previous_adapter = result.adapter_dir
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
