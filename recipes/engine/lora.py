"""LoRA adapters for megatron-core GPT layers, tensor/pipeline/sequence-parallel correct.

Targets are the four linear layers of a transformer layer, by Megatron name (HF aliases accepted):
    linear_qkv  (q_proj, k_proj, v_proj)   column-parallel
    linear_proj (o_proj)                   row-parallel
    linear_fc1  (gate_proj, up_proj)       column-parallel
    linear_fc2  (down_proj)                row-parallel
An HF alias selects its whole Megatron layer (q_proj alone adapts q, k and v). A forward hook on the base
linear adds scale * B(A(x)); with Transformer Engine's layer-norm-fused linears the hook uses the normalized
input the layer returns (return_layernorm_output; not exercised by the CPU tests).
Effective weight: W + (alpha / dim) * linear_out @ linear_in.

Two layouts, named as in NeMo (`peft.lora.variant`):
  canonical (default)  one adapter per HF projection, exactly HF PEFT's LoRA (the parameter counts users know:
                       6,815,744 for dim 8 on q,k,v,o of Llama-3.1-8B): ...self_attention.adapter_layer.
                       lora_unfused_kqv_adapter.{q,k,v}_adapter.linear_{in,out}.weight and
                       ...mlp.adapter_layer.lora_unfused_hto4h_adapter.{gate,up}_adapter.linear_{in,out}.weight
  nemo                 NeMo's fused adapters sharing one A over q,k,v (and over gate,up):
                       lora_kqv_adapter (out rows in linear_qkv's interleaved per-query-group layout),
                       lora_hto4h_adapter (out rows cat(gate, up)).
Both use lora_dense_attention_adapter (linear_proj) and lora_4htoh_adapter (linear_fc2).

Parallel layout (megatron's own layers and mappings): for a column-parallel base, A (linear_in) is
replicated and B (linear_out) a ColumnParallelLinear split along the output like the base; under sequence
parallelism the adapter gathers the sequence itself (backward: split, since its input grad is complete after
B's all-reduce). For a row-parallel base, A is a RowParallelLinear split along the input whose partial output
is all-reduced, B is replicated, and under sequence parallelism the result is scattered along the sequence
like the base's reduce-scatter. So every replicated adapter weight gets identical gradients on all TP ranks
and needs no extra reduction. Adapters take the model's params_dtype (fp32 on CPU, bf16 on GPU; megatron's
optimizer keeps fp32 main weights). A is drawn on the CPU from a generator seeded by (seed, global parameter
name) at full size and then sharded, so every TP/PP layout starts from the same adapter; B starts at zero.

State dicts use GLOBAL layer numbers (0-based, `decoder.layers.N`); `layer_selection` takes 1-based layer
numbers, as in NeMo.
"""

from __future__ import annotations

import copy
import math
import re
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from nemotune.converters.formats.adapters import TARGETS as ADAPTER_TARGETS
from nemotune.converters.formats.adapters import VARIANTS
from nemotune.converters.formats.adapters import target_for as adapter_target_for
from nemotune.recipes.engine.config import LoraConfig

# The targets, their HF names and adapter names are the adapter file format's table (ADAPTER_TARGETS).
TARGETS = tuple(ADAPTER_TARGETS)
ALIASES = {module.rsplit(".", 1)[-1]: name for name, target in ADAPTER_TARGETS.items()
           for module in target.hf_modules}
ALL_LINEAR = "all-linear"
_COLUMN_PARALLEL = {"linear_qkv", "linear_fc1"}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass
class AdapterSummary:
    targets: List[str]
    layer_numbers: List[int]  # 1-based global numbers of the layers on this pipeline stage that got adapters
    trainable_parameters: int  # whole model (summed over the model-parallel group)
    total_parameters: int


def hf_aliases(gated: bool = True) -> Dict[str, str]:
    """HF module name -> Megatron target for a model whose MLP is gated (Llama, Mistral, Qwen) or not
    (Nemotron: up_proj / down_proj, no gate_proj)."""
    return {module.rsplit(".", 1)[-1]: name for name in TARGETS
            for module in adapter_target_for(name, gated).hf_modules}


def resolve_targets(target_modules: List[str], gated: bool = True) -> List[str]:
    """Megatron target names (sorted as in a layer) for Megatron names, the model's HF names or all-linear."""
    resolved, unknown = set(), []
    aliases = hf_aliases(gated)
    for name in target_modules:
        if name == ALL_LINEAR:
            resolved.update(TARGETS)
        elif name in TARGETS:
            resolved.add(name)
        elif name in aliases:
            resolved.add(aliases[name])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown LoRA target_modules {unknown}; use {ALL_LINEAR!r}, Megatron names "
                         f"{list(TARGETS)} or this model's HF names {list(aliases)}")
    if not resolved:
        raise ValueError("LoRA target_modules is empty")
    return [t for t in TARGETS if t in resolved]


# ---- modules --------------------------------------------------------------------------------------------

class _ShardedChildren:
    """sharded_state_dict (dist_checkpointing) of a plain module: its children's, each sharded its own way."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import sharded_state_dict_default

        tp_group = parallel_state.get_tensor_model_parallel_group()  # replicas across TP: one is the main one
        out = {}
        for name, child in self.named_children():
            out.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group))
        return out


class AdapterLayer(_ShardedChildren, torch.nn.ModuleDict):
    """`adapter_layer` of an attention / MLP module, as in NeMo."""


class LoraBranch(_ShardedChildren, torch.nn.Module):
    """One low-rank pair (linear_in = A, linear_out = B) laid out for its base layer's parallelism."""

    def __init__(self, config, in_features: int, out_features: int, dim: int, dropout: float,
                 column: bool, swiglu: bool = False):
        from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                                   set_tensor_model_parallel_attributes)

        super().__init__()
        self.column, self.swiglu = column, swiglu
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        dtype, zeros = config.params_dtype, torch.nn.init.zeros_
        if column:
            self.linear_in = torch.nn.Linear(in_features, dim, bias=False, dtype=dtype)
            self.linear_out = ColumnParallelLinear(dim, out_features, config=config, init_method=zeros, bias=False,
                                                   gather_output=False, skip_bias_add=True)
            # fused gate/up rows: TP rank r holds cat(gate_r, up_r), like the base linear_fc1
            self.linear_out.weight.lora_swiglu = swiglu
        else:
            self.linear_in = RowParallelLinear(in_features, dim, config=config, init_method=zeros, bias=False,
                                               input_is_parallel=True, skip_bias_add=True)
            self.linear_out = torch.nn.Linear(dim, out_features, bias=False, dtype=dtype)
        split = self.linear_out.weight if column else self.linear_in.weight
        if not hasattr(split, "tensor_model_parallel"):  # megatron sets these only when it initializes
            set_tensor_model_parallel_attributes(split, True, 0 if column else 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.column:
            hidden = self.linear_in(self.dropout(x))
        else:  # x is this rank's slice of the features: its dropout mask must differ per TP rank
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                x = self.dropout(x)
            hidden, _ = self.linear_in(x)
        out = self.linear_out(hidden)
        return out[0] if isinstance(out, tuple) else out

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.swiglu:
            key = f"{prefix}linear_out.weight"
            sharded[key] = apply_swiglu_sharded_factory(
                sharded[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return sharded


class _HookedAdapter:
    """Adds scale * adapter(x) to its base layer's output, in the base output's parallel layout."""

    column: bool
    sequence_parallel: bool
    scale: float

    def after_base(self, module, args, output):
        from megatron.core.tensor_parallel import (gather_from_sequence_parallel_region,
                                                   scatter_to_sequence_parallel_region)

        out, bias = output
        x = args[0]
        if isinstance(out, (tuple, list)):  # TE layer-norm-fused linear: (output, normalized input)
            out, x = out
        if self.column and self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        delta = self.local_delta(x)
        if not self.column and self.sequence_parallel:
            delta = scatter_to_sequence_parallel_region(delta)
        return out + self.scale * delta.to(out.dtype), bias


class LoraAdapter(LoraBranch, _HookedAdapter):
    """A single A/B pair on a whole base layer (NeMo's fused names, and proj / fc2 in both variants)."""

    def local_delta(self, x):
        return self(x)


class UnfusedLoraAdapter(_ShardedChildren, torch.nn.Module, _HookedAdapter):
    """Separate A/B per HF projection (q, k, v or gate, up), combined in the base output's local layout."""

    def __init__(self, branches: Dict[str, LoraBranch], q_rows_per_group: int = 0):
        super().__init__()
        for name, branch in branches.items():
            self.add_module(name, branch)
        self.q_rows_per_group = q_rows_per_group  # heads per query group * head_dim

    def local_delta(self, x):
        outs = [branch(x) for branch in self.children()]  # in the target's HF-module order
        if self.q_rows_per_group:  # linear_qkv rows are [q heads, k, v] per query group
            q, k, v = outs
            lead, groups = q.shape[:-1], q.shape[-1] // self.q_rows_per_group
            parts = [t.reshape(*lead, groups, -1) for t in (q, k, v)]
            return torch.cat(parts, dim=-1).reshape(*lead, -1)
        return torch.cat(outs, dim=-1)  # linear_fc1 rows are cat(gate, up)


# ---- building -------------------------------------------------------------------------------------------

def _adapter_name(target: str, variant: str) -> str:
    entry = ADAPTER_TARGETS[target]
    return entry.nemo_adapter if variant == "nemo" else entry.canonical_adapter


def _make_adapter(config, target: str, cfg: LoraConfig, sequence_parallel: bool):
    heads, head_dim = config.num_attention_heads, config.kv_channels
    groups = config.num_query_groups or heads
    hidden, ffn, gated = config.hidden_size, config.ffn_hidden_size, config.gated_linear_unit
    column = target in _COLUMN_PARALLEL

    def branch(in_features, out_features):
        return LoraBranch(config, in_features, out_features, cfg.dim, cfg.dropout, column)

    parts = [sub for sub, _ in adapter_target_for(target, gated).parts]
    if target == "linear_qkv" and cfg.variant == "canonical":  # parts: q, k, v
        rows = (heads * head_dim, groups * head_dim, groups * head_dim)
        adapter = UnfusedLoraAdapter({sub: branch(hidden, n) for sub, n in zip(parts, rows)},
                                     q_rows_per_group=heads // groups * head_dim)
    elif target == "linear_fc1" and cfg.variant == "canonical":  # parts: gate, up (up alone without a gate)
        adapter = UnfusedLoraAdapter({sub: branch(hidden, ffn) for sub in parts})
    else:
        in_features, out_features = {
            "linear_qkv": (hidden, (heads + 2 * groups) * head_dim), "linear_proj": (heads * head_dim, hidden),
            "linear_fc1": (hidden, 2 * ffn if gated else ffn), "linear_fc2": (ffn, hidden)}[target]
        adapter = LoraAdapter(config, in_features, out_features, cfg.dim, cfg.dropout, column,
                              swiglu=target == "linear_fc1" and gated)
    adapter.column, adapter.sequence_parallel, adapter.scale = column, sequence_parallel, cfg.scale
    return adapter


def apply_lora(model, cfg: LoraConfig, *, seed: int = 1234) -> AdapterSummary:
    """Freeze `model` (a GPTModel, a DDP/Float16 wrapper or a list of chunks) and add LoRA adapters; A is
    drawn from `seed` (the run's seed), B starts at zero."""
    problems = []
    if cfg.variant not in VARIANTS:
        problems.append(f"variant={cfg.variant!r}: use one of {list(VARIANTS)}")
    if cfg.init_method_a not in ("kaiming", "xavier"):
        problems.append(f"init_method_a={cfg.init_method_a!r}: use kaiming or xavier")
    if cfg.dim < 1:
        problems.append(f"dim={cfg.dim}: must be >= 1")
    if not 0 <= cfg.dropout < 1:
        problems.append(f"dropout={cfg.dropout}: must be in [0, 1)")
    chunks = _chunks(model)
    config = chunks[0].config
    selection = None if cfg.layer_selection is None else set(cfg.layer_selection)
    if selection is not None and not all(1 <= n <= config.num_layers for n in selection):
        problems.append(f"layer_selection={sorted(selection)}: layer numbers are 1-based, 1..{config.num_layers}")
    try:
        targets = resolve_targets(list(cfg.target_modules), gated=config.gated_linear_unit)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid LoRA config:\n  " + "\n  ".join(problems))
    if _adapter_params(chunks):
        raise RuntimeError("apply_lora: this model already has LoRA adapters")

    # the adapter's own layers never see sequence-parallel layouts: after_base converts around them
    adapter_config = copy.copy(config)
    adapter_config.sequence_parallel = False
    adapter_config.perform_initialization = False  # _init_adapters draws TP-independent values
    adapter_config.use_cpu_initialization = True
    for param in (p for chunk in chunks for p in chunk.parameters()):
        param.requires_grad_(False)
    layer_numbers = []
    for layer in (layer for chunk in chunks for layer in chunk.decoder.layers):
        if selection is not None and layer.layer_number not in selection:
            continue
        layer_numbers.append(layer.layer_number)
        for target in targets:
            parent = getattr(layer, ADAPTER_TARGETS[target].block)
            base = getattr(parent, target)
            device = base.weight.device
            with torch.device("meta") if device.type == "meta" else torch.device("cpu"):
                adapter = _make_adapter(adapter_config, target, cfg, config.sequence_parallel)
            adapter.to(device)
            if not hasattr(parent, "adapter_layer"):
                parent.adapter_layer = AdapterLayer()
            parent.adapter_layer[_adapter_name(target, cfg.variant)] = adapter
            if hasattr(base, "return_layernorm_output"):  # TE: the adapter needs the normalized input
                base.return_layernorm_output = True
            base.register_forward_hook(adapter.after_base)
    _init_adapters(chunks, cfg, seed)
    trainable, total = parameter_counts(chunks)
    return AdapterSummary(targets=targets, layer_numbers=layer_numbers, trainable_parameters=trainable,
                          total_parameters=total)


def _init_adapters(chunks, cfg: LoraConfig, seed: int) -> None:
    for name, param in _adapter_params(chunks).items():
        if param.is_meta:
            continue
        full = torch.zeros(_full_shape(param), dtype=torch.float32)
        if name.endswith("linear_in.weight"):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if cfg.init_method_a == "kaiming":
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
            else:
                torch.nn.init.xavier_uniform_(full, generator=generator)
        with torch.no_grad():
            param.copy_(_shard(full, param))


# ---- state dicts ----------------------------------------------------------------------------------------

def _chunks(model) -> list:
    chunks = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):  # DDP, Float16Module
            chunk = chunk.module
        chunks.append(chunk)
    return chunks


def _adapter_params(model) -> Dict[str, torch.nn.Parameter]:
    """Adapter parameters of this rank by name, with GLOBAL 0-based layer numbers."""
    params = {}
    for chunk in _chunks(model):
        to_global = {str(i): layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}
        for name, param in chunk.named_parameters():
            if ".adapter_layer." in name:
                params[_LAYER_KEY.sub(lambda m: f"decoder.layers.{to_global[m.group(1)]}.", name)] = param
    return params


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _full_shape(param) -> tuple:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp()[0]
    return tuple(shape)


def _shard(full: torch.Tensor, param) -> torch.Tensor:
    """This TP rank's part of a full (TP=1 layout) adapter tensor."""
    size, rank = _tp()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if getattr(param, "lora_swiglu", False):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=param.partition_dim)[rank]


def _unshard(local: torch.Tensor, param) -> torch.Tensor:
    """The full (TP=1 layout) tensor from every TP rank's `local` part of `param`."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    size, _ = _tp()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    dim = param.partition_dim
    full = gather_from_tensor_model_parallel_region(local.transpose(dim, -1).contiguous()).transpose(dim, -1)
    if getattr(param, "lora_swiglu", False):  # rank r holds cat(gate_r, up_r)
        pieces = [piece.chunk(2, dim=0) for piece in full.chunk(size, dim=0)]
        full = torch.cat([gate for gate, _ in pieces] + [up for _, up in pieces])
    sections = getattr(param, "mamba_sections", None)
    if sections is not None:  # rank r holds its slice of each Mamba in_proj section (z, x, B, C, dt)
        local_sizes = [s // size for s in sections]
        pieces = [piece.split(local_sizes, dim=0) for piece in full.chunk(size, dim=0)]
        full = torch.cat([pieces[r][i] for i in range(len(sections)) for r in range(size)])
    return full.contiguous()


def adapter_state_dict(model) -> Dict[str, torch.Tensor]:
    """This rank's adapter shards, NeMo mcore names with global layer numbers."""
    return {name: param.detach() for name, param in _adapter_params(model).items()}


def _gather_full(model, pick) -> Optional[Dict[str, torch.Tensor]]:
    """{name: full tensor} of `pick(param)` over TP and PP, on global rank 0 (None elsewhere)."""
    from megatron.core import parallel_state

    with torch.no_grad():
        local = {name: _unshard(pick(param).detach(), param).to("cpu", copy=True)
                 for name, param in _adapter_params(model).items()}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
        local = {name: tensor for stage in stages for name, tensor in stage.items()}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    return dict(sorted(local.items(), key=lambda kv: (int(_LAYER_KEY.match(kv[0]).group(1)), kv[0])))


def gather_adapter(model) -> Optional[Dict[str, torch.Tensor]]:
    """The whole adapter in the TP=1 layout with global layer numbers, on global rank 0 (None elsewhere).

    Collective: every rank of the model must call it.
    """
    return _gather_full(model, lambda param: param)


def load_adapter_state(model, state: Dict[str, torch.Tensor]) -> None:
    """Load a full (TP=1 layout, global layer numbers) adapter: this rank takes its TP shard and PP layers."""
    chunks = _chunks(model)
    params = _adapter_params(chunks)
    if not params:
        raise RuntimeError("load_adapter_state: the model has no LoRA adapters; call apply_lora first")
    num_layers = chunks[0].config.num_layers
    local_layers = {layer.layer_number - 1 for chunk in chunks for layer in chunk.decoder.layers}
    problems = []
    for key in state:
        match = _LAYER_KEY.match(key)
        if match is None or int(match.group(1)) >= num_layers:
            problems.append(f"{key}: not an adapter of a layer of this {num_layers}-layer model")
        elif int(match.group(1)) in local_layers and key not in params:
            problems.append(f"{key}: this model has no such adapter (different target_modules, variant or "
                            "layer_selection?)")
    for key, param in params.items():
        if key not in state:
            problems.append(f"{key}: missing from the adapter")
        elif tuple(state[key].shape) != _full_shape(param):
            problems.append(f"{key}: the adapter's tensor has shape {tuple(state[key].shape)} but this model "
                            f"expects {_full_shape(param)} (an adapter trained for another model or dim?)")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError("the adapter does not fit this model:\n  " + "\n  ".join(problems[:10]) + more)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(_shard(state[key].to(dtype=param.dtype), param))


# ---- counting -------------------------------------------------------------------------------------------

def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model: TP duplicates counted once, summed over TP and PP."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from nemotune.recipes.engine.megatron_cpu import accelerator

    trainable = total = 0
    for param in (p for chunk in _chunks(model) for p in chunk.parameters()):
        if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
    counts = torch.tensor([trainable, total], dtype=torch.int64,
                          device=accelerator())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return int(counts[0]), int(counts[1])


def print_trainable(model) -> tuple[int, int]:
    """Print `trainable N / total M (P%)` on rank 0 (whole model) and return (N, M)."""
    from nemotune.recipes.engine.distributed import print_rank_zero

    trainable, total = parameter_counts(model)
    print_rank_zero(f"trainable {trainable:,} / total {total:,} ({100.0 * trainable / max(total, 1):.4f}%)")
    return trainable, total


def count_lora_parameters(hf_config, cfg: LoraConfig) -> int:
    """Trainable LoRA parameters of `cfg` on the model of `hf_config`, counted on the meta device."""
    from nemotune.recipes.engine.model import build_gpt_model

    return apply_lora(build_gpt_model(hf_config, device="meta"), cfg).trainable_parameters
