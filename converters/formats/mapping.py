"""HF <-> Megatron-core (NeMo mcore) parameter names: one mapping table per family plus named special cases.

`*` in a name is the layer index. Every rule maps a tuple of HF tensors to one Megatron tensor and back;
the plain renames use the identity, the special cases are
  * ``fuse_qkv`` / ``split_qkv``: Megatron's ``linear_qkv`` rows are interleaved per query group -- for each
    of the ``num_query_groups`` groups: its ``heads/groups`` query heads, then its key head, then its value
    head (``head_dim`` rows each); the q/k/v biases of Qwen2 fuse the same way (``linear_qkv.bias``);
  * ``fuse_gate_up`` / ``split_gate_up``: a gated (SwiGLU) ``linear_fc1`` = cat(gate_proj, up_proj) along the
    output rows; Nemotron's squared-ReLU MLP has no gate, its ``linear_fc1`` is ``up_proj`` as it is;
  * Qwen3's per-head q/k RMSNorm: ``self_attn.q_norm`` / ``k_norm`` -> ``self_attention.q_layernorm`` /
    ``k_layernorm``;
  * Nemotron's LayerNorm1P: weight and bias per norm; the stored gamma is zero-centred in both HF and
    Megatron (each adds 1 at run time), so it maps 1:1;
  * tied embeddings (Llama 3.2, small Qwen2.5): no ``lm_head`` / ``output_layer``.
The layer norms are named per spec: the Transformer Engine spec folds them into the following linear
(``linear_qkv.layer_norm_weight`` / ``_bias``, ``linear_fc1.layer_norm_weight`` / ``_bias``), the local spec
keeps ``input_layernorm`` / ``pre_mlp_layernorm``. NeMo's key for a Megatron name is ``"model." + name``.
:func:`family_rules` is the table of a family; ``FAMILY_ROWS`` lists which named rows each family has.

The functions are pure (tensors in, tensors out) and exact: splitting a fused tensor returns views of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

NEMO_PREFIX = "model."


@dataclass(frozen=True)
class LlamaDims:
    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    # the family's layout (hf_config.FAMILIES): gated MLP, q/k/v bias, per-head q/k norm, norms with a bias
    gated: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_bias: bool = False

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaDims":
        """The dims of a config read by ``hf_config.load_hf_config`` (a raw Llama config.json works too)."""
        heads = int(hf["num_attention_heads"])
        return cls(
            num_layers=int(hf["num_hidden_layers"]),
            hidden=int(hf["hidden_size"]),
            heads=heads,
            groups=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            ffn=int(hf["intermediate_size"]),
            vocab=int(hf["vocab_size"]),
            tied=bool(hf.get("tie_word_embeddings", False)),
            gated=bool(hf.get("gated_mlp", True)),
            qkv_bias=bool(hf.get("qkv_bias", False)),
            qk_norm=bool(hf.get("qk_norm", False)),
            norm_bias=hf.get("norm", "RMSNorm") == "LayerNorm1P",
        )

    @property
    def fc1_rows(self) -> int:
        return (2 if self.gated else 1) * self.ffn

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


# ---- the special cases -------------------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: LlamaDims) -> torch.Tensor:
    """[heads*hd, ...], [groups*hd, ...], [groups*hd, ...] -> [(heads+2*groups)*hd, ...], per-group interleaved."""
    g, hd, rest = dims.groups, dims.head_dim, tuple(q.shape[1:])
    fused = torch.cat(
        [q.reshape(g, dims.heads_per_group * hd, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)],
        dim=1,
    )
    return fused.reshape(dims.qkv_rows, *rest)


def qkv_views(qkv: torch.Tensor, dims: LlamaDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of q, k, v inside a fused ``linear_qkv``, shaped [groups, rows per group, ...]: each holds its HF
    tensor's elements in the HF tensor's row-major order (write into them to fuse, reshape them to split)."""
    g, hd, rest = dims.groups, dims.head_dim, tuple(qkv.shape[1:])
    if qkv.shape[0] != dims.qkv_rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected (heads + 2*groups)*head_dim = {dims.qkv_rows}")
    grouped = qkv.view(g, (dims.heads_per_group + 2) * hd, *rest)
    q, k, v = torch.split(grouped, [dims.heads_per_group * hd, hd, hd], dim=1)
    return q, k, v


def split_qkv(qkv: torch.Tensor, dims: LlamaDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`; also splits a LoRA ``linear_out`` of the fused qkv (trailing dim = rank)."""
    q, k, v = qkv_views(qkv.contiguous(), dims)
    g, hd, rest = dims.groups, dims.head_dim, tuple(qkv.shape[1:])
    return q.reshape(dims.heads * hd, *rest), k.reshape(g * hd, *rest), v.reshape(g * hd, *rest)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor | None = None, dims: LlamaDims | None = None) -> torch.Tensor:
    """cat(gate, up); a family without a gate passes its up_proj alone (``linear_fc1`` is then up_proj)."""
    return gate if up is None else torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, dims: LlamaDims | None = None) -> tuple[torch.Tensor, ...]:
    """(gate, up) of a gated ``linear_fc1``; (up,) when ``dims`` says the MLP has no gate."""
    if dims is not None and not dims.gated:
        return (fc1,)
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]}); expected cat(gate, up)")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def _identity_in(tensors: Sequence[torch.Tensor], dims: LlamaDims) -> torch.Tensor:
    return tensors[0]


def _identity_out(tensor: torch.Tensor, dims: LlamaDims) -> tuple[torch.Tensor, ...]:
    return (tensor,)


# ---- the table ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[[Sequence[torch.Tensor], LlamaDims], torch.Tensor] = _identity_in
    to_hf: Callable[[torch.Tensor, LlamaDims], tuple[torch.Tensor, ...]] = _identity_out
    tied_only_absent: bool = False  # the output layer: absent when embeddings are tied
    # views of the HF tensors inside the Megatron tensor, each in its HF tensor's row-major element order
    # (not necessarily its shape): lets the converters read into / write from the model without copies
    views: Callable[[torch.Tensor, LlamaDims], tuple[torch.Tensor, ...]] = _identity_out


def _layer_norm_names(spec: str) -> tuple[str, str]:
    if spec == "te":
        return ("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
                "decoder.layers.*.mlp.linear_fc1.layer_norm_weight")
    if spec == "local":
        return "decoder.layers.*.input_layernorm.weight", "decoder.layers.*.pre_mlp_layernorm.weight"
    raise ValueError(f"spec must be 'te' or 'local', got {spec!r}")


_L = "decoder.layers.*."
_H = "model.layers.*."

# the named rows each family has beyond the shared ones (embedding, qkv, o_proj, fc1, fc2, norms, output)
FAMILY_ROWS = {
    "llama": (), "mistral": (),
    "qwen2": ("qkv_bias",),
    "qwen3": ("qk_norm",),
    "nemotron": ("norm_bias", "mlp_without_gate"),
}


def _qkv(suffix: str) -> Rule:
    return Rule(f"{_L}self_attention.linear_qkv.{suffix}",
                tuple(f"{_H}self_attn.{p}_proj.{suffix}" for p in "qkv"),
                to_megatron=lambda t, d: fuse_qkv(*t, d), to_hf=split_qkv, views=qkv_views)


def family_rules(dims: LlamaDims, spec: str = "local") -> tuple[Rule, ...]:
    """The HF <-> Megatron table of ``dims``' family for the local or Transformer Engine ("te") layer spec."""
    input_norm, mlp_norm = _layer_norm_names(spec)
    norm_params = ("weight", "bias") if dims.norm_bias else ("weight",)

    def norm(megatron: str, hf: str) -> list[Rule]:  # TE's folded names end in layer_norm_weight / _bias
        base = megatron.rsplit("weight", 1)[0]
        return [Rule(base + p, (hf + p,)) for p in norm_params]

    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    rules += norm(input_norm, f"{_H}input_layernorm.")
    rules.append(_qkv("weight"))
    if dims.qkv_bias:
        rules.append(_qkv("bias"))
    if dims.qk_norm:
        rules += [Rule(f"{_L}self_attention.{m}_layernorm.weight", (f"{_H}self_attn.{m}_norm.weight",)) for m in "qk"]
    rules.append(Rule(f"{_L}self_attention.linear_proj.weight", (f"{_H}self_attn.o_proj.weight",)))
    rules += norm(mlp_norm, f"{_H}post_attention_layernorm.")
    if dims.gated:
        rules.append(Rule(f"{_L}mlp.linear_fc1.weight", (f"{_H}mlp.gate_proj.weight", f"{_H}mlp.up_proj.weight"),
                          to_megatron=lambda t, d: fuse_gate_up(*t), to_hf=split_gate_up, views=split_gate_up))
    else:
        rules.append(Rule(f"{_L}mlp.linear_fc1.weight", (f"{_H}mlp.up_proj.weight",)))
    rules.append(Rule(f"{_L}mlp.linear_fc2.weight", (f"{_H}mlp.down_proj.weight",)))
    rules += norm("decoder.final_layernorm.weight", "model.norm.")
    rules.append(Rule("output_layer.weight", ("lm_head.weight",), tied_only_absent=True))
    return tuple(rules)


def llama_rules(spec: str = "local") -> tuple[Rule, ...]:
    """The HF Llama <-> Megatron table for the local or Transformer Engine ("te") layer spec."""
    return family_rules(LlamaDims(0, 0, 1, 1, 0, 0, 0, False), spec)


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(r"\*", r"(\d+)") + "$")


def _fill(name: str, layer: int | None) -> str:
    return name if layer is None else name.replace("*", str(layer))


def _expand(rules: Iterable[Rule], dims: LlamaDims) -> Iterator[tuple[Rule, int | None]]:
    for rule in rules:
        if rule.tied_only_absent and dims.tied:
            continue
        if "*" in rule.megatron:
            for layer in range(dims.num_layers):
                yield rule, layer
        else:
            yield rule, None


def expected_hf_shapes(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of this config with its shape (what a checkpoint must contain)."""
    shapes = {
        "model.embed_tokens.weight": (dims.vocab, dims.hidden),
        "model.norm.weight": (dims.hidden,),
    }
    if not dims.tied:
        shapes["lm_head.weight"] = (dims.vocab, dims.hidden)
    if dims.norm_bias:
        shapes["model.norm.bias"] = (dims.hidden,)
    per_layer = {
        "input_layernorm.weight": (dims.hidden,),
        "post_attention_layernorm.weight": (dims.hidden,),
        "self_attn.q_proj.weight": (dims.heads * dims.head_dim, dims.hidden),
        "self_attn.k_proj.weight": (dims.groups * dims.head_dim, dims.hidden),
        "self_attn.v_proj.weight": (dims.groups * dims.head_dim, dims.hidden),
        "self_attn.o_proj.weight": (dims.hidden, dims.heads * dims.head_dim),
        "mlp.gate_proj.weight": (dims.ffn, dims.hidden),
        "mlp.up_proj.weight": (dims.ffn, dims.hidden),
        "mlp.down_proj.weight": (dims.hidden, dims.ffn),
    }
    if not dims.gated:
        del per_layer["mlp.gate_proj.weight"]
    if dims.norm_bias:
        per_layer.update({"input_layernorm.bias": (dims.hidden,), "post_attention_layernorm.bias": (dims.hidden,)})
    if dims.qkv_bias:
        per_layer.update({f"self_attn.{p}_proj.bias": (rows,) for p, rows in
                          (("q", dims.heads * dims.head_dim), ("k", dims.groups * dims.head_dim),
                           ("v", dims.groups * dims.head_dim))})
    if dims.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": (dims.head_dim,), "self_attn.k_norm.weight": (dims.head_dim,)})
    for layer in range(dims.num_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    return shapes


def check_hf_shapes(found: Mapping[str, Sequence[int]], dims: LlamaDims, *, origin: str = "checkpoint") -> None:
    """Raise one ValueError listing every missing tensor and every shape that does not match the config.

    HF names that the config does not use (e.g. ``rotary_emb.inv_freq``, a tied ``lm_head``) are ignored.
    """
    expected = expected_hf_shapes(dims)
    problems = [f"missing tensor {name} {list(shape)}" for name, shape in expected.items() if name not in found]
    problems += [
        f"{name}: shape {list(found[name])} but the config implies {list(shape)}"
        for name, shape in expected.items() if name in found and tuple(found[name]) != tuple(shape)
    ]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{origin} does not match its config.json:\n  " + "\n  ".join(shown))


class HfToMegatron:
    """Streaming HF -> Megatron: feed HF tensors in any order, get Megatron tensors as soon as complete.

    Only the tensors of a fused rule whose partners have not arrived yet are held (e.g. a q_proj whose
    k_proj lives in the next shard).
    """

    def __init__(self, dims: LlamaDims, spec: str = "local"):
        self.dims = dims
        self._by_hf: dict[str, tuple[Rule, int | None]] = {}
        for rule, layer in _expand(family_rules(dims, spec), dims):
            for name in rule.hf:
                self._by_hf[_fill(name, layer)] = (rule, layer)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def feed(self, hf_name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if hf_name not in self._by_hf:
            return  # e.g. lm_head of a tied checkpoint, rotary inv_freq buffers
        rule, layer = self._by_hf[hf_name]
        target = _fill(rule.megatron, layer)
        parts = self._pending.setdefault(target, {})
        parts[hf_name] = tensor
        names = [_fill(n, layer) for n in rule.hf]
        if all(n in parts for n in names):
            del self._pending[target]
            yield target, rule.to_megatron([parts[n] for n in names], self.dims)

    def missing(self) -> list[str]:
        return sorted(self._pending)


def _rule_for(name: str, dims: LlamaDims, spec: str) -> tuple[Rule | None, list[str]]:
    """The rule of a Megatron name and its HF names (None, [] for a tied model's output layer)."""
    for rule in family_rules(dims, spec):
        match = _pattern(rule.megatron).match(name)
        if match is None:
            continue
        if rule.tied_only_absent and dims.tied:
            return None, []
        layer = int(match.group(1)) if match.groups() else None
        return rule, [_fill(n, layer) for n in rule.hf]
    raise KeyError(f"no HF name for Megatron parameter {name!r}")


def megatron_to_hf(name: str, tensor: torch.Tensor, dims: LlamaDims, spec: str = "local"
                   ) -> list[tuple[str, torch.Tensor]]:
    """One Megatron tensor -> its HF tensors (views where the layout allows)."""
    rule, hf_names = _rule_for(name, dims, spec)
    return [] if rule is None else list(zip(hf_names, rule.to_hf(tensor, dims)))


def megatron_to_hf_views(name: str, tensor: torch.Tensor, dims: LlamaDims, spec: str = "local"
                         ) -> list[tuple[str, torch.Tensor]]:
    """One Megatron tensor -> views of its HF tensors, each in its HF tensor's row-major element order
    (``view.reshape(hf_shape)`` is the HF tensor; writing an HF tensor's elements into the view fuses it)."""
    rule, hf_names = _rule_for(name, dims, spec)
    return [] if rule is None else list(zip(hf_names, rule.views(tensor, dims)))


def convert_state_dict_hf_to_megatron(hf_state: Mapping[str, torch.Tensor], dims: LlamaDims,
                                      spec: str = "local") -> dict[str, torch.Tensor]:
    """Whole-dict convenience around :class:`HfToMegatron` (tests, small models)."""
    stream = HfToMegatron(dims, spec)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        out.update(stream.feed(name, tensor))
    if stream.missing():
        raise ValueError(f"incomplete fused tensors: {stream.missing()}")
    return out


def convert_state_dict_megatron_to_hf(megatron_state: Mapping[str, torch.Tensor], dims: LlamaDims,
                                      spec: str = "local") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in megatron_state.items():
        if name.endswith("_extra_state"):
            continue
        out.update(megatron_to_hf(name, tensor, dims, spec))
    return out
