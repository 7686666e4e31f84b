"""Nemotron-H (NemotronHForCausalLM) config and HF <-> Megatron-core (hybrid MambaModel) parameter names.

The layer kinds follow `hybrid_override_pattern` (or transformers' `layers_block_type` list): `M` Mamba-2
mixer, `*` attention, `-` squared-ReLU MLP (`E`, MoE, is refused). Each HF layer is `norm` + `mixer`; in
megatron's hybrid stack (local spec) the norm sits in the layer that owns the mixer:

  Mamba   model.layers.*.norm.weight            decoder.layers.*.norm.weight
          model.layers.*.mixer.{in_proj.weight, conv1d.weight, conv1d.bias, A_log, D, dt_bias, norm.weight,
          out_proj.weight}                      decoder.layers.*.mixer.<same>   (in_proj rows: z, x, B, C, dt
                                                in both)
  attn    model.layers.*.norm.weight            decoder.layers.*.input_layernorm.weight
          q/k/v_proj -> self_attention.linear_qkv (per-group interleaved, as for Llama), o_proj -> linear_proj
  MLP     model.layers.*.norm.weight            decoder.layers.*.pre_mlp_layernorm.weight
          up_proj -> mlp.linear_fc1, down_proj -> mlp.linear_fc2 (no gate: squared ReLU)
  model.embeddings.weight -> embedding.word_embeddings.weight, model.norm_f.weight -> decoder.final_norm.weight,
  lm_head.weight -> output_layer.weight

NVIDIA's published checkpoints and transformers' save_pretrained name the base model `backbone.` on disk;
transformers' module state_dict names it `model.`. Both are read; files are written with `backbone.`. Every conversion is a rename or the qkv fusion: exact.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemotune.converters.formats.mapping import LlamaDims, fuse_qkv, split_qkv

ARCHITECTURE = "NemotronHForCausalLM"
MODEL_TYPE = "nemotron_h"
_KIND_OF_BLOCK = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                  "moe": "E"}

# transformers' NemotronHConfig defaults for the fields read here when a config.json leaves them out
_DEFAULTS = {
    "tie_word_embeddings": False, "max_position_embeddings": 4096, "attention_bias": False, "mlp_bias": False,
    "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "ssm_state_size": 128, "n_groups": 8,
    "conv_kernel": 4, "chunk_size": 128, "use_conv_bias": True, "use_bias": False, "mamba_proj_bias": False,
    "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "residual_in_fp32": False, "head_dim": 128,
}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
             "mamba_num_heads", "mamba_head_dim")


class NemotronHConfigError(ValueError):
    """A Nemotron-H config.json nemotune cannot build; the message names the field and why."""


def is_nemotron_h(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") == MODEL_TYPE or ARCHITECTURE in (raw.get("architectures") or ())


def load_nemotron_h_config(raw: Mapping[str, Any], origin: str = "the model config") -> dict:
    """A normalized Nemotron-H config dict: defaults applied, `hybrid_override_pattern` always present."""
    raw = {k: v for k, v in dict(raw).items() if v is not None}
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise NemotronHConfigError(f"{origin}: missing fields {missing}")
    hf = {**_DEFAULTS, **raw}
    pattern = hf.get("hybrid_override_pattern")
    if pattern is None and isinstance(hf.get("layers_block_type"), list):
        unknown = sorted(set(hf["layers_block_type"]) - set(_KIND_OF_BLOCK))
        if unknown:
            raise NemotronHConfigError(f"{origin}: layers_block_type has unknown kinds {unknown}")
        pattern = "".join(_KIND_OF_BLOCK[kind] for kind in hf["layers_block_type"])
    if not pattern:
        raise NemotronHConfigError(f"{origin}: neither hybrid_override_pattern nor layers_block_type is set")
    bad = sorted(set(pattern) - set("M*-E"))
    if bad:
        raise NemotronHConfigError(f"{origin}: hybrid_override_pattern has unknown symbols {bad} (M, *, -, E)")
    if "E" in pattern:
        raise NemotronHConfigError(f"{origin}: MoE layers ('E' in hybrid_override_pattern) are not supported; "
                                   "nemotune builds the dense Nemotron-H models (Nano v2, Nemotron-H 4B-56B)")
    if "num_hidden_layers" in raw and int(raw["num_hidden_layers"]) != len(pattern):
        raise NemotronHConfigError(f"{origin}: num_hidden_layers {raw['num_hidden_layers']} but "
                                   f"hybrid_override_pattern has {len(pattern)} layers")
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if hf[key] != want:
            raise NemotronHConfigError(f"{origin}: {key} {hf[key]!r} is not supported ({want} only)")
    for key in ("attention_bias", "mlp_bias", "use_bias", "mamba_proj_bias"):
        if hf[key]:
            raise NemotronHConfigError(f"{origin}: {key}=true is not supported (megatron's mixer has no biases)")
    if not hf["use_conv_bias"]:
        raise NemotronHConfigError(f"{origin}: use_conv_bias=false is not supported")
    if hf["mamba_num_heads"] % hf["n_groups"]:
        raise NemotronHConfigError(f"{origin}: mamba_num_heads {hf['mamba_num_heads']} is not a multiple of "
                                   f"n_groups {hf['n_groups']}")
    hf["hybrid_override_pattern"] = pattern
    hf["num_hidden_layers"] = len(pattern)
    hf["architectures"] = [ARCHITECTURE]
    hf["model_type"] = MODEL_TYPE
    hf.pop("layers_block_type", None)
    return hf


def attention_dims(hf: Mapping[str, Any]) -> LlamaDims:
    """The attention layers' dims in the Llama helpers' terms (for the qkv fusion)."""
    return LlamaDims(num_layers=len(hf["hybrid_override_pattern"]), hidden=hf["hidden_size"],
                     heads=hf["num_attention_heads"], groups=hf["num_key_value_heads"], head_dim=hf["head_dim"],
                     ffn=hf["intermediate_size"], vocab=hf["vocab_size"], tied=bool(hf["tie_word_embeddings"]))


_MAMBA = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight",
          "out_proj.weight")


def layer_names(kind: str, layer: int) -> list[tuple[str, tuple[str, ...]]]:
    """[(megatron name, (hf names...))] of one layer of kind M / * / -."""
    hf, mc = f"model.layers.{layer}", f"decoder.layers.{layer}"
    if kind == "M":
        return [(f"{mc}.norm.weight", (f"{hf}.norm.weight",))] + [
            (f"{mc}.mixer.{name}", (f"{hf}.mixer.{name}",)) for name in _MAMBA]
    if kind == "*":
        return [(f"{mc}.input_layernorm.weight", (f"{hf}.norm.weight",)),
                (f"{mc}.self_attention.linear_qkv.weight",
                 tuple(f"{hf}.mixer.{p}_proj.weight" for p in "qkv")),
                (f"{mc}.self_attention.linear_proj.weight", (f"{hf}.mixer.o_proj.weight",))]
    if kind == "-":
        return [(f"{mc}.pre_mlp_layernorm.weight", (f"{hf}.norm.weight",)),
                (f"{mc}.mlp.linear_fc1.weight", (f"{hf}.mixer.up_proj.weight",)),
                (f"{mc}.mlp.linear_fc2.weight", (f"{hf}.mixer.down_proj.weight",))]
    raise ValueError(f"layer kind {kind!r} (M, *, - only)")


def name_table(hf: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """Every Megatron parameter of this config with its HF names, in model order."""
    table = [("embedding.word_embeddings.weight", ("model.embeddings.weight",))]
    for layer, kind in enumerate(hf["hybrid_override_pattern"]):
        table += layer_names(kind, layer)
    table.append(("decoder.final_norm.weight", ("model.norm_f.weight",)))
    if not hf["tie_word_embeddings"]:
        table.append(("output_layer.weight", ("lm_head.weight",)))
    return table


def _hf_key(name: str) -> str:
    return "model." + name[len("backbone."):] if name.startswith("backbone.") else name


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], hf: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """HF state dict (either prefix) -> Megatron (TP=1) state dict; a missing tensor is a ValueError naming it."""
    state = {_hf_key(k): v for k, v in hf_state.items()}
    dims = attention_dims(hf)
    out, missing = {}, []
    for megatron, names in name_table(hf):
        absent = [n for n in names if n not in state]
        if absent:
            missing += absent
            continue
        tensors = [state[n] for n in names]
        out[megatron] = fuse_qkv(*tensors, dims) if len(tensors) == 3 else tensors[0]
    if missing:
        raise ValueError(f"HF checkpoint lacks {len(missing)} tensors the config implies, e.g. {missing[:3]}")
    return out


def megatron_to_hf(megatron_state: Mapping[str, torch.Tensor], hf: Mapping[str, Any], *,
                   base_prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Megatron (TP=1) state dict -> HF names: `model.` (the module's state_dict) or `backbone.` (what
    transformers' save_pretrained and NVIDIA's checkpoints write); `_extra_state` entries are skipped."""
    dims = attention_dims(hf)
    out = {}
    for megatron, names in name_table(hf):
        if megatron not in megatron_state:
            raise ValueError(f"Megatron state lacks {megatron}")
        tensor = megatron_state[megatron]
        parts = split_qkv(tensor, dims) if len(names) == 3 else (tensor,)
        out.update((base_prefix + n[len("model."):] if n.startswith("model.") else n, t)
                   for n, t in zip(names, parts))
    return out
