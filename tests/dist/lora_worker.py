"""2-rank worker for tests/test_lora_dist.py: LoRA under TP=1, TP=2, TP=2+SP and PP=2 (gloo).

The same base weights and the same full adapter give the same logits and the same adapter gradients in every
layout; a fresh apply_lora draws the same A whatever the layout; gather_adapter returns the TP=1 layout with
global layer numbers; adapter dist checkpoints written at TP=2 load at PP=2. Writes {check: max abs diff} as
JSON to argv[2] (rank 0); argv[1] is a scratch directory shared by the ranks.
"""
import json
import sys
from pathlib import Path

import torch

from nemotune.recipes.engine import distributed, lora
from nemotune.recipes.engine.config import LoraConfig
from nemotune.recipes.engine.model import build_gpt_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_HF  # noqa: E402
from full_weights import load_full_state_dict  # noqa: E402

VARIANTS = lora.VARIANTS
SEQ = 16


def lora_config(variant):
    return LoraConfig(dim=4, alpha=8, variant=variant)


def start(tp, pp):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    distributed.init_distributed(tp, pp, seed=0)


def max_diff(a: dict, b: dict, relative: bool = False) -> float:
    """Largest |a - b| over all tensors (relative: divided by the largest |a| of each tensor)."""
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:4]
    return max(((a[k].float() - b[k].float()).abs().max() / (a[k].abs().max() if relative else 1)).item()
               for k in a)


def run_layout(full_base, adapters, inputs, sequence_parallel=False):
    """logits (full vocab), adapter grads (full), fresh adapter, and gathered adapter, per variant."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids, pos, weights = inputs
    results = {}
    for variant in VARIANTS:
        model = build_gpt_model(TINY_HF, sequence_parallel=sequence_parallel)
        load_full_state_dict(model, full_base)
        summary = lora.apply_lora(model, lora_config(variant), seed=7)
        fresh = lora.gather_adapter(model)
        load = adapters[variant] if adapters else fresh
        if not adapters:  # TP=1 reference: a random full adapter (B nonzero), identical on both ranks
            gen = torch.Generator().manual_seed(3)
            load = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in lora.adapter_state_dict(model).items()}
        lora.load_adapter_state(model, load)
        result = {"fresh": fresh, "adapter": load, "gathered": lora.gather_adapter(model), "model": model,
                  "trainable": summary.trainable_parameters}
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            logits = gather_from_tensor_model_parallel_region(model(ids, pos, None))
            (logits * weights).sum().backward()
            result["logits"] = logits.detach()
            result["grads"] = lora._gather_full(model, lambda p: p.grad)
            # replicated adapter weights (A of column-, B of row-parallel bases) get equal grads on all TP ranks
            spread, tp_group = 0.0, parallel_state.get_tensor_model_parallel_group()
            for name, param in lora._adapter_params(model).items():
                if parallel_state.get_tensor_model_parallel_world_size() == 2 and \
                        not getattr(param, "tensor_model_parallel", False):
                    both = [torch.empty_like(param.grad) for _ in range(2)]
                    torch.distributed.all_gather(both, param.grad.contiguous(), group=tp_group)
                    spread = max(spread, (both[0] - both[1]).abs().max().item())
            result["replicated_grad_spread"] = spread
        results[variant] = result
    return results


def adapter_sharded(model):
    return {k: v for k, v in model.sharded_state_dict().items() if "adapter_layer" in k}


def main():
    from megatron.core import dist_checkpointing

    scratch, out_path = Path(sys.argv[1]), sys.argv[2]
    start(1, 1)
    torch.manual_seed(0)
    base = build_gpt_model(TINY_HF)
    full_base = {k: torch.randn_like(v) * 0.05 if v.dim() > 1 else v.detach().clone()
                 for k, v in base.state_dict().items() if not k.endswith("_extra_state")}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_HF["vocab_size"], (2, SEQ), generator=gen)
    inputs = (ids, torch.arange(SEQ).expand(2, SEQ), torch.randn(2, SEQ, TINY_HF["vocab_size"], generator=gen))

    ref = run_layout(full_base, None, inputs)
    adapters = {v: ref[v]["adapter"] for v in VARIANTS}
    report = {}

    start(2, 1)
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        got = run_layout(full_base, adapters, inputs, sequence_parallel=sp)
        for variant in VARIANTS:
            if distributed.is_rank_zero():
                r, g = ref[variant], got[variant]
                report[f"{name}/{variant}/logits"] = (r["logits"] - g["logits"]).abs().max().item()
                report[f"{name}/{variant}/grads"] = max_diff(r["grads"], g["grads"], relative=True)
                report[f"{name}/{variant}/gathered"] = max_diff(r["adapter"], g["gathered"])
                report[f"{name}/{variant}/fresh_init"] = max_diff(r["fresh"], g["fresh"])
                report[f"{name}/{variant}/trainable_diff"] = float(r["trainable"] - g["trainable"])
            report[f"{name}/{variant}/replicated_grad_spread"] = got[variant]["replicated_grad_spread"]
        if name == "tp2":  # adapter dist checkpoints written at TP=2 ...
            for variant in VARIANTS:
                path = scratch / f"adapter_tp2_{variant}"
                if distributed.is_rank_zero():
                    path.mkdir(parents=True)
                torch.distributed.barrier()
                dist_checkpointing.save(adapter_sharded(got[variant]["model"]), str(path))

    start(1, 2)
    got = run_layout(full_base, adapters, inputs)
    for variant in VARIANTS:
        model = got[variant]["model"]
        if distributed.is_rank_zero():
            report[f"pp2/{variant}/gathered"] = max_diff(ref[variant]["adapter"], got[variant]["gathered"])
            report[f"pp2/{variant}/fresh_init"] = max_diff(ref[variant]["fresh"], got[variant]["fresh"])
            report[f"pp2/{variant}/layers"] = sorted({k.split(".")[2] for k in got[variant]["gathered"]})
        # ... load at PP=2 (TP=1): the adapter reloaded from them equals the TP=1 adapter
        with torch.no_grad():
            for param in lora._adapter_params(model).values():
                param.zero_()
        state = dist_checkpointing.load(adapter_sharded(model), str(scratch / f"adapter_tp2_{variant}"))
        model.load_state_dict(state, strict=False)
        reloaded = lora.gather_adapter(model)
        if distributed.is_rank_zero():
            report[f"pp2/{variant}/dist_ckpt_from_tp2"] = max_diff(ref[variant]["adapter"], reloaded)
    if distributed.is_rank_zero():
        Path(out_path).write_text(json.dumps(report, indent=1))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
