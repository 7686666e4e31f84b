"""One-process worker of the GPU check (tests/test_gpu.py): the training path on whatever device is visible.

argv: <out.json> <prepared dir> <converted base dir> <hf base dir> <run root> <precision: auto|fp32|bf16>
Writes: per-step losses of 4 LoRA steps; the loss of one pack vs the same documents as separate rows
(forward only, through the trainer's own schedule); the losses of steps 3-4 after stopping at step 2 and
resuming from its checkpoint. With CUDA visible this is nccl + bf16 (+ Transformer Engine's THD packed path
when TE imports); with CUDA_VISIBLE_DEVICES="" it is the fp32 CPU reference.
"""
import json
import sys
from pathlib import Path

import torch

from nemotune.recipes.engine import batches, distributed
from nemotune.recipes.engine.config import compose
from nemotune.recipes.engine.model import te_available
from nemotune.recipes.lora_sft import train

OUT, PREP, BASE_MCORE, BASE_HF, ROOT, PRECISION = sys.argv[1:7]
ROOT = Path(ROOT)
STEPS = 4
COMMON = [f"model.hf_path={BASE_HF}", f"model.checkpoint={BASE_MCORE}", f"data.output_dir={PREP}",
          "run.tensorboard=false", "parallel=single", "peft.lora.dim=8", "peft.lora.alpha=16",
          "trainer.global_batch_size=4", f"trainer.sft.max_steps={STEPS}", "trainer.sft.val_check_interval=2",
          "trainer.optim.lr=3e-3", "trainer.optim.warmup_steps=1", "trainer.sft.limit_val_batches=1",
          "trainer.train_split=sft", "trainer.validation_split=eval", f"trainer.precision={PRECISION}"]


def losses_of(run_dir: Path) -> dict:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def config(name: str, *extra):
    return compose("lora_sft", ["experiment=tiny_lora", *COMMON, f"run.output_dir={ROOT / name}", *extra])


def packed_vs_unpacked() -> dict:
    from nemotune.data_prep.tokenizer import load_tokenizer, model_tokenizer
    from nemotune.recipes.engine.config import hf_config_of
    from nemotune.recipes.engine.trainer import SupervisedTrainer
    from nemotune.recipes.lora_sft import build_lora_model, init_from_config, load_samples, seq_length

    cfg = config("packing")
    init_from_config(cfg)
    packs = load_samples(cfg, "eval", load_tokenizer(*model_tokenizer(cfg.model)))
    pack = max(packs, key=lambda s: len(s.seq_start_id))
    hf = hf_config_of(cfg)
    model = build_lora_model(cfg, hf)
    with torch.no_grad():  # nonzero adapters so the LoRA path counts too
        for name, param in model.named_parameters():
            if "linear_out" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    trainer = SupervisedTrainer(cfg=cfg, model=[model], optimizer=None, scheduler=None, train_samples=packs,
                                val_samples=packs, pad_id=0, seq_length=seq_length(cfg), hf_config=hf,
                                run_dir=ROOT / "packing", checkpointer=None, log_metrics=False,
                                use_packed_seq_params=te_available())
    bounds = list(pack.seq_start_id) + [len(pack.input_ids)]
    docs = [batches.Sample(pack.input_ids[a:b], pack.loss_mask[a:b], [0]) for a, b in zip(bounds[:-1], bounds[1:])]
    packed, _ = trainer._run_schedule([batches.collate([pack], 0)], forward_only=True)
    trainer.micro_batch_size = len(docs)
    trainer.use_packed_seq_params = False
    unpacked, _ = trainer._run_schedule([batches.collate(docs, 0)], forward_only=True)
    return {"packed": packed, "unpacked": unpacked, "documents": len(docs)}


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": device, "te": te_available(), "precision": PRECISION}
    train(config("steps"))
    results["steps"] = losses_of(ROOT / "steps") if distributed.is_rank_zero() else None
    # stop after step 2 (a resumable checkpoint), then resume to step 4 in a new trainer
    train(config("resumed", "trainer.stop_after_steps=2"))
    train(config("resumed"))
    results["resumed"] = {k: v for k, v in losses_of(ROOT / "resumed").items() if int(k) > 2}
    results["packing"] = packed_vs_unpacked()
    if torch.cuda.is_available():
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if distributed.is_rank_zero():
        Path(OUT).write_text(json.dumps(results, indent=2))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
