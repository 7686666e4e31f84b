"""LoRA adapters: the training checkpoint's adapter dir (an HF PEFT adapter), HF PEFT, NeMo 1.x ``.nemo`` LoRA, merging.

The adapter dir training writes (``<checkpoint>/adapter``; full TP=1 tensors) is itself a valid HF PEFT adapter
(``peft.PeftModel.from_pretrained(base, <checkpoint>/adapter)``, vLLM ``--lora-modules``, the Hub):
  adapter_config.json          PEFT's schema (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules
                               with HF names, layers_to_transform from 0, ...), as ``peft.LoraConfig`` writes it
  adapter_model.safetensors    PEFT keys: base_model.model.model.layers.N.<module>.lora_{A,B}.weight
  nemotune_adapter.json        nemotune's metadata: {"dim", "alpha", "dropout", "target_modules" (Megatron names),
                               "layer_selection" (1-based, as in NeMo; null = all), "variant", "base_model" (HF
                               config), "base_model_name_or_path", "base_checkpoint", ...}
  adapter_weights.safetensors  variant nemo only: the fused Megatron tensors (NeMo mcore keys without ``model.``);
                               a fused adapter shares one A across q, k, v (gate, up), which PEFT can only hold
                               as copies, so these are what nemotune reads back; the PEFT files beside them are
                               the same adapter with A copied per module (exact for serving)
  tokenizer files + chat_template.jinja   the training tokenizer, when the writer is given it
Directories written before this layout (``adapter_config.json`` holding nemotune's schema) are still read.

Effective weight of a target: W + (alpha / dim) * linear_out @ linear_in, with linear_in (A) [dim, in] and
linear_out (B) [out, dim].

The targets and their keys by variant (``nemotune.recipes.engine.lora`` builds the same modules; names are NeMo 1.x's AdapterName):
  Megatron     NeMo target      HF modules            variant nemo (fused)          variant canonical (per HF module)
  linear_qkv   attention_qkv    q_proj k_proj v_proj  lora_kqv_adapter              lora_unfused_kqv_adapter.{q,k,v}_adapter
  linear_proj  attention_dense  o_proj                lora_dense_attention_adapter  (same)
  linear_fc1   mlp_fc1          gate_proj up_proj     lora_hto4h_adapter            lora_unfused_hto4h_adapter.{gate,up}_adapter
  linear_fc2   mlp_fc2          down_proj             lora_4htoh_adapter            (same)
Fused B rows: linear_qkv's interleaved per-query-group layout (split_qkv), linear_fc1's cat(gate, up).
Canonical shapes: q B [heads*head_dim, dim], k/v B [groups*head_dim, dim], gate/up B [ffn, dim].

Every format goes through one form, a list of (A, B) pairs per (layer, target) in HF-module order:
  canonical <-> pairs  a renaming (HF PEFT is canonical 1:1);
  nemo -> pairs        A copied to every HF module, B split -- always exact;
  pairs -> nemo        exact when the modules of a target share A (B fused); otherwise only by stacking
                       (A = cat(A_q, A_k, A_v), B block-diagonal, dim and alpha x n) when asked, else an error.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from nemotune.converters.formats.hf_config import load_hf_config, read_config_json
from nemotune.converters.formats.mapping import LlamaDims, fuse_gate_up, fuse_qkv, split_gate_up, split_qkv

log = logging.getLogger("nemotune.converters")

ADAPTER_WEIGHTS = "adapter_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
NEMOTUNE_CONFIG = "nemotune_adapter.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
VARIANTS = ("canonical", "nemo")
DEFAULT_VARIANT = "nemo"  # adapter dirs written before the variant field existed hold fused adapters


@dataclass(frozen=True)
class Target:
    megatron: str  # linear_qkv
    block: str  # self_attention | mlp
    nemo_target: str  # attention_qkv (NeMo's lora_tuning.target_modules vocabulary)
    nemo_adapter: str  # fused adapter (variant nemo): lora_kqv_adapter
    canonical_adapter: str  # variant canonical: lora_unfused_kqv_adapter
    parts: tuple[tuple[Optional[str], str], ...]  # (canonical sub-adapter or None, HF module) per HF module
    split: Callable[[torch.Tensor, LlamaDims], tuple[torch.Tensor, ...]]  # fused B -> B per HF module
    fuse: Callable[[list[torch.Tensor], LlamaDims], torch.Tensor]

    @property
    def hf_modules(self) -> tuple[str, ...]:
        return tuple(module for _, module in self.parts)

    def prefixes(self, variant: str) -> list[str]:
        """Key infix after ``adapter_layer.`` of each (A, B) pair this variant stores for the target."""
        if variant == "nemo":
            return [self.nemo_adapter]
        return [f"{self.canonical_adapter}.{sub}" if sub else self.canonical_adapter for sub, _ in self.parts]


def _single(t, d):
    return (t,)


def _only(parts, d):
    return parts[0]


TARGETS: dict[str, Target] = {t.megatron: t for t in (
    Target("linear_qkv", "self_attention", "attention_qkv", "lora_kqv_adapter", "lora_unfused_kqv_adapter",
           (("q_adapter", "self_attn.q_proj"), ("k_adapter", "self_attn.k_proj"), ("v_adapter", "self_attn.v_proj")),
           split_qkv, lambda p, d: fuse_qkv(*p, d)),
    Target("linear_proj", "self_attention", "attention_dense", "lora_dense_attention_adapter",
           "lora_dense_attention_adapter", ((None, "self_attn.o_proj"),), _single, _only),
    Target("linear_fc1", "mlp", "mlp_fc1", "lora_hto4h_adapter", "lora_unfused_hto4h_adapter",
           (("gate_adapter", "mlp.gate_proj"), ("up_adapter", "mlp.up_proj")), split_gate_up,
           lambda p, d: fuse_gate_up(*p)),
    Target("linear_fc2", "mlp", "mlp_fc2", "lora_4htoh_adapter", "lora_4htoh_adapter",
           ((None, "mlp.down_proj"),), _single, _only),
)}
# A family whose MLP has no gate (Nemotron: squared ReLU) has one HF module behind linear_fc1: up_proj.
_FC1_WITHOUT_GATE = replace(TARGETS["linear_fc1"], parts=(("up_adapter", "mlp.up_proj"),), split=_single,
                                        fuse=_only)


def target_for(name: str, gated: bool = True) -> Target:
    """The target ``name`` of a model whose MLP is ``gated`` or not (LlamaDims.gated): linear_fc1's HF modules
    are gate_proj + up_proj, or up_proj alone."""
    if name == "linear_fc1" and not gated:
        return _FC1_WITHOUT_GATE
    return TARGETS[name]


_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention|mlp)\.adapter_layer\.([\w.]+)\.(linear_in|linear_out)\.weight$")

Pairs = dict[tuple[int, str], list[Optional[tuple[torch.Tensor, torch.Tensor]]]]  # (layer, target) -> [(A, B)]


class AdapterError(ValueError):
    """An adapter cannot be read, converted or applied; the message says why."""


EXPORT_VERB = "export"


def _check_export_output(out, inputs, overwrite: bool) -> None:
    """Refuse an export's output path before anything is read (the same checks run again when writing)."""
    from nemotune.converters.formats.outputs import OutputError, preflight

    try:
        preflight(Path(out), verb=EXPORT_VERB, inputs=inputs, overwrite=overwrite,
                  overwrite_hint="--overwrite")
    except OutputError as err:
        raise AdapterError(str(err)) from None


def adapter_key(layer: int, target: str, which: str, *, variant: str = DEFAULT_VARIANT, part: int = 0,
                dims: LlamaDims | None = None) -> str:
    """Megatron key of a LoRA matrix; ``which`` is linear_in (A, [dim, in]) or linear_out (B, [out, dim]);
    ``part`` indexes the target's HF modules for the canonical variant (q, k, v / gate, up; the family of
    ``dims`` decides which there are)."""
    t = target_for(target, dims is None or dims.gated)
    return f"decoder.layers.{layer}.{t.block}.adapter_layer.{t.prefixes(variant)[part]}.{which}.weight"


def parse_adapter_key(key: str) -> tuple[int, str, str, str, int]:
    """(layer, megatron target, linear_in|linear_out, variant, part) of an adapter key ("nemo" for keys both
    variants share)."""
    match = _KEY.match(key)
    if match is not None:
        for variant in ("nemo", "canonical"):
            for target in TARGETS.values():
                if target.block == match.group(2) and match.group(3) in target.prefixes(variant):
                    part = target.prefixes(variant).index(match.group(3))
                    return int(match.group(1)), target.megatron, match.group(4), variant, part
    raise AdapterError(f"not a LoRA adapter key: {key!r}")


def _in_features(dims: LlamaDims) -> dict[str, int]:
    return {"linear_qkv": dims.hidden, "linear_proj": dims.heads * dims.head_dim, "linear_fc1": dims.hidden,
            "linear_fc2": dims.ffn}


def _out_rows(dims: LlamaDims) -> dict[str, list[int]]:
    """Output rows of each target's HF modules."""
    fused = {"linear_qkv": dims.qkv_rows, "linear_proj": dims.hidden, "linear_fc1": dims.fc1_rows,
             "linear_fc2": dims.hidden}
    return {name: [part.shape[0] for part in t.split(torch.empty(fused[name], 0), dims)]
            for name, t in ((n, target_for(n, dims.gated)) for n in TARGETS)}


def adapter_shapes(dims: LlamaDims, dim: int, variant: str = DEFAULT_VARIANT
                   ) -> dict[str, list[tuple[tuple[int, int], tuple[int, int]]]]:
    """target -> [(linear_in shape, linear_out shape)] per stored pair (one for nemo, one per HF module for
    canonical)."""
    rows, features = _out_rows(dims), _in_features(dims)
    return {name: [((dim, features[name]), (r, dim)) for r in rows[name]] if len(t.prefixes(variant)) > 1
            else [((dim, features[name]), (sum(rows[name]), dim))]
            for name, t in ((n, target_for(n, dims.gated)) for n in TARGETS)}


def variant_of(config: Mapping[str, Any]) -> str:
    return config.get("variant") or DEFAULT_VARIANT


def adapter_layers(config: Mapping[str, Any]) -> list[int]:
    """0-based layer indices of the adapted layers (``layer_selection`` holds 1-based numbers)."""
    dims = LlamaDims.from_hf(config["base_model"])
    selection = config.get("layer_selection")
    return [n - 1 for n in sorted(selection)] if selection else list(range(dims.num_layers))


def expected_keys(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every key the adapter of ``config`` holds, with its shape."""
    dims, variant = LlamaDims.from_hf(config["base_model"]), variant_of(config)
    shapes = adapter_shapes(dims, int(config["dim"]), variant)
    return {adapter_key(layer, target, which, variant=variant, part=part, dims=dims): pair[i]
            for layer in adapter_layers(config) for target in config["target_modules"]
            for part, pair in enumerate(shapes[target]) for i, which in enumerate(("linear_in", "linear_out"))}


def validate_adapter(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Every problem at once: missing fields, unknown targets / variant, bad layer_selection, missing /
    unexpected keys, wrong shapes."""
    problems = [f"adapter_config.json: missing field {k!r}" for k in ("dim", "alpha", "target_modules", "base_model")
                if k not in config]
    if "target_modules" in config:
        unknown = [t for t in config["target_modules"] if t not in TARGETS]
        if unknown:
            problems.append(f"target_modules: unknown {unknown}; use Megatron names {list(TARGETS)}")
    if variant_of(config) not in VARIANTS:
        problems.append(f"variant: {config.get('variant')!r}; use one of {list(VARIANTS)}")
    if "base_model" in config and config.get("layer_selection"):
        num_layers = LlamaDims.from_hf(config["base_model"]).num_layers
        bad = [n for n in config["layer_selection"] if not 1 <= int(n) <= num_layers]
        if bad:
            problems.append(f"layer_selection: {bad} out of range; layer numbers are 1-based, 1..{num_layers}")
    if problems:
        raise AdapterError("invalid adapter config:\n  " + "\n  ".join(problems))
    expected = expected_keys(config)
    problems += [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {list(state[k].shape)}, expected {list(s)}" for k, s in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(s)]
    if problems:
        raise AdapterError(f"adapter (variant {variant_of(config)}) does not match its config:\n  "
                           + "\n  ".join(problems))


def random_adapter(config: Mapping[str, Any], *, seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Normal(0, std) tensors for every key of ``config`` (B nonzero too, unlike a fresh adapter): tests, benches."""
    generator = torch.Generator().manual_seed(seed)
    return {key: std * torch.randn(shape, generator=generator) for key, shape in expected_keys(config).items()}


def save_adapter(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                 tokenizer: Any = None) -> Path:
    """Write a training checkpoint's adapter dir (validated; see the module docstring for the layout): an HF PEFT
    adapter plus ``nemotune_adapter.json`` (plus the fused tensors for variant nemo), and, given ``tokenizer`` (a
    tokenizer object or a dir of tokenizer files), its files and ``chat_template.jinja``."""
    from safetensors.torch import save_file

    from nemotune.converters.formats.outputs import output_target
    from nemotune.converters.formats.tokenizer_files import write_tokenizer

    config = {"dropout": 0.0, "layer_selection": None, "base_model_name_or_path": None, **dict(config)}
    config["variant"] = variant_of(config)
    validate_adapter(state_dict, config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    peft_state, peft_config = to_peft(state, config)
    with output_target(out_dir, verb="train", overwrite=True, error=AdapterError) as tmp:
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer, what="tokenizer")
        save_file(peft_state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if config["variant"] == "nemo":
            save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "producer": "nemotune"})
        (tmp / NEMOTUNE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def _full_model_checkpoint(path: Path) -> bool:
    """A Megatron checkpoint dir, a full-SFT training checkpoint or a base-model .nemo (not an adapter)."""
    if path.is_dir():
        return any((path / name).is_dir() for name in ("weights", "dist", "model_weights")) \
            or (path / "model_config.yaml").is_file()
    return path.is_file() and path.suffix == ".nemo"


def adapter_dir_of(path: str | Path) -> Path:
    """The adapter dir ``path`` names: itself, or ``<path>/adapter`` for a LoRA training checkpoint; refuses a
    full-model checkpoint in one line naming the command that exports it."""
    path = Path(path)
    if path.is_dir() and (path / "adapter").is_dir() and not (path / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    if _full_model_checkpoint(path):
        raise AdapterError(f"{path}: a full-model checkpoint, not an adapter; export it with `nemotune export hf "
                           f"--checkpoint {path}` or `nemotune export nemo --checkpoint {path}`")
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter dir; pass <checkpoint>/adapter of a LoRA training run, or an "
                           "HF PEFT dir")
    return path


def load_adapter(path: str | Path, *, base_config: Mapping[str, Any] | str | Path | None = None,
                 variant: str | None = None, stack: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a training checkpoint's adapter dir (or the checkpoint dir holding it), an older nemotune adapter dir,
    or an HF PEFT LoRA dir (imported 1:1 as the canonical variant).

    ``variant`` converts to that variant (None: keep the dir's own; "canonical" for PEFT); see
    :func:`convert_adapter` for when canonical -> nemo is exact and what ``stack`` does. For a PEFT dir the
    base model's HF config comes from ``base_config`` (dict or checkpoint dir) or else from
    ``base_model_name_or_path`` when that is a local directory.
    """
    from safetensors.torch import load_file

    path = adapter_dir_of(path)
    if variant is not None and variant not in VARIANTS:
        raise AdapterError(f"variant={variant!r}: use one of {list(VARIANTS)}")
    if (path / NEMOTUNE_CONFIG).is_file():
        config = read_config_json(path / NEMOTUNE_CONFIG)
        config["variant"] = variant_of(config)
        if (path / ADAPTER_WEIGHTS).is_file():
            state = load_file(str(path / ADAPTER_WEIGHTS))
        else:
            state, _ = _load_peft(path, base_config or config.get("base_model"))
            if config["variant"] != "canonical":
                state, _ = convert_adapter(state, {**config, "variant": "canonical"}, config["variant"])
        validate_adapter(state, config)
    elif (path / ADAPTER_CONFIG).is_file() and "peft_type" not in read_config_json(path / ADAPTER_CONFIG):
        if not (path / ADAPTER_WEIGHTS).is_file():  # nemotune's schema under PEFT's name, weights missing
            raise AdapterError(f"{path / ADAPTER_CONFIG}: no 'peft_type' key (nemotune's older adapter schema) and no "
                               f"{ADAPTER_WEIGHTS} beside it; pass the complete adapter dir of the checkpoint")
        state = load_file(str(path / ADAPTER_WEIGHTS))
        config = read_config_json(path / ADAPTER_CONFIG)
        config["variant"] = variant_of(config)
        validate_adapter(state, config)
    elif (path / ADAPTER_CONFIG).is_file():
        state, config = _load_peft(path, base_config)
    else:
        raise AdapterError(f"{path}: not an adapter dir (no {ADAPTER_CONFIG}); pass <checkpoint>/adapter of a "
                           "LoRA training run, or an HF PEFT dir")
    if variant is not None and variant != config["variant"]:
        state, config = convert_adapter(state, config, variant, stack=stack)
    return state, config


def adapter_tokenizer_dir(adapter_dir: str | Path) -> Optional[Path]:
    """Where the training tokenizer of an adapter is: the adapter dir itself, else its checkpoint's ``hf/``."""
    from nemotune.converters.formats.tokenizer_files import has_tokenizer

    adapter_dir = adapter_dir_of(adapter_dir)
    for candidate in (adapter_dir, adapter_dir.parent / "hf"):
        if has_tokenizer(candidate):
            return candidate
    return None


def _export_tokenizer(tmp: Path, adapter_dir, tokenizer) -> Optional[str]:
    """Write the training tokenizer and its chat template into an export (``tokenizer``, a dir, overrides the
    one found with the adapter); returns the template, or None (with a warning) when there is none to write."""
    from nemotune.converters.formats.tokenizer_files import TokenizerFilesError, write_tokenizer

    source = tokenizer or adapter_tokenizer_dir(adapter_dir)
    if source is None:
        log.warning("no tokenizer files with the adapter %s (nor in its checkpoint's hf/): the export carries no "
                    "chat template; pass --tokenizer <the training tokenizer dir> to include it", adapter_dir)
        return None
    try:
        return write_tokenizer(tmp, source)
    except TokenizerFilesError as err:
        raise AdapterError(str(err)) from None


# ---- one form for every conversion: (A, B) per HF module -------------------------------------------------------

def to_pairs(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Pairs:
    """(layer, target) -> [(A, B)] in HF-module order; a fused adapter's A is shared, its B split (views)."""
    dims, variant = LlamaDims.from_hf(config["base_model"]), variant_of(config)
    pairs: Pairs = {}
    for layer in adapter_layers(config):
        for name in config["target_modules"]:
            t = target_for(name, dims.gated)
            stored = [(state[adapter_key(layer, name, "linear_in", variant=variant, part=i, dims=dims)],
                       state[adapter_key(layer, name, "linear_out", variant=variant, part=i, dims=dims)])
                      for i in range(len(t.prefixes(variant)))]
            if len(stored) == len(t.parts):
                pairs[(layer, name)] = stored
            else:
                lora_a, lora_b = stored[0]
                pairs[(layer, name)] = [(lora_a, b) for b in t.split(lora_b, dims)]
    return pairs


def from_pairs(pairs: Pairs, config: Mapping[str, Any], variant: str, *, stack: bool = False
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`to_pairs` for ``variant``; ``config`` gives dim, alpha, layers and targets.

    Missing pairs (a PEFT adapter on q and v only) get B = 0 -- exact -- and, for canonical, a sibling's A so
    that training from the adapter can still move them.
    """
    dims, rank = LlamaDims.from_hf(config["base_model"]), int(config["dim"])
    rows, features = _out_rows(dims), _in_features(dims)

    def filled(layer, name):
        found = pairs.get((layer, name)) or [None] * len(target_for(name, dims.gated).parts)
        a_default = next((p[0] for p in found if p is not None), torch.zeros(rank, features[name]))
        return [p if p is not None else (a_default, torch.zeros(r, rank, dtype=a_default.dtype))
                for p, r in zip(found, rows[name])]

    layers = adapter_layers(config)
    state: dict[str, torch.Tensor] = {}
    if variant == "canonical":
        for layer in layers:
            for name in config["target_modules"]:
                for i, (lora_a, lora_b) in enumerate(filled(layer, name)):
                    state[adapter_key(layer, name, "linear_in", variant=variant, part=i, dims=dims)] = lora_a
                    state[adapter_key(layer, name, "linear_out", variant=variant, part=i, dims=dims)] = lora_b
        return state, {**config, "variant": variant}
    fused = {(layer, name): filled(layer, name) for layer in layers for name in config["target_modules"]}
    distinct_a = {}  # the different A matrices of each fused target: one slot of rank rows each
    for key, found in fused.items():
        distinct_a[key] = []
        for lora_a, _ in found:
            if not any(torch.equal(lora_a, seen) for seen in distinct_a[key]):
                distinct_a[key].append(lora_a)
    factor = max((len(a_list) for a_list in distinct_a.values()), default=1)
    if factor > 1 and not stack:
        unshared = sorted((layer + 1, name) for (layer, name), a_list in distinct_a.items() if len(a_list) > 1)
        raise AdapterError(
            f"cannot convert to the fused nemo variant exactly: the HF modules of {len(unshared)} fused targets "
            f"(layer number, target) {unshared[:4]}{' ...' if len(unshared) > 4 else ''} have different A "
            "matrices, and a fused adapter shares one A. Use variant canonical (peft.lora.variant=canonical), or "
            "stack=True for a fused adapter of rank dim x (number of different A's): exact, but another dim")
    for (layer, name), found in fused.items():
        a_list = distinct_a[(layer, name)]
        slots = [slice(i * rank, (i + 1) * rank) for i in range(len(a_list))]
        lora_a = torch.zeros(rank * factor, features[name], dtype=a_list[0].dtype)
        for rows_of_a, a in zip(slots, a_list):
            lora_a[rows_of_a] = a
        b_parts = []
        for a, b in found:
            slot = slots[next(i for i, seen in enumerate(a_list) if torch.equal(a, seen))]
            b_full = torch.zeros(b.shape[0], rank * factor, dtype=b.dtype)
            b_full[:, slot] = b
            b_parts.append(b_full)
        state[adapter_key(layer, name, "linear_in", variant=variant)] = lora_a
        state[adapter_key(layer, name, "linear_out", variant=variant)] = target_for(name, dims.gated).fuse(b_parts, dims)
    return state, {**config, "variant": variant, "dim": rank * factor, "alpha": config["alpha"] * factor}


def convert_adapter(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], variant: str, *,
                    stack: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The same adapter in the other variant. nemo -> canonical is always exact (A copied, B split);
    canonical -> nemo is exact when q, k, v (gate, up) share A, and otherwise raises AdapterError unless
    ``stack``: the different A's stacked, B block-diagonal -- exact, with dim and alpha multiplied by the largest
    number of different A's of a target (so alpha / dim is unchanged)."""
    if variant not in VARIANTS:
        raise AdapterError(f"variant={variant!r}: use one of {list(VARIANTS)}")
    state, config = from_pairs(to_pairs(state, config), config, variant, stack=stack)
    validate_adapter(state, config)
    return state, config


# ---- HF PEFT ---------------------------------------------------------------------------------------------------

def _hf_module_target(module: str, dims: LlamaDims | None = None) -> tuple[str, int]:
    targets = [target_for(name, dims is None or dims.gated) for name in TARGETS]
    for target in targets:
        for i, name in enumerate(target.hf_modules):
            if name.split(".")[-1] == module:
                return target.megatron, i
    raise AdapterError(f"PEFT target module {module!r} has no Megatron counterpart in this model "
                       f"(supported: {[m.split('.')[-1] for t in targets for m in t.hf_modules]})")


def to_peft(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
            base_model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Megatron adapter (either variant) -> (PEFT state dict, adapter_config.json dict)."""
    peft_state: dict[str, torch.Tensor] = {}
    dims = LlamaDims.from_hf(config["base_model"])
    for (layer, name), found in to_pairs(state, config).items():
        for module, (lora_a, lora_b) in zip(target_for(name, dims.gated).hf_modules, found):
            prefix = f"{PEFT_PREFIX}model.layers.{layer}.{module}"
            peft_state[f"{prefix}.lora_A.weight"] = lora_a.clone().contiguous()
            peft_state[f"{prefix}.lora_B.weight"] = lora_b.clone().contiguous()
    layers = adapter_layers(config)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(config["dim"]),
        "lora_alpha": config["alpha"],
        "lora_dropout": float(config.get("dropout") or 0.0),
        "bias": "none",
        "target_modules": sorted(m.split(".")[-1] for t in config["target_modules"]
                                 for m in target_for(t, dims.gated).hf_modules),
        "layers_to_transform": layers if config.get("layer_selection") else None,  # PEFT counts from 0
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
    if isinstance(base_config, Mapping):
        return load_hf_config(base_config)
    candidate = base_config or peft_config.get("base_model_name_or_path")
    if candidate and (Path(candidate) / "config.json").is_file():
        return load_hf_config(Path(candidate))
    raise AdapterError("converting a PEFT adapter needs the base model's config: pass base_config (an HF dir or "
                       f"config dict); base_model_name_or_path={candidate!r} is not a local directory")


def _load_peft(path: Path, base_config) -> tuple[dict[str, torch.Tensor], dict]:
    """An HF PEFT LoRA dir as the canonical variant: one (A, B) per HF module, tensors unchanged."""
    from safetensors.torch import load_file

    peft_config = read_config_json(path / ADAPTER_CONFIG)
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
        from nemotune.converters.formats.safe_pickle import torch_load

        peft_state = torch_load(path / "adapter_model.bin")
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
    problems = []
    for key, tensor in peft_state.items():
        match = pattern.match(key)
        if match is None:
            problems.append(f"unexpected PEFT key {key!r}")
            continue
        try:
            target, index = _hf_module_target(match.group(2), dims)
        except AdapterError as err:
            problems.append(str(err))
            continue
        found.setdefault((int(match.group(1)), target), {}).setdefault(index, {})[match.group(3)] = tensor
    problems += [f"layer {layer} {target_for(t, dims.gated).hf_modules[i]}: lora_{m} missing"
                 for (layer, t), parts in found.items() for i, ab in parts.items() for m in "AB" if m not in ab]
    if problems:
        raise AdapterError(f"{path}: not a LoRA adapter of a Llama model:\n  " + "\n  ".join(problems))
    layers = sorted({layer for layer, _ in found})
    targets = sorted({t for _, t in found}, key=list(TARGETS).index)
    pairs: Pairs = {key: [(parts[i]["A"], parts[i]["B"]) if i in parts else None
                          for i in range(len(target_for(key[1], dims.gated).parts))] for key, parts in found.items()}
    config = {
        "dim": rank,
        "alpha": alpha,
        "dropout": float(peft_config.get("lora_dropout") or 0.0),
        "target_modules": targets,
        "layer_selection": None if layers == list(range(dims.num_layers)) else [layer + 1 for layer in layers],
        "variant": "canonical",
        "base_model": hf,
        "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
    }
    state, config = from_pairs(pairs, config, "canonical")
    validate_adapter(state, config)
    return state, config


def export_hf_peft(adapter_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                   tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Adapter (either variant, any layout load_adapter reads) -> HF PEFT dir: adapter_config.json +
    adapter_model.safetensors + the training tokenizer's files and chat_template.jinja (from ``tokenizer``, else
    the adapter dir, else its checkpoint's ``hf/``)."""
    from safetensors.torch import save_file

    from nemotune.converters.formats.outputs import output_target

    _check_export_output(out_dir, [adapter_dir], overwrite)
    state, config = load_adapter(adapter_dir)
    peft_state, peft_config = to_peft(state, config, base_model_name_or_path=base_model_name_or_path)
    with output_target(out_dir, verb=EXPORT_VERB, overwrite=overwrite, inputs=[adapter_dir],
                       error=AdapterError) as tmp:
        _export_tokenizer(tmp, adapter_dir, tokenizer)
        save_file(peft_state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return Path(out_dir)


# ---- NeMo .nemo LoRA -------------------------------------------------------------------------------------------

def nemo_peft_section(config: Mapping[str, Any]) -> dict:
    """The ``peft`` section of a NeMo 1.x model_config.yaml for this adapter (``lora_tuning.variant`` selects
    NeMo's LoraKQVAdapter / LoraHto4HAdapter or LoraUnfusedKQVAdapter / LoraUnfusedHto4HAdapter)."""
    return {
        "peft_scheme": "lora",
        "restore_from_path": None,
        "lora_tuning": {
            "variant": variant_of(config),
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


def export_nemo_lora(adapter_dir: str | Path, out_path: str | Path, *, tokenizer: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Adapter -> NeMo 1.x LoRA ``.nemo`` (model_config.yaml with ``peft`` + model_weights.ckpt), in the adapter's
    own variant; with the training tokenizer (``tokenizer``, else the adapter's) its files go in ``tokenizer/``
    inside the archive and its chat template into model_config.yaml (see ``nemo_chat_config``)."""
    import yaml

    from nemotune.converters.formats.checkpoint import nemo_chat_config, nemo_model_config, write_tar
    from nemotune.converters.formats.outputs import output_target

    _check_export_output(out_path, [adapter_dir], overwrite)
    state, config = load_adapter(adapter_dir)
    dims = LlamaDims.from_hf(config["base_model"])
    if variant_of(config) == "canonical":
        if "linear_qkv" in config["target_modules"] and dims.heads * dims.head_dim != dims.hidden:
            # NeMo's LoraUnfusedKQVAdapter sizes q_adapter hidden -> hidden
            raise AdapterError(f"NeMo's canonical LoRA cannot hold this model's q adapter: its q_adapter maps "
                               f"hidden_size {dims.hidden} -> hidden_size, but heads*head_dim is "
                               f"{dims.heads * dims.head_dim}; export HF PEFT instead")
        log.warning("TensorRT-LLM and NIM load only the fused qkv adapter (lora_kqv_adapter) from a .nemo LoRA; "
                    "this canonical adapter (lora_unfused_*) loads in NeMo only -- export HF PEFT for vLLM / NIM, "
                    "or train with peft.lora.variant=nemo for TensorRT-LLM")
    elif any(t != "linear_qkv" for t in config["target_modules"]):
        log.warning("TensorRT-LLM and NIM load only the qkv adapter (lora_kqv_adapter) from a .nemo LoRA; the "
                    "other targets %s are written for NeMo but will be ignored there -- export HF PEFT for vLLM / "
                    "NIM instead", [t for t in config["target_modules"] if t != "linear_qkv"])
    model_config = nemo_model_config(config["base_model"],
                                     tokenizer_type=config.get("base_model_name_or_path") or "nemo:hf")
    model_config["peft"] = nemo_peft_section(config)
    nemo_state = {"model." + k: v.detach().clone().contiguous() for k, v in state.items()}
    with output_target(out_path, verb=EXPORT_VERB, overwrite=overwrite, is_dir=False, inputs=[adapter_dir],
                       error=AdapterError) as tmp_file:
        staging = tmp_file.parent / "staging"
        (staging / "tokenizer").mkdir(parents=True)
        template = _export_tokenizer(staging / "tokenizer", adapter_dir, tokenizer)
        if any((staging / "tokenizer").iterdir()):
            nemo_chat_config(model_config, template, tokenizer_member="tokenizer")
        else:
            (staging / "tokenizer").rmdir()
        (staging / "model_config.yaml").write_text(yaml.safe_dump(model_config, sort_keys=False))
        torch.save(nemo_state, staging / "model_weights.ckpt")
        write_tar(staging, tmp_file, verb=EXPORT_VERB)
    return Path(out_path)


def read_nemo_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter tensors with their ``model.`` keys, model_config.yaml) of a NeMo LoRA ``.nemo``."""
    import tempfile

    import yaml

    from nemotune.converters.formats.checkpoint import safe_extract

    with tempfile.TemporaryDirectory(prefix="nemotune-lora-") as tmp:
        safe_extract(Path(path), Path(tmp))
        from nemotune.converters.formats.safe_pickle import torch_load

        try:
            weights = torch_load(Path(tmp) / "model_weights.ckpt")
        except ValueError as err:  # name the member inside the .nemo, not the temporary copy
            raise AdapterError(str(err).replace(f"{tmp}/", f"{path}:")) from None
        config = yaml.safe_load((Path(tmp) / "model_config.yaml").read_text())
    return weights, config


# ---- merge -----------------------------------------------------------------------------------------------------

def lora_deltas(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF weight name -> (B, A) with the alpha/dim scale folded into B (either variant)."""
    scale = float(config["alpha"]) / float(config["dim"])
    dims = LlamaDims.from_hf(config["base_model"])
    return {f"model.layers.{layer}.{module}.weight": (lora_b.float() * scale, lora_a.float())
            for (layer, name), found in to_pairs(state, config).items()
            for module, (lora_a, lora_b) in zip(target_for(name, dims.gated).hf_modules, found)}


def merge_adapter(hf_base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                  tokenizer: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Base HF checkpoint + adapter -> full HF checkpoint with W + alpha/dim * B @ A, shard by shard; the base's
    config files, then the training tokenizer's files and chat_template.jinja (``tokenizer``, else the adapter's;
    else the base's own are kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from nemotune.converters.formats.checkpoint import INDEX_NAME, copy_auxiliary_files, inspect_hf_checkpoint
    from nemotune.converters.formats.outputs import output_target

    hf_base_dir = Path(hf_base_dir)
    _check_export_output(out_dir, [hf_base_dir, adapter_dir], overwrite)
    hf, weight_map, _ = inspect_hf_checkpoint(hf_base_dir)
    state, config = load_adapter(adapter_dir, base_config=hf)
    base_dims, adapter_dims = LlamaDims.from_hf(hf), LlamaDims.from_hf(config["base_model"])
    if base_dims != adapter_dims:
        raise AdapterError(f"adapter was trained on {adapter_dims}, base checkpoint is {base_dims}")
    deltas = lora_deltas(state, config)
    applied = set()
    with output_target(out_dir, verb=EXPORT_VERB, overwrite=overwrite, inputs=[hf_base_dir, adapter_dir],
                       error=AdapterError) as tmp:
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
        if tokenizer is not None or adapter_tokenizer_dir(adapter_dir) is not None:
            _export_tokenizer(tmp, adapter_dir, tokenizer)
        else:
            from nemotune.converters.formats.tokenizer_files import ensure_chat_template

            ensure_chat_template(tmp)  # the base's own template, as chat_template.jinja too
        if applied != set(deltas):
            raise AdapterError(f"base checkpoint lacks adapted weights {sorted(set(deltas) - applied)}")
    return Path(out_dir)
