"""LoRA on megatron-core's hybrid (Nemotron-H) model: Mamba in_proj / out_proj, attention q/k/v / o, MLP up / down.

One A/B pair per HF projection, as HF PEFT has on NemotronHForCausalLM (`in_proj`, `out_proj`, `q_proj`,
`k_proj`, `v_proj`, `o_proj`, `up_proj`, `down_proj`), built from the engine's LoRA pieces
(nemotune.recipes.engine.lora: a branch laid out for its base layer's parallelism, added to the base output by a
forward hook; q/k/v combined in linear_qkv's per-query-group row order). A starts kaiming-uniform (a=sqrt(5),
as PEFT), B at zero; the scale is alpha / dim.

Mamba out_proj trains here (megatron's mixer calls it as a module) but has no HF PEFT export: peft (0.21)
refuses LoRA on `out_proj` / `conv1d` of Mamba-based models (nemotron_h among them) because transformers'
fused Mamba kernel path reads `out_proj.weight` directly, so a served adapter there would be ignored. The
default targets (`DEFAULT_TARGETS`) therefore leave it out, and `peft_state_dict` refuses it with that reason.

Tensor parallelism: every target works at any TP; in_proj's rows are sharded per component (each rank holds
its z, x, B, C, dt slices), so its B is too (`shard`). `peft_state_dict` reads a TP=1 model.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch

from nemotune.recipes.engine.lora import (AdapterLayer, LoraAdapter, LoraBranch, UnfusedLoraAdapter, _full_shape,
                                          _shard)

# HF module -> (megatron layer kind, parent attribute path, megatron module)
HF_TARGETS = {
    "in_proj": ("MambaLayer", "mixer", "in_proj"),
    "out_proj": ("MambaLayer", "mixer", "out_proj"),
    "q_proj": ("TransformerLayer", "self_attention", "linear_qkv"),
    "k_proj": ("TransformerLayer", "self_attention", "linear_qkv"),
    "v_proj": ("TransformerLayer", "self_attention", "linear_qkv"),
    "o_proj": ("TransformerLayer", "self_attention", "linear_proj"),
    "up_proj": ("MLPLayer", "mlp", "linear_fc1"),
    "down_proj": ("MLPLayer", "mlp", "linear_fc2"),
}
_COLUMN = {"in_proj", "linear_qkv", "linear_fc1"}
DEFAULT_TARGETS = tuple(t for t in HF_TARGETS if t != "out_proj")
NO_PEFT_EXPORT = ("Mamba out_proj LoRA has no HF PEFT export: peft refuses LoRA on out_proj of Mamba-based models "
                  "(transformers' fused Mamba kernel reads out_proj.weight directly, so the adapter would be "
                  "ignored when served); train without out_proj in target_modules to export")


def _shapes(config, module: str) -> tuple[int, int]:
    hidden, heads, groups = config.hidden_size, config.num_attention_heads, config.num_query_groups
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    return {
        "in_proj": (hidden, 2 * d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim
                    + config.mamba_num_heads),
        "out_proj": (d_inner, hidden),
        "linear_qkv": (hidden, (heads + 2 * groups) * config.kv_channels),
        "linear_proj": (heads * config.kv_channels, hidden),
        "linear_fc1": (hidden, config.ffn_hidden_size),
        "linear_fc2": (config.ffn_hidden_size, hidden),
    }[module]


def apply_hybrid_lora(model, *, dim: int = 8, alpha: float = 16.0, target_modules: Iterable[str] = DEFAULT_TARGETS,
                      seed: int = 1234) -> list[str]:
    """Freeze `model` and add LoRA on the given HF projections; returns the trainable parameter names."""
    import copy

    targets = list(target_modules)
    unknown = sorted(set(targets) - set(HF_TARGETS))
    if unknown:
        raise ValueError(f"LoRA target_modules {unknown}: Nemotron-H targets are {list(HF_TARGETS)}")
    if dim < 1:
        raise ValueError(f"LoRA dim={dim}: must be >= 1")
    config = model.config
    adapter_config = copy.copy(config)
    adapter_config.sequence_parallel = False
    adapter_config.perform_initialization = False
    adapter_config.use_cpu_initialization = True
    for param in model.parameters():
        param.requires_grad_(False)
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    for layer in model.decoder.layers:
        kind = type(layer).__name__
        wanted = [t for t in targets if HF_TARGETS[t][0] == kind]
        by_module: dict[str, list[str]] = {}
        for hf_name in wanted:
            by_module.setdefault(HF_TARGETS[hf_name][2], []).append(hf_name)
        for module, hf_names in by_module.items():
            parent = getattr(layer, HF_TARGETS[hf_names[0]][1])
            base = getattr(parent, module)
            column = module in _COLUMN
            in_features, out_features = _shapes(config, module)
            if module == "linear_qkv":
                rows = {"q_proj": heads * head_dim, "k_proj": groups * head_dim, "v_proj": groups * head_dim}
                if sorted(hf_names) != ["k_proj", "q_proj", "v_proj"]:
                    raise ValueError("LoRA on attention needs q_proj, k_proj and v_proj together (one fused "
                                     "linear_qkv in megatron-core)")
                adapter = UnfusedLoraAdapter(
                    {n: LoraBranch(adapter_config, in_features, rows[n], dim, 0.0, True)
                     for n in ("q_proj", "k_proj", "v_proj")}, q_rows_per_group=heads // groups * head_dim)
            else:
                adapter = LoraAdapter(adapter_config, in_features, out_features, dim, 0.0, column)
                if module == "in_proj":  # B's rows are sharded per component, as the base in_proj's
                    d_inner = config.mamba_num_heads * config.mamba_head_dim
                    bc = config.mamba_num_groups * config.mamba_state_dim
                    adapter.linear_out.weight.mamba_sections = (d_inner, d_inner, bc, bc, config.mamba_num_heads)
            adapter.column, adapter.sequence_parallel, adapter.scale = column, config.sequence_parallel, alpha / dim
            if not hasattr(parent, "adapter_layer"):
                parent.adapter_layer = AdapterLayer()
            parent.adapter_layer[module] = adapter
            base.register_forward_hook(adapter.after_base)
    trainable = []
    for name, param in model.named_parameters():
        if ".adapter_layer." not in name:
            continue
        trainable.append(name)
        with torch.no_grad():
            if name.endswith("linear_in.weight"):  # drawn at full size, then this rank's part: TP-independent
                full = torch.empty(_full_shape(param), dtype=torch.float32)
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
                param.copy_(shard(full, param))
            else:
                param.zero_()
    return trainable


def shard(full: torch.Tensor, param) -> torch.Tensor:
    """This TP rank's part of a full (TP=1 layout) adapter tensor; in_proj's B per z / x / B / C / dt section."""
    sections = getattr(param, "mamba_sections", None)
    if sections is None:
        return _shard(full, param)
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return torch.cat([part.chunk(size, dim=0)[rank] for part in full.split(list(sections), dim=0)])


def peft_state_dict(model, *, base: str = "base_model.model.model") -> dict[str, torch.Tensor]:
    """The adapters as HF PEFT names on NemotronHForCausalLM (`<base>.layers.N.mixer.<proj>.lora_A/B.weight`),
    from a TP=1 model."""
    out = {}
    for index, layer in enumerate(model.decoder.layers):
        kind = type(layer).__name__
        for hf_name, (target_kind, parent_name, module) in HF_TARGETS.items():
            if target_kind != kind:
                continue
            adapters = getattr(getattr(layer, parent_name), "adapter_layer", None)
            if adapters is None or module not in adapters:
                continue
            if hf_name == "out_proj":
                raise ValueError(NO_PEFT_EXPORT)
            adapter = adapters[module]
            branch = getattr(adapter, hf_name) if isinstance(adapter, UnfusedLoraAdapter) else adapter
            prefix = f"{base}.layers.{index}.mixer.{hf_name}"
            out[f"{prefix}.lora_A.weight"] = branch.linear_in.weight.detach().clone()
            out[f"{prefix}.lora_B.weight"] = branch.linear_out.weight.detach().clone()
    return out
