"""What the multi-process workers (train_parity.py, gpu_worker.py) measure, written once.

The workers run under torchrun with this folder first on sys.path, so they import it as `checks`.
"""
import json
from pathlib import Path

import torch

from nemotune.recipes.engine import batches


def tiny_run(prep, base_mcore, base_hf, *, steps: int = 4, limit_val_batches: int = 2) -> list:
    """The overrides every worker trains the tiny model with: its base, its prepared data, LoRA dim 8 and a
    short cosine schedule, validating every 2 steps."""
    return [f"model.hf_path={base_hf}", f"model.checkpoint={base_mcore}", f"data.output_dir={prep}",
            "run.tensorboard=false", "peft.lora.dim=8", "peft.lora.alpha=16", "trainer.global_batch_size=4",
            f"trainer.sft.max_steps={steps}", "trainer.sft.val_check_interval=2", "trainer.optim.lr=3e-3",
            "trainer.optim.warmup_steps=1", f"trainer.sft.limit_val_batches={limit_val_batches}",
            "trainer.train_split=sft", "trainer.validation_split=eval"]


def losses_of(run_dir: Path) -> dict:
    """{step: loss}, the last record of each step winning (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def packed_vs_unpacked(cfg, run_dir: Path, *, use_packed_seq_params: bool = False) -> dict:
    """Loss of one pack vs the same documents as separate padded rows, through the training schedule
    (`use_packed_seq_params`: the pack through Transformer Engine's THD path, as training on a GPU runs it)."""
    from nemotune.data_prep.tokenizer import load_tokenizer, model_tokenizer
    from nemotune.recipes.engine.builders import build_lora_model, init_from_config, load_samples, seq_length
    from nemotune.recipes.engine.config import hf_config_of
    from nemotune.recipes.engine.trainer import SupervisedTrainer

    init_from_config(cfg)
    packs = load_samples(cfg, "eval", load_tokenizer(*model_tokenizer(cfg.model)))
    pack = max(packs, key=lambda s: len(s.seq_start_id))
    hf = hf_config_of(cfg)
    model = build_lora_model(cfg, hf)
    with torch.no_grad():  # nonzero adapters so the LoRA path counts too (drawn on the CPU: any device)
        for name, param in model.named_parameters():
            if "linear_out" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    trainer = SupervisedTrainer(cfg=cfg, model=[model], optimizer=None, scheduler=None, train_samples=packs,
                                val_samples=packs, pad_id=0, seq_length=seq_length(cfg), hf_config=hf,
                                run_dir=run_dir, checkpointer=None, log_metrics=False,
                                use_packed_seq_params=use_packed_seq_params)
    pad_to = trainer.seq_length if trainer.pipeline else 0
    bounds = list(pack.seq_start_id) + [len(pack.input_ids)]
    docs = [batches.Sample(pack.input_ids[a:b], pack.loss_mask[a:b], [0]) for a, b in zip(bounds[:-1], bounds[1:])]
    packed, _ = trainer._run_schedule([batches.collate([pack], 0, pad_to=pad_to)], forward_only=True)
    trainer.micro_batch_size = len(docs)
    trainer.use_packed_seq_params = False
    unpacked, _ = trainer._run_schedule([batches.collate(docs, 0, pad_to=pad_to)], forward_only=True)
    return {"packed": packed, "unpacked": unpacked, "documents": len(docs)}


def plain_and_chunked_loss(model, tokens, positions, labels, mask) -> dict:
    """The model's per-token loss and every parameter's gradient through megatron's own loss path ("plain")
    and through nemotune's chunked one ("chunked"), selected with NEMOTUNE_LOSS_IMPL for each pass."""
    import os

    from nemotune.recipes.engine.loss import ENV_IMPL

    before = os.environ.get(ENV_IMPL)
    results = {}
    try:
        for impl in ("plain", "chunked"):
            os.environ[ENV_IMPL] = impl
            model.zero_grad(set_to_none=True)
            loss = model(tokens, positions, None, labels=labels, loss_mask=mask)
            (loss * mask).sum().backward()
            results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        os.environ.pop(ENV_IMPL, None) if before is None else os.environ.__setitem__(ENV_IMPL, before)
    # the chunked path ran: it skips prompt positions (loss 0) where megatron's path computes them
    assert (results["chunked"][0][mask == 0] == 0).all() and (results["plain"][0][mask == 0] > 0).all()
    return results
