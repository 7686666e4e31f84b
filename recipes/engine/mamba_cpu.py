"""Reference (pure PyTorch) Mamba-2 kernels behind megatron-core's MambaMixer where mamba_ssm is absent.

megatron-core's `MambaMixer` calls the `mamba_ssm` Triton kernels (`mamba_split_conv1d_scan_combined` in
training, `mamba_chunk_scan_combined` at prefill, the gated `RMSNorm`) and `causal_conv1d`'s CUDA conv;
without them the mixer refuses to build. `install()` puts reference implementations of exactly those
functions into `megatron.core.ssm.mamba_mixer`, so the mixer's own code (projections, splits, TP sharding,
A = -exp(A_log), dt_bias, D, the gated norm's placement) runs unchanged on the CPU:

- `causal_conv1d_fn`: depthwise causal conv1d (+ SiLU), `torch.nn.functional.conv1d`.
- `mamba_chunk_scan_combined`: the chunked SSD scan of the Mamba-2 paper (`ssd_minimal_discrete`:
  intra-chunk quadratic form, inter-chunk state recurrence), with D skip, z gating, dt_bias, softplus and
  dt_limit, initial / final states.
- `mamba_split_conv1d_scan_combined`: split z / xBC / dt, conv, scan, optional gated RMSNorm and out
  projection, as mamba_ssm composes them.
- `RMSNormGated`: mamba_ssm's grouped, gated RMSNorm (`norm_before_gate=False`: norm(x * silu(z))).
- The hybrid stack's final `TENorm` (Transformer Engine only) -> the norm class the caller gives.
- Where `triton` is absent, megatron's Triton tensor ops for dynamic-batching inference
  (`...attention_context.triton.tensor_ops`, imported unconditionally by mamba_mixer in 0.16) are a stub
  module whose functions raise: training and static prefill never call them.

`seq_idx` (packed documents) resets conv and scan state per document by running each document on its
own. `install()` is idempotent; where mamba_ssm imports, the real kernels run and only the final norm is
redirected (when Transformer Engine is absent). tests/test_nemotron_h.py checks the scan against a plain
recurrence and transformers' own PyTorch path, and the whole model against NemotronHForCausalLM.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types

import torch
import torch.nn.functional as F

_INSTALLED = False

_TRITON_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"

REDIRECTS = (
    _TRITON_OPS + " -> a stub that raises (only where triton is absent)",
    "megatron.core.ssm.mamba_mixer.{mamba_split_conv1d_scan_combined, mamba_chunk_scan_combined, "
    "causal_conv1d_fn} -> reference PyTorch",
    "megatron.core.ssm.mamba_mixer.ExtendedRMSNorm -> reference gated RMSNorm (same sharded_state_dict)",
    "megatron.core.ssm.mamba_mixer.HAVE_MAMBA_SSM -> True",
    "megatron.core.ssm.mamba_block.TENorm -> the given norm class (no Transformer Engine)",
    "megatron.core.tensor_parallel.random's 'CPU RNG state changed within GPU RNG context' -> dropped on CPU",
)


def _act(x, activation):
    return F.silu(x) if activation in ("silu", "swish") else x


def _runs(seq_idx_row: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of equal values in a 1-D sequence-index row."""
    change = torch.nonzero(seq_idx_row[1:] != seq_idx_row[:-1]).flatten().tolist()
    bounds = [0] + [c + 1 for c in change] + [seq_idx_row.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """x: [b, d, l], weight: [d, w] -> [b, d, l]; causal per channel (and per document with seq_idx)."""
    if initial_states is not None or return_final_states:
        raise NotImplementedError("reference causal_conv1d_fn: conv states are an inference feature")
    if seq_idx is not None:
        rows = []
        for b in range(x.shape[0]):
            rows.append(torch.cat([causal_conv1d_fn(x[b:b + 1, :, s:e], weight, bias, activation=activation)
                                   for s, e in _runs(seq_idx[b])], dim=-1))
        return torch.cat(rows, dim=0)
    width = weight.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])
    return _act(out[..., :x.shape[-1]], activation).to(x.dtype)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: out[i, j] = sum(x[j+1 .. i]) for j <= i, -inf above the diagonal."""
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)
    x = x.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=0),
                         -torch.inf)


def _ssd(x, a, B, C, chunk_size, initial_states=None):
    """The chunked SSD scan (discretized): x [b, l, h, p], a [b, l, h], B/C [b, l, h, n] -> y, final state."""
    b, seqlen, h, p = x.shape
    pad = (-seqlen) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        a = F.pad(a, (0, 0, 0, pad))
    chunks = x.shape[1] // chunk_size
    x, B, C = (t.reshape(b, chunks, chunk_size, h, t.shape[-1]) for t in (x, B, C))
    a = a.reshape(b, chunks, chunk_size, h).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cumsum = torch.cumsum(a, dim=-1)
    # 1. within each chunk: the quadratic (attention-like) form
    decay = torch.exp(_segsum(a))  # [b, h, c, l, s]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x)
    # 2. each chunk's final state from its own inputs
    decay_states = torch.exp(a_cumsum[..., -1:] - a_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, x)
    # 3. the recurrence across chunks
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states[:, None].to(states.dtype)
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. the state entering each chunk -> its outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cumsum))
    y = (y_diag + y_off).reshape(b, chunks * chunk_size, h, p)[:, :seqlen]
    return y, final_state


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """mamba_ssm's signature: x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h] or [h, p],
    z [b, l, h, p] -> y [b, l, h, p] (x's dtype), plus the final state [b, h, p, n] when asked."""
    if return_varlen_states or cu_seqlens is not None:
        raise NotImplementedError("reference mamba_chunk_scan_combined: varlen states are an inference feature")
    if seq_idx is not None:
        if initial_states is not None or return_final_states:
            raise NotImplementedError("reference scan: states with seq_idx are an inference feature")
        rows = []
        for b in range(x.shape[0]):
            parts = []
            for s, e in _runs(seq_idx[b]):
                parts.append(mamba_chunk_scan_combined(
                    x[b:b + 1, s:e], dt[b:b + 1, s:e], A, B[b:b + 1, s:e], C[b:b + 1, s:e], chunk_size, D=D,
                    z=None if z is None else z[b:b + 1, s:e], dt_bias=dt_bias, dt_softplus=dt_softplus,
                    dt_limit=dt_limit))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)
    heads = x.shape[2]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    xf = x.float()
    rep = heads // B.shape[2]
    Bh = B.float().repeat_interleave(rep, dim=2)
    Ch = C.float().repeat_interleave(rep, dim=2)
    y, final_state = _ssd(xf * dt[..., None], A.float() * dt, Bh, Ch, chunk_size, initial_states)
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, final_state) if return_final_states else y


def _gated_rmsnorm(x, weight, bias, z, eps, group_size, norm_before_gate):
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    group_size = group_size or x.shape[-1]
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    out = grouped.reshape(x.shape) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """mamba_ssm's fused training path, composed from the reference pieces: zxbcdt [b, l, 2*d_inner +
    2*ngroups*n + h] -> [b, l, d_inner] (or [b, l, d_model] with outproj_weight)."""
    if initial_states is not None or return_final_states:
        raise NotImplementedError("reference split-conv-scan: states are an inference feature")
    heads, headdim = (D.shape[0], headdim) if D.dim() == 1 else D.shape
    dim = heads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - heads) // 2
    if d_nonssm:
        raise NotImplementedError("reference split-conv-scan: extra SwiGLU channels (d_nonssm > 0)")
    batch, seqlen, _ = zxbcdt.shape
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, heads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                           activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y = mamba_chunk_scan_combined(
        x.reshape(batch, seqlen, heads, headdim), dt, A, B.reshape(batch, seqlen, ngroups, dstate),
        C.reshape(batch, seqlen, ngroups, dstate), chunk_size, D=D,
        z=None if rmsnorm_weight is not None else z.reshape(batch, seqlen, heads, headdim), dt_bias=dt_bias,
        seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit).reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = _gated_rmsnorm(y, rmsnorm_weight, None, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return y


class RMSNormGated(torch.nn.Module):
    """mamba_ssm.ops.triton.layernorm_gated.RMSNorm: grouped RMSNorm with an optional SiLU gate."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return _gated_rmsnorm(x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate)


class ExtendedRMSNorm(RMSNormGated):
    """megatron's ExtendedRMSNorm over the reference norm: the weight is sharded by TP rank along axis 0 in
    checkpoints (megatron subclasses mamba_ssm's class, a MagicMock where mamba_ssm is absent)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        if not hasattr(self, "tp_group"):
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group")
            or parallel_state.get_data_parallel_group(with_context_parallel=True))


def install(final_norm_cls=None) -> bool:
    """Put the reference kernels behind megatron-core's mixer where mamba_ssm is absent. Returns True when
    the references are active (idempotent); False where the real kernels run."""
    global _INSTALLED
    _stub_triton_ops()
    _quiet_cpu_rng_warning()
    mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    block = importlib.import_module("megatron.core.ssm.mamba_block")
    if final_norm_cls is not None and not _te_present():  # with or without mamba_ssm
        block.TENorm = final_norm_cls
    if not _INSTALLED and mixer.HAVE_MAMBA_SSM:
        return False
    if not _INSTALLED:
        mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
        mixer.mamba_chunk_scan_combined = mamba_chunk_scan_combined
        mixer.causal_conv1d_fn = causal_conv1d_fn
        mixer.ExtendedRMSNorm = ExtendedRMSNorm
        mixer.RMSNormGated = RMSNormGated
        mixer.HAVE_MAMBA_SSM = True
        _INSTALLED = True
    return True


class _CpuRngFilter(logging.Filter):
    """megatron's RNG tracker warns when the CPU generator moves inside a "GPU" RNG fork; where CUDA is absent
    the two are one generator (megatron_cpu), so the mixer's initialization always trips it: drop that line."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _quiet_cpu_rng_warning() -> None:
    if torch.cuda.is_available():
        return
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    if not any(isinstance(f, _CpuRngFilter) for f in logger.filters):
        logger.addFilter(_CpuRngFilter())


def _stub_triton_ops() -> None:
    if importlib.util.find_spec("triton") is not None or _TRITON_OPS in sys.modules:
        return
    stub = types.ModuleType(_TRITON_OPS)

    def _needs_triton(*args, **kwargs):
        raise NotImplementedError("megatron's dynamic-batching Mamba inference needs triton (a GPU install)")

    for name in ("tensor_get_slice_after", "tensor_merge", "tensor_masked_update"):
        setattr(stub, name, _needs_triton)
    sys.modules[_TRITON_OPS] = stub


def _te_present() -> bool:
    te = importlib.import_module("megatron.core.extensions.transformer_engine")
    return bool(getattr(te, "HAVE_TE", False))
