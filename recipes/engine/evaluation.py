"""Answer-token loss and perplexity with the training engine's Megatron model (`nemotune eval`'s
`eval.megatron_loss`): the SupervisedTrainer's validation pass over a whole prepared split."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from nemotune.recipes.engine import builders, distributed


@torch.no_grad()
def evaluate_loss(cfg: DictConfig, split: str, adapter_dir: Optional[str] = None,
                  with_lora: bool = True) -> dict:
    """Answer-token loss and perplexity of base (+ adapter) on a prepared split, with the Megatron model.

    Outside torchrun this runs as one process (TP = PP = 1) whatever the training layout was.
    """
    from nemotune.recipes.engine.config import hf_config_of
    from nemotune.recipes.engine.trainer import SupervisedTrainer

    cfg = cfg.copy()
    cfg.stages = []
    if adapter_dir:
        cfg.peft.restore_from = str(adapter_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
        cfg.parallel.context_parallel_size = 1
        cfg.parallel.sequence_parallel = False
    builders.init_from_config(cfg)
    hf = hf_config_of(cfg)
    tokenizer = builders.model_tokenizer(cfg, hf)
    samples = builders.load_samples(cfg, split, tokenizer)
    model = builders.build_lora_model(cfg, hf) if with_lora else builders.build_base_model(cfg, hf)
    cfg.trainer.sft.limit_val_batches = 1.0
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size * max(
        1, distributed.world_size() // (cfg.parallel.tensor_model_parallel_size *
                                         cfg.parallel.pipeline_model_parallel_size))
    evaluator = SupervisedTrainer(
        cfg=cfg, model=[model], optimizer=None, scheduler=None, train_samples=samples,
        val_samples=samples, pad_id=builders.pad_id_of(tokenizer), seq_length=builders.seq_length(cfg),
        hf_config=hf, run_dir=Path(cfg.run.output_dir), checkpointer=None, stage="eval", log_metrics=False)
    loss = evaluator.validate()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": evaluator.last_val_tokens,
            "samples": len(samples)}
