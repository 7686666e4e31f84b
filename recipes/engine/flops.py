"""FLOP accounting for LoRA fine-tuning, shared by the per-step log line and bench/gpu_lora.

LoRA trains with the base frozen, so the backward pass computes activation gradients but no weight
gradients: 2/3 of a dense full fine-tune's matmul FLOPs (forward 2N + activation-grad 2N of the full-FT
6N per token). Attention (QK^T and AV) has no weights and is counted whole: forward + backward = 3x
forward, causal, per document, on real tokens only. The adapters' own FLOPs (< 1% at dim 8) are not
counted, as in the published LoRA MFU figures.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

# dense bf16 peak of one device, TFLOP/s (no sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0,
                    "GB200": 2450.0, "L40S": 362.0}


def family_config(hf: Mapping) -> Mapping:
    """`hf` with the family's facts (gated_mlp, norm, qkv_bias, qk_norm, head_dim): as given when it already went
    through load_hf_config, else normalised by it (a raw config.json dict)."""
    if "gated_mlp" in hf:
        return hf
    from nemotune.converters.formats.hf_config import load_hf_config

    return load_hf_config(hf)


def matmul_params(hf: Mapping) -> int:
    """Weights that take part in a matmul per token: attention, MLP and the output layer (the tied embedding
    matrix too: tied or not, the logits are one h x vocab matmul per token). A gated MLP (SwiGLU) has two up
    matrices (gate, up), a plain one (Nemotron's squared ReLU) one; head_dim is the config's own
    (Mistral-NeMo's 128 != hidden / heads)."""
    hf = family_config(hf)
    h, heads, groups = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or h // heads
    up_matrices = 2 if hf["gated_mlp"] else 1
    per_layer = (h * (heads + 2 * groups) * head_dim               # linear_qkv
                 + heads * head_dim * h                            # linear_proj
                 + (up_matrices + 1) * h * hf["intermediate_size"])  # linear_fc1 (gate?, up) + linear_fc2
    return hf["num_hidden_layers"] * per_layer + h * hf["vocab_size"]


def dense_forward_flops_per_token(hf: Mapping) -> int:
    return 2 * matmul_params(hf)


def attention_forward_flops(hf: Mapping, document_lengths: Iterable[int]) -> int:
    """Causal QK^T + AV of every document: 2 matmuls x 2 FLOP x heads*head_dim x l(l+1)/2 per layer."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    pairs = sum(l * (l + 1) // 2 for l in document_lengths)
    return hf["num_hidden_layers"] * 4 * heads * head_dim * pairs


def lora_step_flops(hf: Mapping, document_lengths: Iterable[int]) -> int:
    lengths = list(document_lengths)
    tokens = sum(lengths)
    return 2 * dense_forward_flops_per_token(hf) * tokens + 3 * attention_forward_flops(hf, lengths)


def device_peak_flops() -> float | None:
    """Peak dense bf16 FLOP/s of this process's device, None on CPU or an unknown GPU."""
    from nemotune.recipes.engine.megatron_cpu import on_gpu

    if not on_gpu():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None
