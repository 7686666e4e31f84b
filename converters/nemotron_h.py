"""`nemotune convert` for Nemotron-H (NemotronHForCausalLM): HF <-> Megatron dist checkpoint, and verify.

The same formats and guarantees as the Llama conversions (nemotune.converters.checkpoint): the Megatron side is
megatron-core's hybrid MambaModel (TP=1/PP=1, built by nemotune.recipes.engine.hybrid_model) saved as a dist
checkpoint (`weights/`, loadable under any TP: megatron's own sharded state dict splits the mixer's fused
in_proj / conv1d per component), the config and tokenizer files beside it; outputs appear by rename. The name
table is nemotune.converters.formats.mapping_nemotron_h (renames plus the attention qkv fusion: exact).

`verify` compares against transformers' NemotronHForCausalLM in fp32 with its mixers' dt limit set to the
config's own `time_step_limit`: transformers floors softplus(dt) at `time_step_min` (0.001), megatron-core's
mixer (what trains and serves these models in NeMo) applies no floor; the two agree exactly when no dt falls
below 0.001 and the floor is the only difference otherwise (tests/test_nemotron_h.py measures both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from nemotune.converters.checkpoint import MARKER_NAME, _bytes, _check_output, _dtype, _marker, _output
from nemotune.converters.formats import mapping_nemotron_h as mh
from nemotune.converters.formats.checkpoint import (
    ConversionError,
    copy_auxiliary_files,
    save_dist_checkpoint,
    write_hf_shards,
)
from nemotune.converters.formats.hf_config import ModelConfigError, read_config_json
from nemotune.converters.formats.safe_pickle import check_checkpoint_files


def config_of(path: str | Path) -> dict | None:
    """The raw config.json of an HF dir or a converted Megatron dir when it describes Nemotron-H, else None."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        raw = read_config_json(config_file)
    except ModelConfigError:
        return None  # the Llama path reports it
    return raw if mh.is_nemotron_h(raw) else None


def _load(raw: Mapping[str, Any], origin: str) -> dict:
    try:
        return mh.load_nemotron_h_config(raw, origin)
    except mh.NemotronHConfigError as err:
        raise ConversionError(str(err)) from None


def _read_hf_state(hf_dir: Path) -> tuple[dict, torch.dtype]:
    """Every tensor of an HF dir's safetensors files (no pickle) and their dtype."""
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors files; expected a Hugging Face checkpoint directory")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return state, (dtypes.pop() if len(dtypes) == 1 else torch.float32)


def build_conversion_model(hf: Mapping[str, Any], dtype: torch.dtype = torch.float32):
    from nemotune.recipes.engine.hybrid_model import build_hybrid_model

    return build_hybrid_model(hf, init_weights=False, device="cpu", params_dtype=dtype, pre_process=True,
                              post_process=True)


def _megatron_state(hf: Mapping[str, Any], hf_state: Mapping[str, torch.Tensor], origin: Path) -> dict:
    try:
        return mh.hf_to_megatron(hf_state, hf)
    except ValueError as err:
        raise ConversionError(f"{origin}: {err}") from None


def _fill(model, state: Mapping[str, torch.Tensor], origin: Path) -> None:
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} (config implies {list(own[k].shape)})" for k, v in state.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ConversionError(f"{origin}: tensors do not match config.json: {wrong[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, dtype=None, overwrite: bool = False,
                   progress: bool = True) -> Path:
    hf_dir = Path(hf_dir)
    _check_output(out_dir, [hf_dir], overwrite)
    hf = _load(config_of(hf_dir) or {}, str(hf_dir / "config.json"))
    hf_state, ckpt_dtype = _read_hf_state(hf_dir)
    dtype = _dtype(dtype, ckpt_dtype)
    state = _megatron_state(hf, hf_state, hf_dir)  # a missing tensor is named before the model is built
    model = build_conversion_model(hf, dtype)
    _fill(model, state, hf_dir)
    del hf_state, state
    with _output(out_dir, inputs=[hf_dir], overwrite=overwrite) as tmp:
        save_dist_checkpoint(model, tmp / "weights")
        copy_auxiliary_files(hf_dir, tmp)
        (tmp / MARKER_NAME).write_text(_marker("megatron-dist", hf, hf_dir, dtype))
    return Path(out_dir)


def load_weights(model, weights: Path) -> None:
    """Load a dist checkpoint into the hybrid model under the current TP. megatron's mixer saves its fused
    in_proj / conv1d as one tensor per component (`in_proj.weight.z`, `.x`, `.B`, `.C`, `.dt`), which is what
    makes the checkpoint loadable at any TP; a missing component is named."""
    from megatron.core import dist_checkpointing

    check_checkpoint_files(weights)
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    available = set(dist_checkpointing.load_tensors_metadata(str(weights)))
    absent = sorted(k for k in sharded if k not in available and not any(a.startswith(k + ".") for a in available))
    if absent:
        raise ConversionError(f"{weights}: the checkpoint lacks {len(absent)} tensors this model needs, e.g. "
                              f"{absent[:3]}; was it converted from a model of this shape?")
    loaded = dist_checkpointing.load(sharded, str(weights), strict="log_unexpected")
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{weights}: missing {missing}, unexpected {unexpected}")


def model_from_checkpoint(ckpt: str | Path, *, dtype=torch.float32):
    ckpt = Path(ckpt)
    if not (ckpt / "weights").is_dir():
        raise ConversionError(f"{ckpt}: no weights/ folder; pass a dir written by `nemotune convert hf-to-megatron`")
    check_checkpoint_files(ckpt / "weights")
    hf = _load(config_of(ckpt) or {}, str(ckpt / "config.json"))
    model = build_conversion_model(hf, dtype)
    load_weights(model, ckpt / "weights")
    return hf, model


def megatron_to_hf(ckpt: str | Path, out_dir: str | Path, *, max_shard_size: int | str = "5GB", dtype=None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    ckpt = Path(ckpt)
    _check_output(out_dir, [ckpt], overwrite)
    marker = json.loads((ckpt / MARKER_NAME).read_text()) if (ckpt / MARKER_NAME).is_file() else {}
    hf, model = model_from_checkpoint(ckpt, dtype=_dtype(dtype or marker.get("dtype"), torch.float32))
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    named = list(mh.megatron_to_hf(state, hf, base_prefix="backbone.").items())
    with _output(out_dir, inputs=[ckpt], overwrite=overwrite) as tmp:
        write_hf_shards(named, tmp, max_shard_size=_bytes(max_shard_size), progress=progress)
        copy_auxiliary_files(ckpt, tmp)
    return Path(out_dir)


def verify(hf_dir: str | Path, ckpt: str | Path, *, batch_size: int = 2, seq_len: int = 32, seed: int = 0,
           adapter=None, peft_dir=None) -> float:
    """Max |logit difference| between transformers' NemotronHForCausalLM (HF dir) and the hybrid Megatron
    model (ckpt), fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    if adapter is not None or peft_dir is not None:
        raise ConversionError("verify --adapter / --peft: LoRA adapters for Nemotron-H are not supported yet")
    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size)):
        if int(value) < 1:
            raise ConversionError(f"{name} {value}: must be >= 1 (the batch of random tokens compared)")
    hf, model = model_from_checkpoint(ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    limit = tuple(getattr(hf_model.config, "time_step_limit", (0.0, float("inf"))))
    for layer in hf_model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = limit
    from nemotune.converters.checkpoint import max_logit_difference

    return max_logit_difference(hf_model, model, hf["vocab_size"], batch_size=batch_size, seq_len=seq_len, seed=seed)


def write_peft_adapter(model, out_dir: str | Path, *, dim: int, alpha: float, base_model: str | None = None,
                       overwrite: bool = False) -> Path:
    """The LoRA adapters of a TP=1 hybrid model as an HF PEFT adapter dir for NemotronHForCausalLM
    (adapter_model.safetensors + adapter_config.json), written atomically."""
    from safetensors.torch import save_file

    from nemotune.recipes.engine.hybrid_lora import peft_state_dict

    state = peft_state_dict(model)
    if not state:
        raise ConversionError("the model has no LoRA adapters to export")
    targets = sorted({key.split(".")[-3] for key in state})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": dim, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "target_modules": targets, "base_model_name_or_path": base_model,
              "fan_in_fan_out": False, "inference_mode": True}
    _check_output(out_dir, [], overwrite)
    with _output(out_dir, inputs=[], overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)
