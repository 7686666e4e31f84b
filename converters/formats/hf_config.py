"""The Hugging Face ``config.json`` of a supported model, read and normalised once for the whole project.

Every part that needs the architecture (the model builder, config validation, the converters, adapter
export) reads it here, so the defaults transformers applies to absent fields live in one place. The
supported families and what sets each apart are the rows of :data:`FAMILIES`; any other architecture (DeciLM,
MoE) is refused in one line naming the supported ones. Nemotron-H hybrids (NemotronHForCausalLM) are read only where
the caller builds megatron-core's hybrid model (``hybrid=True``: training and evaluation); elsewhere they are refused
in one line naming the verbs that take them.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from omegaconf import MISSING


@dataclass(frozen=True)
class Family:
    """What one HF architecture is, in the terms the builder and the mapping table use.

    ``norm``: "RMSNorm" or "LayerNorm1P" (LayerNorm with bias whose stored gamma is zero-centred: the
    model adds 1 at run time, as transformers' NemotronLayerNorm1P and megatron's
    ``layernorm_zero_centered_gamma`` both do, so the stored weights map 1:1). ``gated``: SwiGLU MLP
    (gate_proj, up_proj) or a plain one (up_proj only). ``qkv_bias``: q/k/v projections carry a bias (o_proj
    none). ``qk_norm``: per-head RMSNorm of queries and keys before RoPE.
    """
    name: str
    model_type: str
    hidden_act: str
    norm: str = "RMSNorm"
    gated: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    eps_key: str = "rms_norm_eps"
    partial_rotary_factor: float = 1.0


# HF architecture -> family; everything below reads a family's facts from here.
FAMILIES = {
    "LlamaForCausalLM": Family("llama", "llama", "silu"),
    "MistralForCausalLM": Family("mistral", "mistral", "silu"),
    "Qwen2ForCausalLM": Family("qwen2", "qwen2", "silu", qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", "qwen3", "silu", qk_norm=True),
    "NemotronForCausalLM": Family("nemotron", "nemotron", "relu2", norm="LayerNorm1P", gated=False,
                                  eps_key="norm_eps", partial_rotary_factor=0.5),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# keys load_hf_config adds to the HF fields (never written back into a config.json)
DERIVED_KEYS = ("family", "norm", "gated_mlp", "qkv_bias", "qk_norm", "partial_rotary_factor")

# HF fields we read, with the defaults transformers' configs apply when a field is absent.
_HF_DEFAULTS = {
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
}
_EPS_DEFAULTS = {"rms_norm_eps": 1e-6, "norm_eps": 1e-5}
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass
class ModelConfig:
    """A model group file (conf/model/<name>.yaml) names the model, its architecture and its tokenizer."""
    name: str = MISSING
    # fields of the Hugging Face config.json (one of FAMILIES' architectures); hf_path's config.json wins when set
    hf_config: Dict[str, Any] = MISSING
    hf_path: Optional[str] = None
    # null = the model's own: hf_path's tokenizer files when it has them, else hub_id's
    tokenizer: Optional[str] = None
    hub_id: Optional[str] = None  # the model's hub id, named by each model file (nemotune/tiny: the packaged one)
    # base weights: a Megatron dist checkpoint or .nemo written by `nemotune convert`; null = random init
    checkpoint: Optional[str] = None


class ModelConfigError(ValueError):
    """config.json is absent or describes a model nemotune does not support; the message says which and why."""


def read_config_json(config_file: Path) -> dict:
    """A config.json as a dict; invalid JSON or a non-object is a ModelConfigError naming the file."""
    try:
        raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelConfigError(f"{config_file}: not UTF-8 text ({err.reason}); re-download or restore this "
                               "file") from err
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{config_file}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); "
                               "re-download or fix this file") from err
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{config_file}: holds a JSON {type(raw).__name__}, not an object of model "
                               "settings; re-download or fix this file")
    return raw


def load_hf_config(path_or_dict: str | Path | Mapping[str, Any], *, hybrid: bool = False) -> dict:
    """Return a normalized config dict of a supported architecture (:data:`FAMILIES`) from a checkpoint dir, a
    config.json or a dict. It holds the HF fields with transformers' defaults, ``rms_norm_eps`` as the norm
    epsilon of every family, and the family's facts under :data:`DERIVED_KEYS`. ``hybrid=True`` also reads a
    Nemotron-H config (family ``nemotron_h``, see :func:`_nemotron_h`)."""
    if isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
        origin = "the model config"
    else:
        path = Path(path_or_dict)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ModelConfigError(f"{path}: no config.json; expected a Hugging Face checkpoint directory "
                                   "(config.json + *.safetensors)")
        raw = read_config_json(config_file)
        origin = str(config_file)
    raw = {k: v for k, v in raw.items() if v is not None or k == "rope_scaling"}
    rope = raw.get("rope_parameters")  # transformers >= 5 writes RoPE settings here
    if isinstance(rope, Mapping):
        raw.setdefault("rope_theta", rope.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
        if rope.get("rope_type", "default") != "default" and not raw.get("rope_scaling"):
            raw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    from nemotune.converters.formats import mapping_nemotron_h

    if mapping_nemotron_h.is_nemotron_h(raw):
        return _nemotron_h(raw, origin, hybrid)
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    family = next((FAMILIES[a] for a in architectures if a in FAMILIES), None)
    if family is None or raw.get("model_type", family.model_type) != family.model_type:
        raise ModelConfigError(
            f"{origin}: unsupported architecture {architectures} (model_type {raw.get('model_type')!r}); "
            f"nemotune supports {', '.join(SUPPORTED_ARCHITECTURES)} (dense models; DeciLM and MoE models are "
            "not supported; Nemotron-H hybrids by `nemotune train`, `eval` and `convert` only)")
    moe = [k for k in ("num_experts", "num_local_experts", "n_routed_experts") if raw.get(k)]
    if moe:
        raise ModelConfigError(f"{origin}: a mixture-of-experts config ({moe[0]}={raw[moe[0]]}) is not supported; "
                               f"nemotune supports the dense {', '.join(SUPPORTED_ARCHITECTURES)}")
    missing = [k for k in _HF_REQUIRED if k not in raw]
    if missing:
        raise ModelConfigError(f"{origin}: missing fields {missing}")
    hf = {**_HF_DEFAULTS, "hidden_act": family.hidden_act, **raw}
    hf.setdefault("num_key_value_heads", hf["num_attention_heads"])
    hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    hf["architectures"] = list(architectures)
    hf["model_type"] = family.model_type
    # one epsilon key for every family (Nemotron's config calls it norm_eps)
    hf["rms_norm_eps"] = float(raw.get(family.eps_key, _EPS_DEFAULTS[family.eps_key]))
    partial = raw.get("partial_rotary_factor")
    if partial is None and isinstance(rope, Mapping):
        partial = rope.get("partial_rotary_factor")
    hf.update(family=family.name, norm=family.norm, gated_mlp=family.gated, qkv_bias=family.qkv_bias,
              qk_norm=family.qk_norm,
              partial_rotary_factor=float(family.partial_rotary_factor if partial is None else partial))
    if hf["hidden_act"] != family.hidden_act:
        raise ModelConfigError(f"{origin}: hidden_act {hf['hidden_act']!r} is not supported for {architectures[0]} "
                               f"(it uses {family.hidden_act!r})")
    if hf["attention_bias"] or hf["mlp_bias"]:
        raise ModelConfigError(f"{origin}: attention_bias / mlp_bias are not supported; set them to false")
    window = hf.get("sliding_window")
    if raw.get("use_sliding_window") or (family.name == "mistral" and window
                                         and window < hf["max_position_embeddings"]):
        raise ModelConfigError(f"{origin}: sliding-window attention (sliding_window {window}) is not supported; "
                               "use a model whose sliding_window is null")
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("llama3", "default"):
            raise ModelConfigError(f"{origin}: rope_scaling type {kind!r} is not supported (llama3 only)")
    return hf


NEMOTRON_H_VERBS = "`nemotune train`, `nemotune eval` and `nemotune convert`"


def _nemotron_h(raw: Mapping[str, Any], origin: str, hybrid: bool) -> dict:
    """A Nemotron-H config normalized by mapping_nemotron_h, with the derived keys the shared checks read (RMSNorm,
    squared-ReLU MLP without a gate, no RoPE). Refused unless the caller builds the hybrid model."""
    from nemotune.converters.formats import mapping_nemotron_h

    if not hybrid:
        raise ModelConfigError(f"{origin}: Nemotron-H (NemotronHForCausalLM) is a hybrid Mamba model: "
                               f"{NEMOTRON_H_VERBS} take it, this step reads dense GPT models only "
                               f"({', '.join(SUPPORTED_ARCHITECTURES)}); a Nemotron-H training checkpoint's adapter/ is already "
                               "an HF PEFT adapter")
    try:
        hf = mapping_nemotron_h.load_nemotron_h_config(raw, origin)
    except mapping_nemotron_h.NemotronHConfigError as err:
        raise ModelConfigError(str(err)) from None
    hf.update(family="nemotron_h", norm="RMSNorm", gated_mlp=False, qkv_bias=False, qk_norm=False,
              partial_rotary_factor=0.0, rms_norm_eps=float(hf["layer_norm_epsilon"]))
    return hf
