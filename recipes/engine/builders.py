"""The pieces a training or evaluation story is built from, each from the composed config: process groups,
prepared samples, the LoRA model on its frozen base, DDP + optimizer, the LR schedule, the base reference.

Training (`nemotune.recipes.lora_sft`) and evaluation (`nemotune.recipes.engine.evaluation`) call these
in order; nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig

from nemotune.recipes.engine import batches, distributed
from nemotune.recipes.engine.config import LoraConfig, distributed_optimizer


def prepared_split_path(cfg: DictConfig, split: str) -> Path:
    from nemotune.data_prep import formats

    out = Path(cfg.data.output_dir)
    if cfg.data.packing:
        return Path(formats.packed_path(out, split, cfg.data.pack_size, cfg.data.seed))
    return Path(formats.tokenized_path(out, split))


def model_tokenizer(cfg: DictConfig, hf: dict):
    """The tokenizer training uses: the model's own unless model.tokenizer names another (see
    data_prep/tokenizer.py:model_tokenizer), refused when it has more ids than the embedding table."""
    from nemotune.data_prep.tokenizer import load_tokenizer, model_tokenizer as resolve

    name, key = resolve(cfg.model)
    tokenizer = load_tokenizer(name, key=key)
    tokenizer.nemotune_key = key
    vocab = int(hf.get("vocab_size") or 0)
    if len(tokenizer) > vocab:
        source = f"model.hf_path={cfg.model.hf_path}" if cfg.model.hf_path else f"model={cfg.model.name}"
        raise ValueError(f"{key}={name}: the tokenizer has {len(tokenizer)} ids but the model's embedding table "
                         f"({source}) has vocab_size={vocab}: they do not belong together; set model.tokenizer="
                         f"null to use the model's own tokenizer, or name the one it was trained with")
    return tokenizer


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
        key = getattr(tokenizer, "nemotune_key", "model.tokenizer")
        differs = ", ".join(k for k in ("tokenizer_json_sha256", "chat_template_sha256", "vocab_size")
                            if expected.get(k) != found.get(k))
        raise ValueError(f"data.output_dir={out} was tokenized by another tokenizer ({found.get('name')}) than "
                         f"the one training uses, {key}={expected['name']} ({differs} differ; tokenizer.json sha256 "
                         f"{str(found.get('tokenizer_json_sha256'))[:12]} vs {expected['tokenizer_json_sha256'][:12]}"
                         f"); re-run `nemotune prep` with the same model settings (model={cfg.model.name}"
                         f"{' model.hf_path=' + str(cfg.model.hf_path) if cfg.model.hf_path else ''}), or set "
                         f"model.tokenizer={found.get('name')} if that is the tokenizer you mean")
    if cfg.data.packing:
        records = formats.load_packed(prepared_split_path(cfg, split))
    else:
        records = formats.load_tokenized(prepared_split_path(cfg, split))
    samples = [batches.sample_from_record(r, label_aligned=cfg.data.packing) for r in records]
    if not samples:
        raise ValueError(f"split {split!r} of {out} is empty")
    return samples


def data_fingerprint(cfg: DictConfig, split: str) -> Optional[str]:
    """sha256 of the prepared file a split is read from, as the prep manifest records it (what a resume
    compares: other data means another data order)."""
    out = Path(cfg.data.output_dir)
    path = prepared_split_path(cfg, split)
    try:
        outputs = json.loads((out / "manifest.json").read_text()).get("outputs", {})
    except (OSError, ValueError):
        outputs = {}
    recorded = outputs.get(str(path.relative_to(out))) if path.is_relative_to(out) else None
    if recorded:
        return recorded
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_config(cfg: DictConfig, hf: dict) -> dict:
    from nemotune.recipes.engine.lora import resolve_targets

    lora = cfg.peft.lora
    if hf.get("family") == "nemotron_h":
        from nemotune.recipes.engine.hybrid_training import resolve_hybrid_targets

        targets = resolve_hybrid_targets(list(lora.target_modules))
    else:
        targets = resolve_targets(list(lora.target_modules), gated=hf.get("gated_mlp", True))
    return {"dim": lora.dim, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": targets,
            "layer_selection": None if lora.layer_selection is None else list(lora.layer_selection),
            "variant": lora.variant, "base_model": hf, "base_model_name_or_path": cfg.model.hf_path or cfg.model.hub_id,
            "base_checkpoint": cfg.model.checkpoint}


def check_base_shapes(model, cfg: DictConfig) -> None:
    """Refuse a base checkpoint of another model before loading it: the first tensor whose shape differs,
    both shapes and both model sources."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nemotune.converters.formats.checkpoint import open_megatron_checkpoint

    with open_megatron_checkpoint(cfg.model.checkpoint) as (_, weights, prefix, _aux):
        available = dist_checkpointing.load_tensors_metadata(str(weights))
    ours = cfg.model.hf_path or "model.hf_config"
    for key, tensor in model.sharded_state_dict().items():
        if not isinstance(tensor, ShardedTensor):
            continue
        theirs = available.get(prefix + tensor.key)
        if theirs is None or not hasattr(theirs, "global_shape"):
            continue
        if tuple(theirs.global_shape) != tuple(tensor.global_shape):
            raise ValueError(
                f"model.checkpoint={cfg.model.checkpoint} holds another model than model.hf_path={ours}: "
                f"tensor {tensor.key} is {list(theirs.global_shape)} in the checkpoint but "
                f"{list(tensor.global_shape)} for {ours}; convert this model's own weights "
                f"(`nemotune convert hf-to-megatron --hf {ours}`) or point model.hf_path at the checkpoint's model")


def recompute_overrides(recompute: str) -> dict:
    """TransformerConfig fields for `trainer.recompute`: selective recomputes core attention (megatron's
    default recompute_modules); full recomputes every layer from its input, one layer per group."""
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def build_model(cfg: DictConfig, hf: dict):
    """GPTModel for this pipeline stage with the base weights loaded. peft.peft_scheme=lora freezes them and
    applies (and restores) LoRA; none leaves every weight trainable (full-parameter SFT). A Nemotron-H config
    builds megatron-core's hybrid model the same way (recipes/engine/hybrid_training.py)."""
    from nemotune.converters.formats.checkpoint import load_megatron_weights
    from nemotune.recipes.engine.lora import print_trainable
    from nemotune.recipes.engine.model import build_gpt_model

    if hf.get("family") == "nemotron_h":
        from nemotune.recipes.engine.hybrid_training import build_training_model

        return build_training_model(cfg, hf, lora=cfg.peft.peft_scheme == "lora")
    precision = cfg.trainer.precision
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    model = build_gpt_model(hf, params_dtype=params_dtype,
                            sequence_parallel=cfg.parallel.sequence_parallel,
                            calculate_per_token_loss=True, **recompute_overrides(cfg.trainer.recompute))
    if cfg.model.checkpoint:
        check_base_shapes(model, cfg)
        load_megatron_weights(model, cfg.model.checkpoint)
    if cfg.peft.peft_scheme == "lora":
        _apply_lora(model, cfg, hf)
    print_trainable(model)
    return model


build_lora_model = build_model  # the name evaluation and the benches call it by


def _apply_lora(model, cfg: DictConfig, hf: dict) -> None:
    from nemotune.recipes.engine.lora import apply_lora, load_adapter_state

    lora = LoraConfig.of(cfg.peft.lora)
    apply_lora(model, lora, seed=cfg.run.seed)
    if cfg.peft.restore_from:
        from nemotune.converters.formats.adapters import load_adapter

        state, _ = load_adapter(restore_dir(cfg.peft.restore_from), variant=lora.variant, base_config=hf)
        load_adapter_state(model, state)


def build_base_model(cfg: DictConfig, hf: dict):
    """The frozen base alone (evaluation without an adapter)."""
    from nemotune.converters.formats.checkpoint import load_megatron_weights
    from nemotune.recipes.engine.model import build_gpt_model

    if hf.get("family") == "nemotron_h":
        from nemotune.recipes.engine.hybrid_training import build_training_model

        return build_training_model(cfg, hf, lora=False, trainable=False)
    model = build_gpt_model(hf, calculate_per_token_loss=True)
    if cfg.model.checkpoint:
        check_base_shapes(model, cfg)
        load_megatron_weights(model, cfg.model.checkpoint)
    for param in model.parameters():
        param.requires_grad = False
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
    """megatron DDP (the trainable weights only in grad buckets: adapters for LoRA, all for full SFT) and its
    optimizer (distributed over data parallel per `distributed_optimizer(cfg)`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer

    config = model.config
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer(cfg)))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(optimizer_config(cfg, config), [ddp])
    return [ddp], optimizer


def optimizer_config(cfg: DictConfig, model_config):
    """megatron-core's OptimizerConfig for `trainer.optim` (name: adamw, adam or sgd; validate() refuses others).
    bf16 parameters (GPU) train through fp32 main weights and fp32 grads (bf16=True); fp32 ones directly."""
    from megatron.core.optimizer import OptimizerConfig

    optim = cfg.trainer.optim
    return OptimizerConfig(optimizer="sgd" if optim.name == "sgd" else "adam",
                           decoupled_weight_decay=optim.name == "adamw", sgd_momentum=optim.momentum,
                           lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                           adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                           clip_grad=cfg.trainer.sft.gradient_clip_val, bf16=model_config.bf16,
                           params_dtype=model_config.params_dtype,
                           use_distributed_optimizer=distributed_optimizer(cfg))


def build_scheduler(cfg: DictConfig, optimizer, max_steps: int):
    """Cosine (or the configured style) with warmup over `max_steps`.

    On resume the schedule is taken from this config and only the step count from the checkpoint
    (megatron's `override_opt_param_scheduler`): a raised max_steps stretches the schedule to the new end.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optim = cfg.trainer.optim
    warmup = min(optim.warmup_steps, max(max_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max_steps + 1, lr_decay_style=optim.scheduler,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max_steps + 1,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    # step k (1-based) trains at schedule(k): warmup starts at lr/warmup, and the last step is not at min_lr
    scheduler.step(increment=1)
    return scheduler


def seq_length(cfg: DictConfig) -> int:
    return cfg.data.pack_size if cfg.data.packing else cfg.data.max_seq_length


def init_from_config(cfg: DictConfig) -> None:
    par = cfg.parallel
    distributed.init_distributed(tensor_model_parallel_size=par.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                                 context_parallel_size=par.context_parallel_size, seed=cfg.run.seed)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
