"""LoRA adapters: the consolidated Megatron adapter dir, HF PEFT, NeMo 1.x ``.nemo`` LoRA, and merging.

Consolidated adapter dir (what training writes; full TP=1 tensors, NeMo mcore keys without ``model.``):
  adapter_weights.safetensors  decoder.layers.N.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight ...
  adapter_config.json          {"dim", "alpha", "dropout", "target_modules", "layer_selection", "base_model",
                                "base_model_name_or_path", "base_checkpoint_sha256"}
Effective weight of a target: W + (alpha / dim) * linear_out @ linear_in.

Megatron target -> (NeMo adapter, NeMo target name, HF modules):
  linear_qkv -> lora_kqv_adapter,             attention_qkv,   q_proj k_proj v_proj (B split per query group)
  linear_proj -> lora_dense_attention_adapter, attention_dense, o_proj
  linear_fc1 -> lora_hto4h_adapter,           mlp_fc1,         gate_proj up_proj (B split in halves)
  linear_fc2 -> lora_4htoh_adapter,           mlp_fc2,         down_proj
A fused adapter becomes several HF adapters sharing ``lora_A`` -- an exact split. Importing PEFT adapters whose
q/k/v (or gate/up) A matrices differ stacks them: A = cat(A_q, A_k, A_v), B block-diagonal, dim x3 and alpha x3,
which is again exact.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from converters.mapping import LlamaDims, fuse_gate_up, fuse_qkv, split_gate_up, split_qkv

log = logging.getLogger("nemotune.converters")

ADAPTER_WEIGHTS = "adapter_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Target:
    megatron: str  # linear_qkv
    block: str  # self_attention | mlp
    nemo_adapter: str  # lora_kqv_adapter
    nemo_target: str  # attention_qkv (NeMo's lora_tuning.target_modules vocabulary)
    hf_modules: tuple[str, ...]  # ("self_attn.q_proj", ...)
    split: Callable[[torch.Tensor, LlamaDims], tuple[torch.Tensor, ...]]
    fuse: Callable[[list[torch.Tensor], LlamaDims], torch.Tensor]


TARGETS: dict[str, Target] = {t.megatron: t for t in (
    Target("linear_qkv", "self_attention", "lora_kqv_adapter", "attention_qkv",
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), split_qkv, lambda p, d: fuse_qkv(*p, d)),
    Target("linear_proj", "self_attention", "lora_dense_attention_adapter", "attention_dense",
           ("self_attn.o_proj",), lambda t, d: (t,), lambda p, d: p[0]),
    Target("linear_fc1", "mlp", "lora_hto4h_adapter", "mlp_fc1",
           ("mlp.gate_proj", "mlp.up_proj"), split_gate_up, lambda p, d: fuse_gate_up(*p)),
    Target("linear_fc2", "mlp", "lora_4htoh_adapter", "mlp_fc2",
           ("mlp.down_proj",), lambda t, d: (t,), lambda p, d: p[0]),
)}
_NEMO_TARGET_ALIASES = {"attention": ["linear_qkv", "linear_proj"], "mlp": ["linear_fc1", "linear_fc2"],
                        "all": list(TARGETS)}
_ADAPTER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention|mlp)\.adapter_layer\.(\w+)\.(linear_in|linear_out)\.weight$")


class AdapterError(ValueError):
    """An adapter cannot be read, converted or applied; the message says why."""


def adapter_key(layer: int, target: str, which: str) -> str:
    """Megatron key of a LoRA matrix; ``which`` is linear_in (A, [dim, in]) or linear_out (B, [out, dim])."""
    t = TARGETS[target]
    return f"decoder.layers.{layer}.{t.block}.adapter_layer.{t.nemo_adapter}.{which}.weight"


def parse_adapter_key(key: str) -> tuple[int, str, str]:
    """(layer, megatron target, linear_in|linear_out) of a Megatron adapter key."""
    match = _ADAPTER_KEY.match(key)
    by_adapter = {t.nemo_adapter: t.megatron for t in TARGETS.values()}
    if match is None or match.group(3) not in by_adapter:
        raise AdapterError(f"not a LoRA adapter key: {key!r}")
    return int(match.group(1)), by_adapter[match.group(3)], match.group(4)


def adapter_shapes(dims: LlamaDims, dim: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """target -> (linear_in shape, linear_out shape)."""
    attn = dims.heads * dims.head_dim
    return {
        "linear_qkv": ((dim, dims.hidden), (dims.qkv_rows, dim)),
        "linear_proj": ((dim, attn), (dims.hidden, dim)),
        "linear_fc1": ((dim, dims.hidden), (2 * dims.ffn, dim)),
        "linear_fc2": ((dim, dims.ffn), (dims.hidden, dim)),
    }


def adapter_layers(config: Mapping[str, Any]) -> list[int]:
    dims = LlamaDims.from_hf(config["base_model"])
    selection = config.get("layer_selection")
    return sorted(selection) if selection else list(range(dims.num_layers))


def validate_adapter(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Every problem at once: missing fields, unknown targets, missing / unexpected keys, wrong shapes."""
    problems = [f"adapter_config.json: missing field {k!r}" for k in ("dim", "alpha", "target_modules", "base_model")
                if k not in config]
    if problems:
        raise AdapterError("\n".join(problems))
    unknown = [t for t in config["target_modules"] if t not in TARGETS]
    if unknown:
        raise AdapterError(f"unknown target_modules {unknown}; use {list(TARGETS)}")
    dims = LlamaDims.from_hf(config["base_model"])
    shapes = adapter_shapes(dims, int(config["dim"]))
    expected = {adapter_key(layer, target, which): shapes[target][i]
                for layer in adapter_layers(config) for target in config["target_modules"]
                for i, which in enumerate(("linear_in", "linear_out"))}
    problems += [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {list(state[k].shape)}, expected {list(s)}" for k, s in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(s)]
    if problems:
        raise AdapterError("adapter does not match its config:\n  " + "\n  ".join(problems))


def save_adapter(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write the consolidated adapter dir (validated; tensors saved contiguous on the CPU)."""
    from safetensors.torch import save_file

    from converters.checkpoint import atomic_output

    config = {"dropout": 0.0, "layer_selection": None, "base_model_name_or_path": None, **dict(config)}
    validate_adapter(state_dict, config)
    with atomic_output(out_dir, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "producer": "nemotune"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_adapter(path: str | Path, *, base_config: Mapping[str, Any] | str | Path | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a consolidated adapter dir, or an HF PEFT LoRA dir (converted to the Megatron keys).

    For a PEFT dir the base model's HF config comes from ``base_config`` (dict or checkpoint dir) or else
    from ``base_model_name_or_path`` when that is a local directory.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if (path / ADAPTER_WEIGHTS).is_file():
        state = load_file(str(path / ADAPTER_WEIGHTS))
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        validate_adapter(state, config)
        return state, config
    if (path / ADAPTER_CONFIG).is_file():
        return _load_peft(path, base_config)
    raise AdapterError(f"{path}: neither a nemotune adapter dir ({ADAPTER_WEIGHTS}) nor an HF PEFT dir")


# ---- HF PEFT ---------------------------------------------------------------------------------------------------

def _hf_module_target(module: str) -> tuple[str, int]:
    for target in TARGETS.values():
        for i, name in enumerate(target.hf_modules):
            if name.split(".")[-1] == module:
                return target.megatron, i
    raise AdapterError(f"PEFT target module {module!r} has no Megatron counterpart "
                       f"(supported: {[m.split('.')[-1] for t in TARGETS.values() for m in t.hf_modules]})")


def to_peft(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
            base_model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Megatron adapter -> (PEFT state dict, adapter_config.json dict)."""
    dims = LlamaDims.from_hf(config["base_model"])
    peft_state: dict[str, torch.Tensor] = {}
    for layer in adapter_layers(config):
        for target_name in config["target_modules"]:
            target = TARGETS[target_name]
            lora_a = state[adapter_key(layer, target_name, "linear_in")]
            lora_bs = target.split(state[adapter_key(layer, target_name, "linear_out")], dims)
            for module, lora_b in zip(target.hf_modules, lora_bs):
                prefix = f"{PEFT_PREFIX}model.layers.{layer}.{module}"
                peft_state[f"{prefix}.lora_A.weight"] = lora_a.clone().contiguous()
                peft_state[f"{prefix}.lora_B.weight"] = lora_b.clone().contiguous()
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(config["dim"]),
        "lora_alpha": config["alpha"],
        "lora_dropout": float(config.get("dropout") or 0.0),
        "bias": "none",
        "target_modules": sorted(m.split(".")[-1] for t in config["target_modules"] for m in TARGETS[t].hf_modules),
        "layers_to_transform": list(config["layer_selection"]) if config.get("layer_selection") else None,
        "base_model_name_or_path": base_model_name_or_path or config.get("base_model_name_or_path"),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    return peft_state, peft_config


def _base_config_for(peft_config: Mapping[str, Any], base_config) -> dict:
    from converters.checkpoint import read_hf_config

    if isinstance(base_config, Mapping):
        return read_hf_config(base_config)
    candidate = base_config or peft_config.get("base_model_name_or_path")
    if candidate and (Path(candidate) / "config.json").is_file():
        return read_hf_config(Path(candidate))
    raise AdapterError("converting a PEFT adapter needs the base model's config: pass base_config (an HF dir or "
                       f"config dict); base_model_name_or_path={candidate!r} is not a local directory")


def _load_peft(path: Path, base_config) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    peft_config = json.loads((path / ADAPTER_CONFIG).read_text())
    if peft_config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_config.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if peft_config.get(k)]
    unsupported += [k for k in ("use_dora", "fan_in_fan_out") if peft_config.get(k)]
    if peft_config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"{path}: PEFT options {unsupported} have no Megatron LoRA equivalent")
    if (path / PEFT_WEIGHTS).is_file():
        peft_state = load_file(str(path / PEFT_WEIGHTS))
    elif (path / "adapter_model.bin").is_file():
        peft_state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{path}: no {PEFT_WEIGHTS}")
    hf = _base_config_for(peft_config, base_config)
    dims = LlamaDims.from_hf(hf)
    rank = int(peft_config["r"])
    alpha = float(peft_config["lora_alpha"])
    if peft_config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r)
    pattern = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
    found: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in peft_state.items():
        match = pattern.match(key)
        if match is None:
            raise AdapterError(f"{path}: unexpected PEFT key {key!r}")
        target, index = _hf_module_target(match.group(2))
        found.setdefault((int(match.group(1)), target), {}).setdefault(index, {})[match.group(3)] = tensor
    targets = sorted({t for _, t in found}, key=list(TARGETS).index)
    layers = sorted({layer for layer, _ in found})
    # A fused target whose parts do not share A is stacked: dim grows by the number of parts, exactly.
    stack = 1
    for (layer, target), parts in found.items():
        a_mats = [p["A"] for p in parts.values()]
        if any(not torch.equal(a_mats[0], a) for a in a_mats[1:]):
            stack = max(stack, len(parts))
    shapes = adapter_shapes(dims, rank * stack)
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        for target in targets:
            parts = found.get((layer, target), {})
            t = TARGETS[target]
            out_rows = [part.shape[0] for part in t.split(torch.empty(shapes[target][1][0], 0), dims)]
            lora_a = torch.zeros(shapes[target][0], dtype=torch.float32)
            slots = {index: slot if stack > 1 else 0 for slot, index in enumerate(sorted(parts))}
            b_parts = []
            for index, rows in enumerate(out_rows):
                b = torch.zeros(rows, rank * stack)
                if index in parts:
                    cols = slice(slots[index] * rank, (slots[index] + 1) * rank)
                    lora_a[cols] = parts[index]["A"].float()
                    b[:, cols] = parts[index]["B"].float()
                b_parts.append(b)
            state[adapter_key(layer, target, "linear_in")] = lora_a
            state[adapter_key(layer, target, "linear_out")] = t.fuse(b_parts, dims)
    all_layers = list(range(dims.num_layers))
    config = {
        "dim": rank * stack,
        "alpha": alpha * stack,
        "dropout": float(peft_config.get("lora_dropout") or 0.0),
        "target_modules": targets,
        "layer_selection": None if layers == all_layers else layers,
        "base_model": hf,
        "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
    }
    validate_adapter(state, config)
    return state, config


def export_hf_peft(adapter_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                   overwrite: bool = False) -> Path:
    """Consolidated adapter -> HF PEFT dir (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    from converters.checkpoint import atomic_output

    state, config = load_adapter(adapter_dir)
    peft_state, peft_config = to_peft(state, config, base_model_name_or_path=base_model_name_or_path)
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        save_file(peft_state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return Path(out_dir)


# ---- NeMo .nemo LoRA -------------------------------------------------------------------------------------------

def nemo_peft_section(config: Mapping[str, Any]) -> dict:
    """The ``peft`` section of a NeMo 1.x model_config.yaml for this adapter."""
    return {
        "peft_scheme": "lora",
        "restore_from_path": None,
        "lora_tuning": {
            "variant": "nemo",
            "target_modules": [TARGETS[t].nemo_target for t in config["target_modules"]],
            "adapter_dim": int(config["dim"]),
            "alpha": config["alpha"],
            "adapter_dropout": float(config.get("dropout") or 0.0),
            "column_init_method": "xavier",
            "row_init_method": "zero",
            "layer_selection": list(config["layer_selection"]) if config.get("layer_selection") else None,
            "weight_tying": False,
            "position_embedding_strategy": None,
        },
    }


def export_nemo_lora(adapter_dir: str | Path, out_path: str | Path, *, overwrite: bool = False) -> Path:
    """Consolidated adapter -> NeMo 1.x LoRA ``.nemo`` (model_config.yaml with ``peft`` + model_weights.ckpt)."""
    import yaml

    from converters.checkpoint import atomic_output, nemo_model_config, write_tar

    state, config = load_adapter(adapter_dir)
    if any(t != "linear_qkv" for t in config["target_modules"]):
        log.warning("TensorRT-LLM and NIM load only the qkv adapter (lora_kqv_adapter) from a .nemo LoRA; the "
                    "other targets %s are written for NeMo but will be ignored there -- export HF PEFT for vLLM / "
                    "NIM instead", [t for t in config["target_modules"] if t != "linear_qkv"])
    model_config = nemo_model_config(config["base_model"],
                                     tokenizer_type=config.get("base_model_name_or_path") or "nemo:hf")
    model_config["peft"] = nemo_peft_section(config)
    nemo_state = {"model." + k: v.detach().clone().contiguous() for k, v in state.items()}
    with atomic_output(out_path, overwrite=overwrite, is_dir=False) as tmp_file:
        staging = tmp_file.parent / "staging"
        staging.mkdir()
        (staging / "model_config.yaml").write_text(yaml.safe_dump(model_config, sort_keys=False))
        torch.save(nemo_state, staging / "model_weights.ckpt")
        write_tar(staging, tmp_file)
    return Path(out_path)


def read_nemo_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter tensors with their ``model.`` keys, model_config.yaml) of a NeMo LoRA ``.nemo``."""
    import tempfile

    import yaml

    from converters.checkpoint import safe_extract

    with tempfile.TemporaryDirectory(prefix="nemotune-lora-") as tmp:
        safe_extract(Path(path), Path(tmp))
        weights = torch.load(Path(tmp) / "model_weights.ckpt", map_location="cpu", weights_only=True)
        config = yaml.safe_load((Path(tmp) / "model_config.yaml").read_text())
    return weights, config


# ---- merge -----------------------------------------------------------------------------------------------------

def lora_deltas(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF weight name -> (B, A) with the alpha/dim scale folded into B."""
    dims = LlamaDims.from_hf(config["base_model"])
    scale = float(config["alpha"]) / float(config["dim"])
    deltas = {}
    for layer in adapter_layers(config):
        for target_name in config["target_modules"]:
            target = TARGETS[target_name]
            lora_a = state[adapter_key(layer, target_name, "linear_in")].float()
            lora_bs = target.split(state[adapter_key(layer, target_name, "linear_out")].float(), dims)
            for module, lora_b in zip(target.hf_modules, lora_bs):
                deltas[f"model.layers.{layer}.{module}.weight"] = (lora_b * scale, lora_a)
    return deltas


def merge_adapter(hf_base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                  overwrite: bool = False, progress: bool = True) -> Path:
    """Base HF checkpoint + adapter -> full HF checkpoint with W + alpha/dim * B @ A, shard by shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from converters.checkpoint import INDEX_NAME, atomic_output, copy_auxiliary_files, inspect_hf_checkpoint

    hf_base_dir = Path(hf_base_dir)
    hf, weight_map, _ = inspect_hf_checkpoint(hf_base_dir)
    state, config = load_adapter(adapter_dir, base_config=hf)
    base_dims, adapter_dims = LlamaDims.from_hf(hf), LlamaDims.from_hf(config["base_model"])
    if base_dims != adapter_dims:
        raise AdapterError(f"adapter was trained on {adapter_dims}, base checkpoint is {base_dims}")
    deltas = lora_deltas(state, config)
    applied = set()
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        shards = sorted(set(weight_map.values()))
        for shard in tqdm(shards, desc="merging shards", unit="shard", disable=not progress):
            out_tensors = {}
            with safe_open(str(shard), framework="pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if name in deltas:
                        lora_b, lora_a = deltas[name]
                        tensor = (tensor.float() + lora_b @ lora_a).to(tensor.dtype)
                        applied.add(name)
                    out_tensors[name] = tensor
            save_file(out_tensors, str(tmp / shard.name), metadata=metadata)
            del out_tensors
        if (hf_base_dir / INDEX_NAME).is_file():
            (tmp / INDEX_NAME).write_text((hf_base_dir / INDEX_NAME).read_text())
        copy_auxiliary_files(hf_base_dir, tmp)
        if applied != set(deltas):
            raise AdapterError(f"base checkpoint lacks adapted weights {sorted(set(deltas) - applied)}")
    return Path(out_dir)
