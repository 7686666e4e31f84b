"""Training and evaluating Nemotron-H (megatron-core's hybrid MambaModel) with the same recipe as the GPT models.

`builders.build_model` / `build_base_model` hand a config of family `nemotron_h` here: the hybrid model is built
from the HF config (`hybrid_model.build_hybrid_model`), its base weights are loaded from `model.checkpoint` (the
`nemotune convert hf-to-megatron` dir, or a full-SFT step dir of an earlier run), and LoRA goes on the HF
projections `hybrid_lora` knows (peft=lora) or every weight trains (peft=none). The SupervisedTrainer, its loss,
checkpoints and resume are the GPT ones; two things differ:

- forward: megatron's MambaModel takes no `loss_mask` and has no `_postprocess` to route through the chunked loss,
  so `install_training_forward` gives it the GPTModel calling convention the trainer uses and the same chunked
  answer-token loss (nemotune.recipes.engine.loss). Batches are unpacked (validate refuses packing), so each row
  is one example plus a padding tail: plain causal attention (no document mask) is exact for its tokens.
- the consolidated adapter (`<step>/adapter`) is an HF PEFT adapter with peft's own names on
  NemotronHForCausalLM (`save_hybrid_adapter`), which `peft` loads directly.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Dict, List, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

# megatron (GPT) target names and `all-linear` in terms of the hybrid model's HF projections
_MEGATRON_ALIASES = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                     "linear_fc1": ("up_proj",), "linear_fc2": ("down_proj",)}
ALL_LINEAR = "all-linear"

PACKING_REASON = (
    "data.packing=true: refused for Nemotron-H, whose Mamba-2 layers would carry their conv and SSM state across "
    "the documents of a pack (megatron's mixer resets it per document only through mamba_ssm's seq_idx, not "
    "derived from nemotune's packed batches yet); set data.packing=false and prepare unpacked data")


def resolve_hybrid_targets(names: List[str]) -> List[str]:
    """HF projection names (hybrid_lora.HF_TARGETS order) for HF names, GPT megatron names or all-linear (every
    projection with an HF PEFT export: Mamba in_proj, attention q/k/v/o, MLP up/down)."""
    from nemotune.recipes.engine.hybrid_lora import DEFAULT_TARGETS, HF_TARGETS, NO_PEFT_EXPORT

    resolved, unknown = set(), []
    for name in names:
        if name == ALL_LINEAR:
            resolved.update(DEFAULT_TARGETS)
        elif name in _MEGATRON_ALIASES:
            resolved.update(_MEGATRON_ALIASES[name])
        elif name in HF_TARGETS:
            resolved.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown LoRA target_modules {unknown} for Nemotron-H; use {ALL_LINEAR!r}, the HF names "
                         f"{list(DEFAULT_TARGETS)} or the megatron names {list(_MEGATRON_ALIASES)}")
    if not resolved:
        raise ValueError("LoRA target_modules is empty")
    if "out_proj" in resolved:
        raise ValueError(f"out_proj: {NO_PEFT_EXPORT}")
    if resolved & {"q_proj", "k_proj", "v_proj"} and not {"q_proj", "k_proj", "v_proj"} <= resolved:
        raise ValueError("q_proj, k_proj and v_proj go together on Nemotron-H (one fused linear_qkv in "
                         "megatron-core); name all three or linear_qkv")
    return [t for t in HF_TARGETS if t in resolved]


def hybrid_problems(cfg: DictConfig) -> List[str]:
    """What `validate()` refuses for a Nemotron-H config, each with its key and fix (before any weights load)."""
    problems = []
    if cfg.data.packing:
        problems.append(PACKING_REASON)
    if OmegaConf.select(cfg, "rl") is not None:
        problems.append("model: Nemotron-H is trained by `nemotune train` (LoRA or full SFT); `nemotune rl` "
                        "(generation through the hybrid model) does not take it yet; use a GPT-family model")
    if cfg.peft.peft_scheme == "lora":
        try:
            resolve_hybrid_targets(list(cfg.peft.lora.target_modules))
        except ValueError as err:
            problems.append(f"peft.lora.target_modules: {err}")
        if cfg.peft.lora.variant != "canonical":
            problems.append(f"peft.lora.variant={cfg.peft.lora.variant}: Nemotron-H adapters are HF PEFT's layout "
                            "only; set peft.lora.variant=canonical")
        if cfg.peft.lora.layer_selection is not None:
            problems.append("peft.lora.layer_selection: not supported for Nemotron-H (every layer of a target kind "
                            "gets its adapter); set it to null")
        if cfg.peft.lora.dropout:
            problems.append(f"peft.lora.dropout={cfg.peft.lora.dropout}: Nemotron-H LoRA has no dropout; set 0")
    if cfg.parallel.pipeline_model_parallel_size > 1:
        problems.append(f"parallel.pipeline_model_parallel_size={cfg.parallel.pipeline_model_parallel_size}: "
                        "Nemotron-H trains with PP=1 here (pipeline stages of the hybrid stack are untested); "
                        "use tensor / data parallelism")
    if cfg.trainer.recompute != "none":
        problems.append(f"trainer.recompute={cfg.trainer.recompute}: not supported for Nemotron-H yet; set "
                        "trainer.recompute=none")
    return problems


# ---- model -------------------------------------------------------------------------------------------------

def build_training_model(cfg: DictConfig, hf: dict, *, lora: bool, trainable: bool = True):
    """The hybrid model with the base weights of model.checkpoint; LoRA on frozen weights (lora), every weight
    trainable (full SFT), or everything frozen (trainable=False: the base alone)."""
    from nemotune.recipes.engine.hybrid_lora import apply_hybrid_lora
    from nemotune.recipes.engine.hybrid_model import build_hybrid_model
    from nemotune.recipes.engine.lora import print_trainable

    if cfg.data.packing:  # also where validate() does not run (nemotune eval's Megatron loss)
        raise ValueError(PACKING_REASON)
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.trainer.precision)
    model = build_hybrid_model(hf, params_dtype=params_dtype, sequence_parallel=cfg.parallel.sequence_parallel,
                               calculate_per_token_loss=True)
    if cfg.model.checkpoint:
        load_base_weights(model, cfg.model.checkpoint, hf)
    install_training_forward(model)
    if lora:
        lc = cfg.peft.lora
        apply_hybrid_lora(model, dim=int(lc.dim), alpha=float(lc.alpha),
                          target_modules=resolve_hybrid_targets(list(lc.target_modules)), seed=cfg.run.seed)
        if cfg.peft.restore_from:
            load_hybrid_adapter(model, cfg.peft.restore_from, dim=int(lc.dim), alpha=float(lc.alpha))
    elif not trainable:
        for param in model.parameters():
            param.requires_grad = False
    print_trainable(model)
    return model


_SHAPE_KEYS = ("hybrid_override_pattern", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups",
               "tie_word_embeddings")


def load_base_weights(model, path: str, hf: Mapping) -> None:
    """Load a converted Nemotron-H checkpoint (`weights/`) or a full-SFT step dir (`dist/`, keys under `model.`)
    after checking that its config.json describes the same shapes as the model's."""
    from nemotune.converters.formats.hf_config import ModelConfigError, load_hf_config

    root = Path(path)
    if (root / "trainer_state.json").is_file():
        state = json.loads((root / "trainer_state.json").read_text())
        if (state.get("peft_scheme") or "lora") != "none" or not (root / "dist").is_dir():
            raise ValueError(f"model.checkpoint={path}: a LoRA training checkpoint holds no base weights; pass the "
                             f"converted base (nemotune convert hf-to-megatron) or a full-SFT (peft=none) step dir")
        weights, config_dir, prefix = root / "dist", root / "hf", "model."
    elif (root / "weights").is_dir():
        weights, config_dir, prefix = root / "weights", root, ""
    else:
        raise ValueError(f"model.checkpoint={path}: not a Nemotron-H checkpoint dir (no weights/ or step dir); "
                         f"convert the model with `nemotune convert hf-to-megatron --hf <hf dir> --out DIR`")
    try:
        theirs = load_hf_config(config_dir, hybrid=True)
    except ModelConfigError as err:
        raise ValueError(f"model.checkpoint={path}: {err}") from None
    differ = [k for k in _SHAPE_KEYS if theirs.get(k) != hf.get(k)]
    if theirs.get("family") != "nemotron_h" or differ:
        what = f"{differ[0]} is {theirs.get(differ[0])!r} there but {hf.get(differ[0])!r} here" if differ \
            else f"it is a {theirs.get('family')} model"
        raise ValueError(f"model.checkpoint={path} holds another model than the one configured ({what}); convert "
                         f"this model's own weights or point model.hf_path at the checkpoint's model")
    _load_dist(model, weights, prefix, path)


def _load_dist(model, weights: Path, prefix: str, path: str) -> None:
    """The model's tensors from a dist checkpoint under the current TP. megatron's mixer stores its fused in_proj /
    conv1d as one tensor per component (`in_proj.weight.z`, `.x`, `.B`, `.C`, `.dt`): a tensor counts as present
    when its components are."""
    from megatron.core import dist_checkpointing

    from nemotune.converters.formats.safe_pickle import check_checkpoint_files

    check_checkpoint_files(weights)  # megatron / torch unpickle its files: only data may be in them
    sharded = {k: v for k, v in model.sharded_state_dict(prefix=prefix).items() if not k.endswith("_extra_state")}
    available = set(dist_checkpointing.load_tensors_metadata(str(weights)))
    absent = sorted(k for k in sharded if k not in available and not any(a.startswith(k + ".") for a in available))
    if absent:
        raise ValueError(f"model.checkpoint={path}: {weights} lacks {len(absent)} tensors this model needs, e.g. "
                         f"{absent[:3]}; was it converted from this model?")
    loaded = dist_checkpointing.load(sharded, str(weights), strict="log_unexpected")
    loaded = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"model.checkpoint={path}: {weights} does not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def install_training_forward(model) -> None:
    """Give the MambaModel the trainer's GPTModel call, `model(ids, positions, mask, labels=, loss_mask=)` ->
    [b, s] per-token loss, through the chunked output layer + cross-entropy; `labels=None` returns logits."""
    from nemotune.recipes.engine import loss

    if getattr(model, "_hybrid_training_forward", False):
        return
    original = model.forward

    def forward(self, input_ids, position_ids, attention_mask=None, decoder_input=None, labels=None,
                loss_mask=None, **kwargs):
        # unpacked rows: one example + padding, for which causal attention is exact (a packed batch never gets
        # here: build_training_model refuses packed data, build_hybrid_model's pre-hook PackedSeqParams)
        if labels is None or not self.post_process or loss.loss_impl() == "plain":
            return original(input_ids, position_ids, None, decoder_input=decoder_input, labels=labels, **kwargs)
        self.post_process = False
        try:
            hidden = original(input_ids, position_ids, None, decoder_input=decoder_input, **kwargs)
        finally:
            self.post_process = True
        return loss.chunked_language_model_loss(self, hidden, labels, loss_mask)

    model.forward = types.MethodType(forward, model)
    model._hybrid_training_forward = True


# ---- the consolidated adapter ------------------------------------------------------------------------------

_ADAPTER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(?:mixer|self_attention|mlp)\.adapter_layer\.(\w+?)\."
                          r"(?:(q_proj|k_proj|v_proj)\.)?linear_(in|out)\.weight$")
_HF_OF_MODULE = {"in_proj": "in_proj", "out_proj": "out_proj", "linear_proj": "o_proj", "linear_fc1": "up_proj",
                 "linear_fc2": "down_proj"}
PEFT_BASE = "base_model.model.model"


def peft_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A gathered hybrid adapter (megatron names, TP=1 layout) under peft's names on NemotronHForCausalLM."""
    from nemotune.recipes.engine.hybrid_lora import NO_PEFT_EXPORT

    out = {}
    for key, tensor in state.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise ValueError(f"{key}: not a Nemotron-H LoRA adapter tensor")
        layer, module, qkv, side = match.groups()
        name = qkv or _HF_OF_MODULE[module]
        if name == "out_proj":
            raise ValueError(NO_PEFT_EXPORT)
        out[f"{PEFT_BASE}.layers.{layer}.mixer.{name}.lora_{'A' if side == 'in' else 'B'}.weight"] = tensor
    return out


def save_hybrid_adapter(out_dir, state: Mapping[str, torch.Tensor], config: Mapping, tokenizer=None) -> Path:
    """`<step>/adapter` for Nemotron-H: adapter_model.safetensors + adapter_config.json (HF PEFT, loadable by peft on
    NemotronHForCausalLM), nemotune_adapter.json and the training tokenizer's files; written atomically."""
    from safetensors.torch import save_file

    from nemotune.converters.formats.adapters import (ADAPTER_CONFIG, NEMOTUNE_CONFIG, PEFT_WEIGHTS, AdapterError)
    from nemotune.converters.formats.outputs import output_target
    from nemotune.converters.formats.tokenizer_files import write_tokenizer

    peft_state = {k: v.detach().to("cpu").contiguous() for k, v in peft_names(state).items()}
    if not peft_state:
        raise ValueError("the model has no LoRA adapters to save")
    targets = sorted({key.split(".")[-3] for key in peft_state})
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(config["dim"]),
                   "lora_alpha": float(config["alpha"]), "lora_dropout": 0.0, "bias": "none",
                   "target_modules": targets, "base_model_name_or_path": config.get("base_model_name_or_path"),
                   "fan_in_fan_out": False, "inference_mode": True}
    with output_target(out_dir, verb="train", overwrite=True, error=AdapterError) as tmp:
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer, what="tokenizer")
        save_file(peft_state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / NEMOTUNE_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def load_hybrid_adapter(model, path: str, *, dim: int, alpha: float) -> None:
    """peft.restore_from for Nemotron-H: an HF PEFT adapter dir (a checkpoint's adapter/, or a run / step dir
    holding one) into the model's LoRA, this TP rank's part of each tensor. Its rank, alpha and targets must be
    the configured ones (each difference is named with the key to set)."""
    from safetensors.torch import load_file

    from nemotune.converters.formats.adapters import ADAPTER_CONFIG, PEFT_WEIGHTS
    from nemotune.recipes.engine.builders import restore_dir
    from nemotune.recipes.engine.hybrid_lora import shard

    where = restore_dir(path)
    if not (where / PEFT_WEIGHTS).is_file() or not (where / ADAPTER_CONFIG).is_file():
        raise ValueError(f"peft.restore_from={path}: no {PEFT_WEIGHTS} + {ADAPTER_CONFIG} in {where}; pass a "
                         f"Nemotron-H training checkpoint, its adapter/ dir or an HF PEFT adapter dir")
    config = json.loads((where / ADAPTER_CONFIG).read_text())
    if int(config.get("r", -1)) != dim or float(config.get("lora_alpha", -1)) != alpha:
        raise ValueError(f"peft.restore_from={path}: the adapter has r={config.get('r')} lora_alpha="
                         f"{config.get('lora_alpha')}; set peft.lora.dim={config.get('r')} "
                         f"peft.lora.alpha={config.get('lora_alpha')}")
    saved = load_file(str(where / PEFT_WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if ".adapter_layer." in n}
    names = {name: next(iter(peft_names({name: param}))) for name, param in params.items()}
    absent = sorted(set(names.values()) - set(saved))
    extra = sorted(set(saved) - set(names.values()))
    if absent or extra:
        raise ValueError(f"peft.restore_from={path}: the adapter's targets ({config.get('target_modules')}) differ "
                         f"from peft.lora.target_modules: {len(absent)} tensors missing (e.g. {absent[:2]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:2]})")
    with torch.no_grad():
        for name, param in params.items():
            full = saved[names[name]]
            part = shard(full, param)
            if tuple(part.shape) != tuple(param.shape):
                raise ValueError(f"peft.restore_from={path}: {names[name]} is {list(full.shape)}, which does not "
                                 f"fit this model; was the adapter trained on another model?")
            param.copy_(part.to(param.dtype))
