"""2-rank worker: a converted Nemotron-H checkpoint loaded at TP=2 gives transformers' logits (forward), the
TP=1 model's gradients (backward, through the reference Mamba-2 kernels) and, with the same LoRA adapters, the
TP=1 logits; the consolidated adapter gathered at TP=2 (what a training checkpoint's adapter/ holds) equals TP=1's.

argv: HF dir, converted Megatron dir, output JSON (rank 0 writes {"logit_diff", "grad_diff"}).
"""
import json
import sys
from pathlib import Path

import torch

from nemotune.converters import nemotron_h
from nemotune.recipes.engine import distributed, lora


def gathered_logits(model, ids):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = model(ids, positions, None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def grads(model, ids):
    """Loss gradients of the mixer's A_log / D / dt_bias (sharded by head) gathered to full size."""
    from megatron.core import parallel_state

    model.zero_grad()
    logits = gathered_logits(model, ids)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.roll(ids, -1, 1).reshape(-1)
                                      ).backward()
    mixer = model.decoder.layers[0].mixer
    out = {}
    for name in ("A_log", "D", "dt_bias"):
        grad = getattr(mixer, name).grad.detach().clone()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(parts, grad, group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(parts)
        out[name] = grad
    return out


def lora_logits(model, ids):
    """LoRA on every target (Mamba in_proj / out_proj included), B from seeded full tensors."""
    import zlib

    from nemotune.recipes.engine.hybrid_lora import HF_TARGETS, apply_hybrid_lora, shard
    from nemotune.recipes.engine.lora import _full_shape

    apply_hybrid_lora(model, dim=4, alpha=8.0, target_modules=list(HF_TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter_layer." in name and name.endswith("linear_out.weight"):
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(shard(torch.randn(_full_shape(param), generator=generator) * 0.1, param))
        return gathered_logits(model, ids)


def main(hf_dir: str, ckpt: str, out: str) -> None:
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 96, (2, 18), generator=torch.Generator().manual_seed(5))
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for layer in hf_model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = tuple(hf_model.config.time_step_limit)
    with torch.no_grad():
        expected = hf_model(ids).logits
    results = {}
    for tp in (1, 2):
        distributed.init_distributed(tp, 1, seed=0)
        _, model = nemotron_h.model_from_checkpoint(Path(ckpt))
        model.eval()
        with torch.no_grad():
            results[f"logits_tp{tp}"] = gathered_logits(model, ids)
        results[f"grads_tp{tp}"] = grads(model, ids)
        results[f"lora_tp{tp}"] = lora_logits(model, ids)
        # the consolidated adapter a training checkpoint writes (every rank takes part; rank 0 gets it)
        results[f"adapter_tp{tp}"] = lora.gather_adapter(model)
        parallel_state.destroy_model_parallel()
    report = {
        "logit_diff": (results["logits_tp2"] - expected).abs().max().item(),
        "logit_diff_tp1": (results["logits_tp1"] - expected).abs().max().item(),
        "grad_diff": max((results["grads_tp2"][k] - results["grads_tp1"][k]).abs().max().item()
                         for k in results["grads_tp1"]),
        "grad_norm": sum(g.norm().item() for g in results["grads_tp1"].values()),
        "lora_diff": (results["lora_tp2"] - results["lora_tp1"]).abs().max().item(),
        "lora_effect": (results["lora_tp1"] - results["logits_tp1"]).abs().max().item(),
    }
    if torch.distributed.get_rank() == 0:
        tp1, tp2 = results["adapter_tp1"], results["adapter_tp2"]
        report["adapter_keys_equal"] = sorted(tp1) == sorted(tp2)
        report["adapter_gather_diff"] = max((tp2[k] - tp1[k]).abs().max().item() for k in tp1)
        report["adapter_in_proj_B"] = sum(k.endswith("adapter_layer.in_proj.linear_out.weight") for k in tp1)
        Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
