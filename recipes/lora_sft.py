"""Supervised fine-tuning on megatron-core (LoRA, or every weight with peft=none): the recipe, top to bottom.

    nemotune train experiment=<name> key=value ...      (or: python -m nemotune.recipes.lora_sft ...)
    torchrun --nproc_per_node 2 -m nemotune.recipes.lora_sft parallel=tp2 ...

validate config -> init distributed -> tokenizer -> prepared data -> model (+ base weights) -> LoRA (peft=lora)
-> DDP + optimizer + LR schedule -> SupervisedTrainer.fit() -> checkpoints (adapter or whole model) -> cleanup.
A config with `stages` (conf/experiment/*two_stage*.yaml) runs each stage in turn (recipes/two_stage.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.builders import (adapter_config, build_model, build_scheduler, data_fingerprint,
                                              init_from_config, load_samples, model_tokenizer, pad_id_of,
                                              seq_length, wrap_for_training)
from nemotune.recipes.engine.config import (ConfigError, compose, distributed_optimizer, hf_config_of,
                                            prepared_data_problems, validate)

HELP = """usage: nemotune train [experiment=<name>] [key=value ...]

Fine-tune a Megatron GPT model on data prepared by `nemotune prep`: LoRA adapters (peft=lora, the
default) or every weight (peft=none: full-parameter SFT, the distributed optimizer on by default).
Config: conf/lora_sft.yaml composes the groups model/ data/ peft/ parallel/ trainer/ cluster/;
experiment=<name> applies conf/experiment/<name>.yaml. Any key can be overridden, e.g.
  trainer.optim.lr=5e-5 trainer.sft.max_steps=100 peft.lora.dim=8 parallel=tp2
  peft=none trainer.recompute=selective parallel.use_distributed_optimizer=false
Multi-process: torchrun --nproc_per_node 2 -m nemotune.recipes.lora_sft parallel=tp2 ...
                or nemotune launch ... (local torchrun or Slurm).
Resume: rerunning into the same run.output_dir continues from its latest complete checkpoint; a changed
schedule (max_steps, max_epochs, lr, min_lr, warmup) is followed and said in one line, a changed data
order (global batch, seed, split, data) is refused. run.resume_from=previous skips a damaged latest one.
  --cfg       print the composed config and exit
  -h, --help  this help
"""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Optional[Path]
    adapter_dir: Optional[Path]
    steps: int
    finished: bool
    last_val_loss: Optional[float]


# ---- the recipe ----------------------------------------------------------------------------------

def base_reference(cfg: DictConfig, run_dir: Path) -> dict:
    """Path + content hash of the frozen base, hashed on rank 0 (8B = 16 GB read: with progress) and cached in
    the run dir by every file's size and mtime, so a resumed or requeued run does not read it again."""
    from nemotune.recipes.engine.run_dir import BASE_HASH_CACHE, cached_sha256

    path = cfg.model.checkpoint
    digest = [cached_sha256(path, run_dir / BASE_HASH_CACHE) if path and distributed.is_rank_zero() else None]
    if path:
        torch.distributed.broadcast_object_list(digest, src=0)
    return {"path": path, "sha256": digest[0], "model": cfg.model.name}


def prepare_run_dir(cfg: DictConfig, run_dir: Path):
    """Rank 0, before anything is loaded: the run dir and its checkpoints dir are writable, no other training
    holds the run dir (its lock is taken), and stale temporaries of an interrupted save are removed. Every
    rank learns the outcome; a refusal raises on all of them."""
    from nemotune.recipes.engine.run_dir import RunDirError, RunLock, check_writable, remove_stale_temporaries

    lock, error = None, [None]
    if distributed.is_rank_zero():
        try:
            check_writable(run_dir, "run.output_dir")
            check_writable(run_dir / "checkpoints", "run.output_dir")
            lock = RunLock(run_dir).acquire(say=distributed.print_rank_zero)
            remove_stale_temporaries(run_dir / "checkpoints", say=distributed.print_rank_zero)
        except RunDirError as err:
            error = [str(err)]
    torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RunDirError(error[0] if distributed.is_rank_zero() else f"rank 0 refused the run dir: {error[0]}")
    return lock


def train(cfg: DictConfig, *, run_dir: Optional[Path] = None, stage: str = "sft",
          step_offset: int = 0) -> TrainResult:
    from nemotune.recipes.engine.checkpointing import Checkpointer, complete_checkpoints, refuse_other_peft_scheme
    from nemotune.recipes.engine.model import te_available
    from nemotune.recipes.engine.preemption import PreemptionHandler
    from nemotune.recipes.engine.trainer import SupervisedTrainer, step_plan

    run_dir = Path(run_dir or cfg.run.output_dir)
    # 1. distributed (nccl on GPU, gloo on CPU) and megatron's parallel state; the run dir is ours alone
    init_from_config(cfg)
    lock = prepare_run_dir(cfg, run_dir)
    try:
        # 2. the model's tokenizer (it must fit the embedding table) and the prepared data it must have produced
        hf = hf_config_of(cfg)
        tokenizer = model_tokenizer(cfg, hf)
        train_samples = load_samples(cfg, cfg.trainer.train_split, tokenizer)
        val_samples = load_samples(cfg, cfg.trainer.validation_split, tokenizer)
        plan = step_plan(cfg, len(train_samples))
        # a LoRA run dir continued as full SFT (or the reverse) is refused before anything is built
        refuse_other_peft_scheme(run_dir / "checkpoints", peft_scheme=cfg.peft.peft_scheme,
                                 resume=cfg.run.resume_if_exists, resume_from=cfg.run.resume_from)
        # 3. model: LoRA adapters trainable on the frozen base weights, or (peft=none) every weight
        lora = cfg.peft.peft_scheme == "lora"
        model = build_model(cfg, hf)
        # 4. DDP, optimizer, LR schedule over the planned steps
        model_chunks, optimizer = wrap_for_training(cfg, model)
        checkpointer = Checkpointer(run_dir / "checkpoints", adapter_config=adapter_config(cfg, hf) if lora else None,
                                    base_reference=base_reference(cfg, run_dir), save_top_k=cfg.trainer.save_top_k,
                                    resume=cfg.run.resume_if_exists, resume_from=cfg.run.resume_from,
                                    peft_scheme=cfg.peft.peft_scheme, hf_config=hf, hf_path=cfg.model.hf_path,
                                    tokenizer=tokenizer)
        preemption = PreemptionHandler()  # Slurm's pre-timeout USR1 / preemption TERM: save, requeue, exit 0
        trainer = SupervisedTrainer(
            cfg=cfg, model=model_chunks, optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer, plan.max_steps),
            train_samples=train_samples, val_samples=val_samples, pad_id=pad_id_of(tokenizer),
            seq_length=seq_length(cfg), hf_config=hf, run_dir=run_dir, checkpointer=checkpointer, stage=stage,
            step_offset=step_offset, preemption=preemption, use_packed_seq_params=te_available() and cfg.data.packing,
            data_fingerprint=data_fingerprint(cfg, cfg.trainer.train_split))
        trainer.restore()  # a refused resume stops here, before anything in the run dir changes
        if distributed.is_rank_zero():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        distributed.print_rank_zero(
            f"[{stage}] {len(train_samples)} train / {len(val_samples)} validation samples, "
            f"{trainer.max_steps} steps of {cfg.trainer.global_batch_size} "
            f"({trainer.num_microbatches} micro-batches x {trainer.dp_size} data-parallel), run dir {run_dir}")
        distributed.print_rank_zero(
            f"[{stage}] {'LoRA' if lora else 'full-parameter SFT (peft=none)'}, distributed optimizer "
            f"{'on' if distributed_optimizer(cfg) else 'off'}, recompute {cfg.trainer.recompute}, "
            f"params {str(model.config.params_dtype).replace('torch.', '')}"
            f"{' with fp32 main weights and grads' if model.config.bf16 else ''}")
        # 5. train
        state = trainer.fit()
    finally:
        if lock is not None:
            lock.release()
    # 6. the last checkpoint holds what `nemotune export` reads: the consolidated adapter, or the whole model
    done = complete_checkpoints(run_dir / "checkpoints")
    last = done[-1] if done else None
    return TrainResult(run_dir=run_dir, checkpoint=last, adapter_dir=(last / "adapter") if last and lora else None,
                       steps=state.step, finished=trainer.finished, last_val_loss=state.last_val_loss)


def main(argv: Optional[List[str]] = None) -> int:
    from nemotune.recipes.engine.config import hydra_cli

    parsed = hydra_cli(argv, HELP)
    if parsed is None:
        return 0
    print_cfg, overrides = parsed

    def run() -> int:
        cfg = compose("lora_sft", overrides)
        if print_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        validate(cfg)
        problems = prepared_data_problems(cfg, overrides)
        if problems:
            raise ConfigError(problems)
        return train_stages_or_one(cfg, train)

    return run_reporting("nemotune train", run)


def train_stages_or_one(cfg: DictConfig, train_one) -> int:
    """Every stage of a multi-stage config (recipes/two_stage.py), else the one run; `train_one(cfg, run_dir=,
    stage=, step_offset=)` trains one."""
    if cfg.stages:
        from nemotune.recipes.two_stage import run_stages

        run_stages(cfg, train=train_one)
    else:
        train_one(cfg)
    return 0


def run_reporting(verb: str, run) -> int:
    """Run a verb's body: refused config or input is one line on stderr and exit code 2; the process groups are
    torn down whatever happens."""
    try:
        return run()
    except ConfigError as err:
        print(f"{verb}: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"{verb}: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
