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

from checks import losses_of, packed_vs_unpacked, tiny_run

from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.config import compose
from nemotune.recipes.engine.model import te_available
from nemotune.recipes.lora_sft import train

OUT, PREP, BASE_MCORE, BASE_HF, ROOT, PRECISION = sys.argv[1:7]
ROOT = Path(ROOT)
STEPS = 4
COMMON = [*tiny_run(PREP, BASE_MCORE, BASE_HF, steps=STEPS, limit_val_batches=1), "parallel=single",
          f"trainer.precision={PRECISION}"]




def config(name: str, *extra):
    return compose("lora_sft", ["experiment=tiny_lora", *COMMON, f"run.output_dir={ROOT / name}", *extra])




def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": device, "te": te_available(), "precision": PRECISION}
    train(config("steps"))
    results["steps"] = losses_of(ROOT / "steps") if distributed.is_rank_zero() else None
    # stop after step 2 (a resumable checkpoint), then resume to step 4 in a new trainer
    train(config("resumed", "trainer.stop_after_steps=2"))
    train(config("resumed"))
    results["resumed"] = {k: v for k, v in losses_of(ROOT / "resumed").items() if int(k) > 2}
    results["packing"] = packed_vs_unpacked(config("packing"), ROOT / "packing", use_packed_seq_params=te_available())
    if torch.cuda.is_available():
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if distributed.is_rank_zero():
        Path(OUT).write_text(json.dumps(results, indent=2))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
