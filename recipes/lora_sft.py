"""LoRA supervised fine-tuning on megatron-core: the recipe, top to bottom.

    nemotune train experiment=<name> key=value ...      (or: python -m nemotune.recipes.lora_sft ...)
    torchrun --nproc_per_node 2 -m nemotune.recipes.lora_sft parallel=tp2 ...

validate config -> init distributed -> tokenizer -> prepared data -> model (+ base weights) -> LoRA ->
DDP + optimizer + LR schedule -> SupervisedTrainer.fit() -> consolidated adapter -> cleanup.
A config with `stages` (conf/experiment/*two_stage*.yaml) runs each stage in turn (recipes/two_stage.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from nemotune.recipes.engine import batches, distributed
from nemotune.recipes.engine.config import ConfigError, compose, prepared_data_problems, validate

HELP = """usage: nemotune train [experiment=<name>] [key=value ...]

Fine-tune a Megatron GPT model with LoRA on data prepared by `nemotune prep`.
Config: conf/lora_sft.yaml composes the groups model/ data/ peft/ parallel/ trainer/ cluster/;
experiment=<name> applies conf/experiment/<name>.yaml. Any key can be overridden, e.g.
  trainer.optim.lr=5e-5 trainer.sft.max_steps=100 peft.lora.dim=8 parallel=tp2
Multi-process: torchrun --nproc_per_node 2 -m nemotune.recipes.lora_sft parallel=tp2 ...
                or nemotune launch ... (local torchrun or Slurm).
  --cfg       print the composed config and exit
  -h, --help  this help
"""


# ---- setup helpers (each step of the story is called from train() below) ---------------------------

def load_samples(cfg: DictConfig, split: str, tokenizer) -> List[batches.Sample]:
    """Packed or per-example samples of one split, refusing data made by another tokenizer."""
    from nemotune.data_prep import formats
    from nemotune.data_prep.tokenizer import same_tokenizer, tokenizer_fingerprint

    from nemotune.recipes.engine.config import prep_command, split_problem

    out = Path(cfg.data.output_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"data.output_dir={out}: no prepared data (manifest.json); run `nemotune prep` "
                                f"with this run's experiment= / data.* / model.* overrides first")
    manifest = formats.read_manifest(out)
    key = "trainer.train_split" if split == cfg.trainer.train_split else "trainer.validation_split"
    problem = split_problem(out, manifest, key, split, prep_command())
    if problem:
        raise FileNotFoundError(problem)
    expected, found = tokenizer_fingerprint(tokenizer), manifest.get("tokenizer", {})
    if not same_tokenizer(expected, found):
        raise ValueError(f"data.output_dir={out} was tokenized by another tokenizer ({found.get('name')}, "
                         f"tokenizer.json sha256 {str(found.get('tokenizer_json_sha256'))[:12]}) than the "
                         f"model's {cfg.model.tokenizer} ({expected['tokenizer_json_sha256'][:12]}); re-run "
                         f"`nemotune prep` with model={cfg.model.name}")
    if cfg.data.packing:
        path = formats.packed_path(out, split, cfg.data.pack_size, cfg.data.seed)
        records = formats.load_packed(path)
    else:
        records = formats.load_tokenized(formats.tokenized_path(out, split))
    samples = [batches.sample_from_record(r, label_aligned=cfg.data.packing) for r in records]
    if not samples:
        raise ValueError(f"split {split!r} of {out} is empty")
    return samples


def adapter_config(cfg: DictConfig, hf: dict) -> dict:
    from nemotune.recipes.engine.lora import resolve_targets

    lora = cfg.peft.lora
    return {"dim": lora.dim, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": resolve_targets(list(lora.target_modules)),
            "layer_selection": None if lora.layer_selection is None else list(lora.layer_selection),
            "variant": lora.variant, "base_model": hf, "base_model_name_or_path": cfg.model.hf_path or cfg.model.tokenizer,
            "base_checkpoint": cfg.model.checkpoint}


def build_lora_model(cfg: DictConfig, hf: dict):
    """GPTModel for this pipeline stage, base weights loaded and frozen, LoRA applied (and restored)."""
    from nemotune.converters.formats.checkpoint import load_megatron_weights
    from nemotune.recipes.engine.lora import LoraConfig, apply_lora, load_adapter_state, print_trainable
    from nemotune.recipes.engine.model import build_gpt_model

    precision = cfg.trainer.precision
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    model = build_gpt_model(hf, params_dtype=params_dtype,
                            sequence_parallel=cfg.parallel.sequence_parallel,
                            calculate_per_token_loss=True)
    if cfg.model.checkpoint:
        load_megatron_weights(model, cfg.model.checkpoint)
    lora = cfg.peft.lora
    apply_lora(model, LoraConfig(dim=lora.dim, alpha=lora.alpha, dropout=lora.dropout,
                                 target_modules=list(lora.target_modules),
                                 layer_selection=None if lora.layer_selection is None
                                 else list(lora.layer_selection),
                                 init_method_a=lora.init_method_a, variant=lora.variant, seed=cfg.run.seed))
    if cfg.peft.restore_from:
        from nemotune.converters.formats.adapters import load_adapter

        state, _ = load_adapter(restore_dir(cfg.peft.restore_from), variant=lora.variant, base_config=hf)
        load_adapter_state(model, state)
    print_trainable(model)
    return model


def restore_dir(path: str) -> Path:
    """An adapter dir, or a training checkpoint / run dir holding one (the latest checkpoint's adapter)."""
    from nemotune.recipes.engine.checkpointing import complete_checkpoints

    path = Path(path)
    if (path / "adapter").is_dir():
        return path / "adapter"
    done = complete_checkpoints(path / "checkpoints")
    return done[-1] / "adapter" if done else path


def wrap_for_training(cfg: DictConfig, model):
    """megatron DDP (adapters only in grad buckets), its optimizer and a cosine schedule with warmup."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optim = cfg.trainer.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                        clip_grad=cfg.trainer.sft.gradient_clip_val, bf16=config.bf16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
        [ddp])
    return [ddp], optimizer


def build_scheduler(cfg: DictConfig, optimizer, max_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optim = cfg.trainer.optim
    warmup = min(optim.warmup_steps, max(max_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max_steps + 1, lr_decay_style=optim.scheduler,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max_steps + 1,
        wd_incr_style="constant")
    # step k (1-based) trains at schedule(k): warmup starts at lr/warmup, and the last step is not at min_lr
    scheduler.step(increment=1)
    return scheduler


def base_reference(cfg: DictConfig) -> dict:
    """Path + content hash of the frozen base: hashed once on rank 0 (8B = 16 GB read), shared with all."""
    from nemotune.recipes.engine.checkpointing import sha256_of_path

    path = cfg.model.checkpoint
    digest = [sha256_of_path(path) if path and distributed.is_rank_zero() else None]
    if path:
        torch.distributed.broadcast_object_list(digest, src=0)
    return {"path": path, "sha256": digest[0], "model": cfg.model.name}


def seq_length(cfg: DictConfig) -> int:
    return cfg.data.pack_size if cfg.data.packing else cfg.data.max_seq_length


def init_from_config(cfg: DictConfig) -> None:
    par = cfg.parallel
    distributed.init_distributed(tensor_model_parallel_size=par.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                                 context_parallel_size=par.context_parallel_size, seed=cfg.run.seed)


def hf_config_of(cfg: DictConfig) -> dict:
    from nemotune.converters.formats.hf_config import load_hf_config

    return load_hf_config(cfg.model.hf_path or OmegaConf.to_container(cfg.model.hf_config, resolve=True))


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Optional[Path]
    adapter_dir: Optional[Path]
    steps: int
    finished: bool
    last_val_loss: Optional[float]


# ---- the recipe ----------------------------------------------------------------------------------

def train(cfg: DictConfig, *, run_dir: Optional[Path] = None, stage: str = "sft",
          step_offset: int = 0) -> TrainResult:
    from nemotune.data_prep.tokenizer import load_tokenizer
    from nemotune.recipes.engine.preemption import PreemptionHandler
    from nemotune.recipes.engine.checkpointing import Checkpointer, complete_checkpoints
    from nemotune.recipes.engine.model import te_available
    from nemotune.recipes.engine.trainer import SupervisedTrainer

    run_dir = Path(run_dir or cfg.run.output_dir)
    # 1. distributed (nccl on GPU, gloo on CPU) and megatron's parallel state
    init_from_config(cfg)
    # 2. tokenizer and the prepared data it must have produced
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_samples = load_samples(cfg, cfg.trainer.train_split, tokenizer)
    val_samples = load_samples(cfg, cfg.trainer.validation_split, tokenizer)
    # 3. model: base weights frozen, LoRA adapters trainable
    hf = hf_config_of(cfg)
    model = build_lora_model(cfg, hf)
    # 4. DDP, optimizer, LR schedule
    model_chunks, optimizer = wrap_for_training(cfg, model)
    checkpointer = Checkpointer(run_dir / "checkpoints", adapter_config=adapter_config(cfg, hf),
                                base_reference=base_reference(cfg), save_top_k=cfg.trainer.save_top_k,
                                resume=cfg.run.resume_if_exists)
    preemption = PreemptionHandler()  # Slurm's pre-timeout USR1 / preemption TERM: save, requeue, exit 0
    trainer = SupervisedTrainer(
        cfg=cfg, model=model_chunks, optimizer=optimizer, scheduler=None, train_samples=train_samples,
        val_samples=val_samples, pad_id=pad_id, seq_length=seq_length(cfg), hf_config=hf, run_dir=run_dir,
        checkpointer=checkpointer, stage=stage, step_offset=step_offset, preemption=preemption,
        use_packed_seq_params=te_available() and cfg.data.packing)
    trainer.scheduler = build_scheduler(cfg, optimizer, trainer.max_steps)
    if distributed.is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    distributed.print_rank_zero(
        f"[{stage}] {len(train_samples)} train / {len(val_samples)} validation samples, "
        f"{trainer.max_steps} steps of {cfg.trainer.global_batch_size} "
        f"({trainer.num_microbatches} micro-batches x {trainer.dp_size} data-parallel), run dir {run_dir}")
    # 5. train
    state = trainer.fit()
    # 6. the last checkpoint holds the consolidated adapter that `nemotune export` reads
    done = complete_checkpoints(run_dir / "checkpoints")
    last = done[-1] if done else None
    return TrainResult(run_dir=run_dir, checkpoint=last, adapter_dir=(last / "adapter") if last else None,
                       steps=state.step, finished=trainer.finished, last_val_loss=state.last_val_loss)


@torch.no_grad()
def evaluate_loss(cfg: DictConfig, split: str, adapter_dir: Optional[str] = None,
                  with_lora: bool = True) -> dict:
    """Answer-token loss and perplexity of base (+ adapter) on a prepared split, with the Megatron model.

    Outside torchrun this runs as one process (TP = PP = 1) whatever the training layout was.
    """
    import math

    from nemotune.data_prep.tokenizer import load_tokenizer
    from nemotune.recipes.engine.trainer import SupervisedTrainer

    cfg = cfg.copy()
    cfg.stages = []
    if adapter_dir:
        cfg.peft.restore_from = str(adapter_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
        cfg.parallel.context_parallel_size = 1
        cfg.parallel.sequence_parallel = False
    init_from_config(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = load_samples(cfg, split, tokenizer)
    hf = hf_config_of(cfg)
    model = build_lora_model(cfg, hf) if with_lora else _base_only(cfg, hf)
    cfg.trainer.sft.limit_val_batches = 1.0
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size * max(
        1, distributed.world_size() // (cfg.parallel.tensor_model_parallel_size *
                                         cfg.parallel.pipeline_model_parallel_size))
    evaluator = SupervisedTrainer(
        cfg=cfg, model=[model], optimizer=None, scheduler=None, train_samples=samples,
        val_samples=samples, pad_id=pad_id, seq_length=seq_length(cfg), hf_config=hf,
        run_dir=Path(cfg.run.output_dir), checkpointer=None, stage="eval", log_metrics=False)
    loss = evaluator.validate()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": evaluator.last_val_tokens,
            "samples": len(samples)}


def _base_only(cfg: DictConfig, hf: dict):
    from nemotune.converters.formats.checkpoint import load_megatron_weights
    from nemotune.recipes.engine.model import build_gpt_model

    model = build_gpt_model(hf, calculate_per_token_loss=True)
    if cfg.model.checkpoint:
        load_megatron_weights(model, cfg.model.checkpoint)
    for param in model.parameters():
        param.requires_grad = False
    return model


def main(argv: Optional[List[str]] = None) -> int:
    from nemotune.recipes.engine.config import hydra_cli

    parsed = hydra_cli(argv, HELP)
    if parsed is None:
        return 0
    print_cfg, overrides = parsed
    try:
        cfg = compose("lora_sft", overrides)
        if print_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        validate(cfg)
        problems = prepared_data_problems(cfg, overrides)
        if problems:
            raise ConfigError(problems)
        if cfg.stages:
            from nemotune.recipes.two_stage import run_stages

            run_stages(cfg)
        else:
            train(cfg)
    except ConfigError as err:
        print(f"nemotune train: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"nemotune train: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
