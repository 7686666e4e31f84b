"""`nemotune plan` against measured peaks: each configuration trains in a fresh process, its peak RSS is compared
with the planner's prediction for the same model, layout, batch, sequence and LoRA.

Each run is a child process (`--child`) that builds the model exactly as bench/gpu_lora.py does on CPU
(nemotune.recipes.engine.model.build_gpt_model, apply_lora, nemotune.recipes.lora_sft.wrap_for_training:
megatron DDP + optimizer) with random weights and runs `--steps` steps of SupervisedTrainer.train_step -- the
trainer's own step -- on synthetic packs of random token ids (bench/gpu_lora.synthetic_packs: FiQA-like
document lengths, no tokenizer needed). fp32 on CPU, 1 torch thread, one process (TP = PP = DP = 1).
Peak = VmHWM of /proc/self/status at the end (the whole process: Python, torch, megatron-core, weights,
optimizer, activations, logits). Not ru_maxrss: Linux carries the forking parent's RSS into it across exec, so
a child of a large process (a pytest run) would report the parent's size. The child also reports its RSS just before the model is built
(imports + torch.distributed + megatron parallel state), which is what the planner's CPU runtime constant
stands for.

    python bench/plan_accuracy.py                     # every configuration, one at a time (~3-5 min here)
    python bench/plan_accuracy.py --only tiny_512     # one of them
    python bench/plan_accuracy.py --json out.json     # also write the table

The configurations are listed in CONFIGS (names are what tests/test_plan.py stores).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAG = "PLAN_ACCURACY_RESULT "

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1024)
# model shapes: Llama-family (GQA, SwiGLU, RMSNorm), untied embeddings, random weights
CONFIGS = {
    "tiny_512": dict(model=TINY, seq=512, lora_dim=8, targets=["all-linear"]),
    "v128k_h256_l4_1024": dict(model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                          vocab_size=128256), seq=1024, lora_dim=8, targets=["all-linear"]),
    "v128k_h384_l4_2048": dict(model=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                                          num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                          vocab_size=128256), seq=2048, lora_dim=16, targets=["all-linear"]),
    "v32k_h768_l8_1024_attn": dict(model=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                              num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                                              vocab_size=32000), seq=1024, lora_dim=8,
                                   targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    # held out: not used to fit the planner's CPU constants (runtime, heap retention); MLP-only LoRA, dim 32
    "v128k_h384_l6_1536_mlp": dict(model=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                              num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                              vocab_size=128256), seq=1536, lora_dim=32,
                                   targets=["gate_proj", "up_proj", "down_proj"]),
}


def hf_config(model: dict) -> dict:
    from nemotune.converters.formats.hf_config import load_hf_config

    return load_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
                           "rope_theta": 500000.0, "max_position_embeddings": 131072,
                           "tie_word_embeddings": False, **model})


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status_bytes("VmRSS")


def child(name: str, steps: int) -> dict:
    """One configuration in this (fresh) process; returns the measured figures."""
    import tempfile

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_lora import synthetic_packs

    from nemotune.recipes.engine import distributed
    from nemotune.recipes.engine.config import compose
    from nemotune.recipes.engine.config import LoraConfig
    from nemotune.recipes.engine.lora import apply_lora
    from nemotune.recipes.engine.model import build_gpt_model
    from nemotune.recipes.engine.trainer import SupervisedTrainer
    from nemotune.recipes.lora_sft import build_scheduler, wrap_for_training

    spec = CONFIGS[name]
    torch.set_num_threads(1)
    hf = hf_config(spec["model"])
    with tempfile.TemporaryDirectory(prefix="plan_accuracy_") as tmp:
        cfg = compose("lora_sft", ["model=tiny", "parallel=single", f"peft.lora.dim={spec['lora_dim']}",
                                   f"peft.lora.alpha={2 * spec['lora_dim']}",
                                   f"peft.lora.target_modules=[{','.join(spec['targets'])}]",
                                   "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
                                   "trainer.optim.warmup_steps=1", f"run.output_dir={tmp}", "run.tensorboard=false",
                                   "trainer.precision=fp32"])
        cfg.model.hf_config = OmegaConf.create(hf)
        distributed.init_distributed(seed=cfg.run.seed)
        packs = synthetic_packs(steps, spec["seq"], hf["vocab_size"], seed=0)
        rss_before_model = _rss_now()
        model = build_gpt_model(hf, params_dtype=torch.float32, calculate_per_token_loss=True)
        summary = apply_lora(model, LoraConfig.of(cfg.peft.lora), seed=cfg.run.seed)
        chunks, optimizer = wrap_for_training(cfg, model)
        trainer = SupervisedTrainer(cfg=cfg, model=chunks, optimizer=optimizer, scheduler=None, train_samples=packs,
                                    val_samples=packs, pad_id=0, seq_length=spec["seq"], hf_config=hf,
                                    run_dir=Path(tmp), checkpointer=None, log_metrics=False)
        trainer.scheduler = build_scheduler(cfg, optimizer, steps)
        for chunk in chunks:
            chunk.train()
        rss_after_build = _rss_now()
        losses, times = [], []
        for step in range(steps):
            m = trainer.train_step(np.array([step]))
            losses.append(m["train/loss"])
            times.append(m["train/step_time"])
        peak = _status_bytes("VmHWM")  # this process's own high-water mark
        distributed.destroy_distributed()
    return {"name": name, "peak_rss_bytes": peak, "rss_before_model_bytes": rss_before_model,
            "rss_after_build_bytes": rss_after_build, "trainable_parameters": summary.trainable_parameters,
            "total_parameters": summary.total_parameters, "losses": losses, "step_time_s": times}


def predict(name: str, runtime_bytes=None, chunked_loss=None):
    """The planner's prediction for configuration `name` (CPU, fp32, one process); chunked_loss None = what the
    trainer does here (plan.chunked_loss_default)."""
    from nemotune.recipes.engine import plan
    from nemotune.recipes.engine.lora import resolve_targets

    spec = CONFIGS[name]
    return plan.plan(plan.PlanInput(
        hf=hf_config(spec["model"]), layout=plan.Layout(), micro_batch_size=1, global_batch_size=1,
        seq_length=spec["seq"], lora=plan.Lora(dim=spec["lora_dim"], targets=tuple(resolve_targets(spec["targets"]))),
        device="cpu", precision="fp32", peak_tflops=None, runtime_bytes=runtime_bytes,
        chunked_loss=plan.chunked_loss_default() if chunked_loss is None else chunked_loss))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations only")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (Adam states exist from step 1)")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.child:
        print(TAG + json.dumps(child(args.child, args.steps)), flush=True)
        return 0
    command = "python bench/plan_accuracy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rows = []
    for name in args.only or CONFIGS:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)], cwd=REPO,
                             env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith(TAG)]
        if out.returncode or not lines:
            print(f"{name}: child failed (exit {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(lines[-1][len(TAG):])
        predicted = predict(name)
        result.update(predicted_bytes=predicted.total_bytes, chunked_loss=predicted.input.chunked_loss, wall_s=time.perf_counter() - start,
                      predicted_parts={k: v for k, v in predicted.parts.items()},
                      ratio=predicted.total_bytes / result["peak_rss_bytes"])
        rows.append(result)
        print(f"{name:<26} measured {result['peak_rss_bytes'] / 2**30:7.3f} GiB | predicted "
              f"{result['predicted_bytes'] / 2**30:7.3f} GiB | predicted / measured {result['ratio']:.3f} | "
              f"RSS before model {result['rss_before_model_bytes'] / 2**30:.3f} GiB | "
              f"{result['trainable_parameters']:,} trainable / {result['total_parameters']:,} | "
              f"{result['wall_s']:.0f} s", flush=True)
    print(f"reproduce: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
