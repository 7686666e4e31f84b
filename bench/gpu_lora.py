"""LoRA training throughput of the Nano-8B shape on one GPU: tokens/s/GPU, model TFLOP/s/GPU, MFU, peak memory.

The model is nvidia/Llama-3.1-Nemotron-Nano-8B-v1's shape (conf/model/nemotron_nano_8b.yaml `hf_config`) with
random weights: nothing is downloaded. It is built by nemotune.recipes.engine.model.build_gpt_model (Transformer Engine spec
when TE imports and CUDA is present), gets LoRA dim 8 / alpha 16 on all linear layers through
nemotune.recipes.engine.lora.apply_lora (the trainer's default variant), and is wrapped exactly as training wraps it
(nemotune.recipes.lora_sft.wrap_for_training: megatron DDP + optimizer). Every timed step is
`SupervisedTrainer.train_step` -- the training loop's own step (megatron's get_forward_backward_func,
answer-only per-token loss, THD packed sequences with cu_seqlens under TE) -- and its figures are the
ones the trainer logs: train/tokens_per_sec_per_gpu, train/tflops_per_gpu, train/mfu (FLOPs from
recipes/engine/flops.py, the one formula: 2/3 of dense full-FT matmul FLOPs + causal attention per document,
real tokens only), peak memory.

Data: synthetic packs of exactly `--seq` tokens (default 4096), each a run of documents whose lengths are
drawn from a log-normal fitted to FiQA chat-templated examples (median ~300 tokens, clipped to
[64, 2048]; the last document of a pack is cut to fill it), random token ids, the first ~90 tokens of
each document (the prompt) out of the loss. `--micro-batches` packs of one per step (micro-batch 1).

Precisions: bf16 (TE spec), then fp8 (TE, `hybrid` format, `--fp8-recipe`, default delayed scaling) where
the GPU supports it (compute capability >= 8.9 and TE says so). MFU is against the dense bf16 peak
(nemotune.recipes.engine.flops.PEAK_BF16_TFLOPS) for both, as published LoRA MFU figures are.

    python bench/gpu_lora.py                        # on a GPU machine: bf16 + fp8, ~5-8 min with start-up
    python bench/gpu_lora.py --precisions bf16 --steps 20
    python bench/gpu_lora.py --dry-run              # anywhere, seconds: shapes, FLOPs per step, ceiling
    python bench/gpu_lora.py --device cpu --tiny    # the same code path on the tiny model on CPU, seconds

Targets (issue 8): 1x H100, bf16, packed 4096: >= 15,000 tokens/s/GPU (>= 50% MFU); fp8 >= 27,000.
Peer: NeMo AutoModel publishes 12,473 tokens/s/GPU (40.6% MFU) for Llama-3-8B LoRA, 1x H100, bf16, 4096.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nemotune.recipes.engine.flops import PEAK_BF16_TFLOPS, lora_step_flops
from nemotune.recipes.engine.megatron_cpu import on_gpu

TARGETS = {"bf16": 15_000, "fp8": 27_000}
PEER = "NeMo AutoModel, Llama-3-8B LoRA, 1x H100 bf16 seq 4096: 12,473 tokens/s/GPU (40.6% MFU), published"
PROMPT_TOKENS = 90


def document_lengths(count: int, rng: np.random.Generator, median: float = 300.0, sigma: float = 0.6,
                     low: int = 64, high: int = 2048) -> np.ndarray:
    """FiQA-like chat-templated example lengths in tokens (log-normal, clipped)."""
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, count)), low, high).astype(int)


def synthetic_packs(num_packs: int, pack_size: int, vocab_size: int, seed: int = 0) -> list:
    """Packs of exactly pack_size tokens: consecutive documents, the last one cut to fit."""
    from nemotune.recipes.engine.batches import Sample

    rng = np.random.default_rng(seed)
    packs = []
    for _ in range(num_packs):
        lengths, room = [], pack_size
        while room > 0:
            length = int(min(document_lengths(1, rng)[0], room))
            if room - length < 16 and room != length:  # no sliver documents at the end
                length = room
            lengths.append(length)
            room -= length
        starts = np.cumsum([0] + lengths[:-1]).tolist()
        loss_mask = np.ones(pack_size, dtype=np.float32)
        for start, length in zip(starts, lengths):
            loss_mask[start:start + min(PROMPT_TOKENS, length - 1)] = 0.0
        packs.append(Sample(input_ids=rng.integers(0, vocab_size, pack_size), loss_mask=loss_mask,
                            seq_start_id=starts))
    return packs


def fp8_support() -> tuple[bool, str]:
    import torch

    if not on_gpu():
        return False, "no CUDA device"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # noqa: BLE001 - any import failure means no TE
        return False, f"transformer_engine does not import ({type(err).__name__})"
    for module, name in (("transformer_engine.pytorch.fp8", "check_fp8_support"),
                         ("transformer_engine.pytorch.quantization", "check_fp8_support")):
        try:
            check = getattr(__import__(module, fromlist=[name]), name)
            ok, reason = check()
            return bool(ok), reason or "supported"
        except (ImportError, AttributeError):
            continue
    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= (8, 9), f"compute capability {major}.{minor}"


def compose_config(args, run_dir: Path):
    from nemotune.recipes.engine.config import compose

    overrides = [f"model={'tiny' if args.tiny else args.model}", "parallel=single", f"peft.lora.dim={args.lora_dim}",
                 f"peft.lora.alpha={args.lora_alpha}", "peft.lora.target_modules=[all-linear]",
                 "trainer.micro_batch_size=1", f"trainer.global_batch_size={args.micro_batches}",
                 "trainer.optim.warmup_steps=1", f"run.output_dir={run_dir}", "run.tensorboard=false",
                 f"trainer.precision={'bf16' if args.device == 'cuda' else 'fp32'}"]
    return compose("lora_sft", overrides)


def fp8_overrides(recipe: str) -> dict:
    overrides = {"fp8": "hybrid", "fp8_recipe": recipe}
    if recipe == "delayed":
        overrides.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_margin=0)
    return overrides


def run_precision(args, precision: str) -> dict:
    """Build, warm up and time one precision; every figure comes from SupervisedTrainer.train_step."""
    import torch
    from omegaconf import OmegaConf

    from nemotune.recipes.engine import distributed
    from nemotune.recipes.engine.config import LoraConfig
    from nemotune.recipes.engine.lora import apply_lora
    from nemotune.recipes.engine.builders import build_scheduler, wrap_for_training
    from nemotune.recipes.engine.model import build_gpt_model, te_available
    from nemotune.recipes.engine.trainer import SupervisedTrainer

    with tempfile.TemporaryDirectory(prefix="bench_gpu_lora_") as tmp:
        cfg = compose_config(args, Path(tmp))
        distributed.init_distributed(seed=cfg.run.seed)
        hf = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        use_te = te_available()
        overrides = fp8_overrides(args.fp8_recipe) if precision == "fp8" else {}
        if on_gpu():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = build_gpt_model(hf, params_dtype=dtype, calculate_per_token_loss=True, **overrides)
        summary = apply_lora(model, LoraConfig.of(cfg.peft.lora), seed=cfg.run.seed)
        chunks, optimizer = wrap_for_training(cfg, model)
        packs = synthetic_packs(args.micro_batches * (args.warmup + args.steps), args.seq, hf["vocab_size"],
                                seed=args.seed)
        trainer = SupervisedTrainer(
            cfg=cfg, model=chunks, optimizer=optimizer,
            scheduler=build_scheduler(cfg, optimizer, args.warmup + args.steps), train_samples=packs, val_samples=packs,
            pad_id=0, seq_length=args.seq, hf_config=hf, run_dir=Path(tmp), checkpointer=None,
            log_metrics=False, use_packed_seq_params=use_te)
        for chunk in chunks:
            chunk.train()
        build_s = time.perf_counter() - start
        rows = []
        for step in range(args.warmup + args.steps):
            indices = np.arange(step * args.micro_batches, (step + 1) * args.micro_batches)
            m = trainer.train_step(indices)
            if not np.isfinite(m["train/loss"]):
                raise RuntimeError(f"{precision}: loss is {m['train/loss']} at step {step + 1}")
            label = "warm-up" if step < args.warmup else "timed"
            distributed.print_rank_zero(
                f"  [{precision if args.device == 'cuda' else 'fp32'}] step {step + 1:>3} ({label:7}) loss {m['train/loss']:.4f} | "
                f"{m['train/step_time'] * 1e3:8.1f} ms | {m['train/tokens_per_sec_per_gpu']:9.1f} tokens/s/GPU | "
                f"{m['train/tflops_per_gpu']:7.4g} TFLOP/s | MFU {_percent(m['train/mfu'])}")
            if step >= args.warmup:
                rows.append(m)
        docs = [l for p in packs for l in p.document_lengths]
        result = {
            "precision": precision,
            "te_spec": use_te,
            "tokens_per_s_per_gpu": statistics.median(r["train/tokens_per_sec_per_gpu"] for r in rows),
            "tflops_per_gpu": statistics.median(r["train/tflops_per_gpu"] for r in rows),
            "mfu": None if rows[0]["train/mfu"] is None else statistics.median(r["train/mfu"] for r in rows),
            "step_time_s": statistics.median(r["train/step_time"] for r in rows),
            "peak_mem_gib": max(r["train/peak_mem_gib"] for r in rows),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu() else None,
            "trainable_parameters": summary.trainable_parameters,
            "total_parameters": summary.total_parameters,
            "documents_per_pack": len(docs) / len(packs),
            "median_document_tokens": float(np.median(docs)),
            "build_s": build_s,
            "last_loss": rows[-1]["train/loss"],
        }
        del trainer, chunks, optimizer, model
        gc.collect()
        if on_gpu():
            torch.cuda.empty_cache()
    return result


def _percent(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def dry_run(args) -> dict:
    """Shapes and FLOP accounting only (meta device): runs anywhere in seconds."""
    from omegaconf import OmegaConf

    from nemotune.recipes.engine.config import LoraConfig
    from nemotune.recipes.engine.lora import apply_lora
    from nemotune.recipes.engine.model import build_gpt_model

    cfg = compose_config(args, Path(tempfile.gettempdir()))
    hf = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    model = build_gpt_model(hf, device="meta")
    summary = apply_lora(model, LoraConfig.of(cfg.peft.lora))
    packs = synthetic_packs(args.micro_batches, args.seq, hf["vocab_size"], seed=args.seed)
    docs = [l for p in packs for l in p.document_lengths]
    step_flops = lora_step_flops(hf, docs)
    per_token = step_flops / sum(docs)
    ceiling = PEAK_BF16_TFLOPS["H100"] * 1e12 / per_token
    return {"model": cfg.model.name, "trainable_parameters": summary.trainable_parameters,
            "total_parameters": summary.total_parameters, "tokens_per_step": sum(docs),
            "documents_per_pack": len(docs) / len(packs), "median_document_tokens": float(np.median(docs)),
            "flops_per_step": step_flops, "flops_per_token": per_token,
            "h100_ceiling_tokens_per_s_at_100pct_mfu": ceiling,
            "tokens_per_s_at_50pct_mfu": ceiling / 2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nemotron_nano_8b", help="conf/model/<name>.yaml (its hf_config)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead (CPU smoke test)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seq", type=int, help="pack size in tokens (default 4096; 512 with --tiny)")
    parser.add_argument("--micro-batches", type=int, default=4, help="packs per step (micro-batch 1 each)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--lora-dim", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic packs")
    parser.add_argument("--dry-run", action="store_true", help="shapes and FLOPs only, no training step")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.seq = args.seq or (512 if args.tiny else 4096)
    command = "python bench/gpu_lora.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    import torch

    results = {"command": command, "date": time.strftime("%Y-%m-%d"), "seq": args.seq,
               "micro_batches": args.micro_batches, "lora_dim": args.lora_dim}
    if args.dry_run:
        results["dry_run"] = plan = dry_run(args)
        print(f"{plan['model']}: LoRA dim {args.lora_dim} all-linear, {plan['trainable_parameters']:,} trainable / "
              f"{plan['total_parameters']:,}")
        print(f"step: {args.micro_batches} packs x {args.seq} tokens, {plan['documents_per_pack']:.1f} documents "
              f"per pack (median {plan['median_document_tokens']:.0f} tokens)")
        print(f"FLOPs per step {plan['flops_per_step']:.4e} ({plan['flops_per_token'] / 1e9:.2f} GFLOP/token, "
              f"recipes/engine/flops.py); 1x H100 at 100% MFU = {plan['h100_ceiling_tokens_per_s_at_100pct_mfu']:,.0f} "
              f"tokens/s, at 50% = {plan['tokens_per_s_at_50pct_mfu']:,.0f}")
    else:
        if args.device == "cuda" and not on_gpu():
            print("gpu_lora: no CUDA device here; use --dry-run, or --device cpu --tiny for the CPU smoke run",
                  file=sys.stderr)
            return 2
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        results["device"] = device_name
        from nemotune.recipes.engine.model import te_available

        if args.device == "cuda" and not te_available():
            print("WARNING: transformer_engine does not import: the local (unfused) spec runs, not the benchmark's "
                  "TE configuration; its figures are not comparable with the targets", file=sys.stderr)
        print(f"device {device_name}; {'Nano-8B shape' if not args.tiny else 'tiny model'}, random weights, "
              f"LoRA dim {args.lora_dim} all-linear, {args.micro_batches} packs x {args.seq} tokens per step, "
              f"{args.warmup} warm-up + {args.steps} timed steps")
        for precision in args.precisions:
            if precision == "fp8":
                ok, reason = fp8_support()
                if not ok:
                    print(f"[fp8] skipped: {reason}")
                    results["fp8"] = {"skipped": reason}
                    continue
            label = precision if args.device == "cuda" else "fp32"  # CPU runs fp32, as training does there
            if label in results:
                continue
            results[label] = run_precision(args, precision)
            results[label]["precision"] = label
        from nemotune.recipes.engine import distributed

        distributed.destroy_distributed()
        print()
        print(f"{'precision':<10} {'tokens/s/GPU':>13} {'TFLOP/s/GPU':>12} {'MFU (bf16 peak)':>16} {'peak mem GiB':>13} "
              f"{'target':>8}")
        for precision in ("bf16", "fp8", "fp32"):
            r = results.get(precision, {})
            if "tokens_per_s_per_gpu" not in r:
                continue
            mfu = _percent(r["mfu"])
            print(f"{precision:<10} {r['tokens_per_s_per_gpu']:13,.0f} {r['tflops_per_gpu']:12.4g} {mfu:>16} "
                  f"{r['peak_mem_gib']:13.2f} {TARGETS.get(precision, '-') if not args.tiny else '-':>8}")
        ran = [results[p] for p in ("bf16", "fp8", "fp32") if "te_spec" in results.get(p, {})]
        print(f"Transformer Engine spec: {ran[0]['te_spec'] if ran else 'n/a'}; peer: {PEER}")
    print(f"reproduce: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
