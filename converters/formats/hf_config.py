"""The Hugging Face ``config.json`` of a supported model, read and normalised once for the whole project.

Every part that needs the architecture (the model builder, config validation, the converters, adapter
export) reads it here, so the defaults transformers applies to absent fields live in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from omegaconf import MISSING


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# HF fields we read, with the defaults transformers' LlamaConfig applies when a field is absent.
_HF_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass
class ModelConfig:
    """A model group file (conf/model/<name>.yaml) names the model, its architecture and its tokenizer."""
    name: str = MISSING
    # fields of the Hugging Face config.json (LlamaForCausalLM); hf_path's config.json wins when set
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


def load_hf_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict:
    """Return a normalized LlamaForCausalLM config dict from a checkpoint dir, a config.json or a dict."""
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
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if raw.get("model_type", "llama") != "llama" or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ModelConfigError(
            f"{origin}: unsupported architecture {architectures} (model_type {raw.get('model_type')!r}); "
            f"nemotune supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    missing = [k for k in _HF_REQUIRED if k not in raw]
    if missing:
        raise ModelConfigError(f"{origin}: missing fields {missing}")
    hf = {**_HF_DEFAULTS, **raw}
    hf.setdefault("num_key_value_heads", hf["num_attention_heads"])
    hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    hf["architectures"] = list(architectures)
    hf["model_type"] = "llama"
    if hf["hidden_act"] != "silu":
        raise ModelConfigError(f"{origin}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf["attention_bias"] or hf["mlp_bias"]:
        raise ModelConfigError(f"{origin}: attention_bias / mlp_bias are not supported")
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("llama3", "default"):
            raise ModelConfigError(f"{origin}: rope_scaling type {kind!r} is not supported (llama3 only)")
    return hf
