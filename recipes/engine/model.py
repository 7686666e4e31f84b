"""Build megatron-core's GPTModel from a Hugging Face config of a supported family.

Families (converters/formats/hf_config.FAMILIES): Llama (LlamaForCausalLM, Llama 3.x and the Llama-Nemotrons),
Mistral (MistralForCausalLM: Mistral-NeMo, Mistral-NeMo-Minitron), Qwen2 (q/k/v bias), Qwen3 (per-head
q/k RMSNorm) and Nemotron-4 / Minitron (NemotronForCausalLM: LayerNorm1P, squared-ReLU MLP without a gate,
partial RoPE). :func:`transformer_config_from_hf` maps each HF field to its TransformerConfig field.

The HF `config.json` is the single source of truth for the architecture: `conf/model/*.yaml` inline its
fields (so an 8B model can be built on the meta device with nothing downloaded), or point `hf_path` at a
checkpoint directory. Transformer Engine's layer spec is used when TE imports and CUDA is present, the
local (pure PyTorch) spec otherwise; parameters are bf16 on GPU and fp32 on CPU.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Mapping

import torch

from nemotune.converters.formats.hf_config import load_hf_config
from nemotune.recipes.engine.megatron_cpu import on_gpu


def te_available() -> bool:
    """Transformer Engine's spec is used only where it imports and a CUDA device exists."""
    if not on_gpu():
        return False
    try:
        importlib.import_module("transformer_engine")
    except Exception:
        return False
    return True


def default_params_dtype() -> torch.dtype:
    return torch.bfloat16 if on_gpu() else torch.float32


def transformer_config_from_hf(hf: Mapping[str, Any], *, params_dtype: torch.dtype | None = None,
                               tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                               sequence_parallel: bool = False, context_parallel_size: int = 1,
                               **overrides):
    """TransformerConfig for a config read by ``load_hf_config``, field by field:

    num_hidden_layers -> num_layers, hidden_size, num_attention_heads, num_key_value_heads ->
    num_query_groups, head_dim -> kv_channels (Mistral-NeMo: 128 != hidden / heads), intermediate_size ->
    ffn_hidden_size, the norm epsilon -> layernorm_epsilon; the family's norm -> normalization RMSNorm, or
    LayerNorm with layernorm_zero_centered_gamma (Nemotron's LayerNorm1P); its MLP -> gated_linear_unit +
    silu (SwiGLU) or squared_relu without a gate (Nemotron); q/k/v bias -> add_qkv_bias (Qwen2); per-head q/k
    norm -> qk_layernorm (Qwen3). RoPE (theta, llama3 scaling, partial_rotary_factor -> rotary_percent) and
    tie_word_embeddings are GPTModel arguments (:func:`build_gpt_model`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = params_dtype or default_params_dtype()
    layer_norm_1p = hf.get("norm", "RMSNorm") == "LayerNorm1P"
    gated = bool(hf.get("gated_mlp", True))
    kwargs = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_key_value_heads"],
        kv_channels=hf["head_dim"],
        ffn_hidden_size=hf["intermediate_size"],
        normalization="LayerNorm" if layer_norm_1p else "RMSNorm",
        layernorm_zero_centered_gamma=layer_norm_1p,
        layernorm_epsilon=hf["rms_norm_eps"],
        gated_linear_unit=gated,
        activation_func=torch.nn.functional.silu if gated else squared_relu,
        add_bias_linear=False,
        add_qkv_bias=bool(hf.get("qkv_bias", False)),
        qk_layernorm=bool(hf.get("qk_norm", False)),
        init_method_std=hf["initializer_range"],
        context_parallel_size=context_parallel_size,
        **runtime_fields(params_dtype, tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def runtime_fields(params_dtype: torch.dtype, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                   sequence_parallel: bool) -> dict:
    """The TransformerConfig fields every builder shares: no dropout, dtype, parallel sizes, and the fusions
    that need CUDA kernels switched off on CPU."""
    gpu = on_gpu()
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        # identical full weights whatever the TP size, so runs at different TP compare exactly
        use_cpu_initialization=not gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2: Nemotron's MLP activation (transformers' "relu2"); megatron.core.activations has the same."""
    return torch.pow(torch.nn.functional.relu(x), 2)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for the local spec that also runs under sequence parallelism.

    megatron's WrappedTorchNorm refuses sequence_parallel; the maths is the same on a sequence shard,
    and marking the weights `sequence_parallel` makes DDP all-reduce their grads across the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


class SequenceParallelLayerNorm1P(torch.nn.LayerNorm):
    """torch LayerNorm with a zero-centred gamma (weight + 1 at run time) for the local spec, also under
    sequence parallelism: megatron's layernorm_zero_centered_gamma on CPU, where megatron's WrappedTorchNorm
    refuses it. It is transformers' NemotronLayerNorm1P, so Nemotron's stored weights map 1:1; a fresh one
    starts at gamma 0 (i.e. 1), as megatron initialises its own."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        with torch.no_grad():
            self.weight.zero_()
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class LocalNorm:
    """The local spec's norm module, chosen by the config: RMSNorm, or LayerNorm1P when
    config.layernorm_zero_centered_gamma (megatron builds every norm -- per layer, final, per-head q/k --
    with (config, hidden_size, eps))."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm" and not config.layernorm_zero_centered_gamma:
            return SequenceParallelRMSNorm(config, hidden_size, eps)
        if config.normalization == "LayerNorm" and config.layernorm_zero_centered_gamma:
            return SequenceParallelLayerNorm1P(config, hidden_size, eps)
        raise ValueError(f"no local norm for normalization={config.normalization!r}, zero_centered_gamma="
                         f"{config.layernorm_zero_centered_gamma}")


def _sdpa_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemotune.recipes.engine.batches import DocumentMask

    class SdpaCoreAttention(DotProductAttention):
        """The local spec's core attention through torch's fused scaled_dot_product_attention.

        megatron's DotProductAttention materializes [b, heads, s, s] scores (baddbmm, masked_fill, softmax,
        bmm and their copies): most of a CPU step. SDPA gives the same losses (1e-7) at about twice the
        speed (bench/train_cpu.py); with a DocumentMask it runs causally per packed document. Queries fewer
        than the keys (decoding with megatron's KV cache) attend causally with the offset.
        """

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is not None or attention_bias is not None:
                raise NotImplementedError("THD packed sequences / attention bias need the TE spec")
            seq, batch = query.shape[0], query.shape[1]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
            if q.shape[1] != k.shape[1]:  # GQA: each query group's k/v serves heads/groups query heads
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            spans_of_rows = attention_mask.spans if isinstance(attention_mask, DocumentMask) else \
                spans_from_tensor(attention_mask) if _is_spans_tensor(attention_mask) else None
            if spans_of_rows is not None:  # causal attention within each packed document
                rows = [torch.cat([sdpa(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                        is_causal=True, scale=self.softmax_scale) for s, e in spans], dim=2)
                        for b, spans in enumerate(spans_of_rows)]
                out = torch.cat(rows, dim=0)
            elif attention_mask is None and q.shape[2] != k.shape[2]:
                # KV-cache decoding: the queries are the last positions of the cached keys, so causal means
                # key j <= query i + (keys - queries) (torch's is_causal aligns the mask top-left instead)
                offset = k.shape[2] - q.shape[2]
                allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(offset)
                out = sdpa(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
            else:
                allowed = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
                out = sdpa(q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)

    return SdpaCoreAttention


def spans_tensor(mask) -> torch.Tensor:
    """A DocumentMask as an integer tensor [rows, documents, 2] of (start, end), rows padded with empty (0, 0)
    spans: what megatron's activation recompute can save for backward (it saves tensors only)."""
    width = max(len(spans) for spans in mask.spans)
    out = torch.zeros((len(mask.spans), width, 2), dtype=torch.long)
    for row, spans in enumerate(mask.spans):
        if spans:
            out[row, :len(spans)] = torch.tensor(spans, dtype=torch.long)
    return out


def spans_from_tensor(tensor: torch.Tensor) -> list:
    return [[(s, e) for s, e in row if e > s] for row in tensor.tolist()]


def _is_spans_tensor(mask) -> bool:
    return isinstance(mask, torch.Tensor) and not mask.is_floating_point() and mask.dtype != torch.bool \
        and mask.dim() == 3 and mask.shape[-1] == 2


def layer_spec(use_te: bool, qk_layernorm: bool = False):
    """The transformer-block spec: TE fused layers on GPU, local PyTorch layers otherwise (every norm a
    :class:`LocalNorm`, which follows the config's normalization)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = _sdpa_core_attention()
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = LocalNorm
    spec.submodules.input_layernorm = LocalNorm
    spec.submodules.pre_mlp_layernorm = LocalNorm
    return spec, TransformerBlockSubmodules, LocalNorm


def llama3_inv_freq(hf: Mapping[str, Any]) -> torch.Tensor:
    """RoPE inverse frequencies (over the rotated part of a head) with Llama 3.x scaling, exactly as
    transformers computes them.

    megatron-core hard-codes low/high_freq_factor 1/4 and an 8192 original context; this honours the
    config's own values.
    """
    dim = int(hf["head_dim"] * hf.get("partial_rotary_factor", 1.0))  # Nemotron rotates half of each head
    inv_freq = 1.0 / (hf["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = hf.get("rope_scaling")
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_gpt_model(hf: Mapping[str, Any], *, pre_process: bool | None = None,
                    post_process: bool | None = None, device: str | torch.device | None = None,
                    use_te: bool | None = None, init_weights: bool = True, params_dtype=None,
                    **config_overrides):
    """GPTModel for this pipeline stage; `device="meta"` builds shapes only (parameter counting).

    Uses megatron's parallel state; where none is initialized yet (a converter, a parameter count) a
    world of one is started.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from nemotune.recipes.engine.distributed import init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed()

    hf = load_hf_config(hf)
    use_te = te_available() if use_te is None else use_te
    meta = str(device) == "meta"
    parallel = dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    config = transformer_config_from_hf(
        hf, params_dtype=params_dtype, perform_initialization=init_weights and not meta,
        **{**parallel, **config_overrides})
    if use_te:
        spec = layer_spec(True, config.qk_layernorm)
    else:
        layer, block_submodules, norm = layer_spec(False, config.qk_layernorm)
        spec = block_submodules(layer_specs=[layer] * _layers_on_this_stage(config), layer_norm=norm)
    build_kwargs = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf["max_position_embeddings"],
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(hf["tie_word_embeddings"]),
        position_embedding_type="rope",
        rotary_percent=float(hf.get("partial_rotary_factor", 1.0)),
        rotary_base=int(hf["rope_theta"]),
    )
    if meta:
        with torch.device("meta"):
            model = GPTModel(**build_kwargs)
    else:
        model = GPTModel(**build_kwargs)
        rotary = getattr(model, "rotary_pos_emb", None)
        if rotary is not None:
            rotary.inv_freq = llama3_inv_freq(hf).to(rotary.inv_freq.device)
        if device is not None:
            model = model.to(device)
        elif on_gpu():
            model = model.cuda()
    if not (init_weights and not meta):
        _mark_tensor_parallel_weights(model)
    if post_process:  # the loss with labels never holds [tokens x vocab] logits (nemotune.recipes.engine.loss)
        from nemotune.recipes.engine import loss

        loss.install(model)
    model.hf_config = hf
    return model


def _mark_tensor_parallel_weights(model) -> None:
    """megatron tags a weight's TP partition only while initializing it; tag the uninitialized ones too,
    so sharding, loading and parameter counting work for a model built without initialization."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding)

    for module in model.modules():
        dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}.get(type(module))
        if dim is None:
            for cls, d in ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1)):
                if isinstance(module, cls):
                    dim = d
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not hasattr(weight, "partition_dim"):
            tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _layers_on_this_stage(config) -> int:
    from megatron.core import parallel_state

    return config.num_layers // parallel_state.get_pipeline_model_parallel_world_size()
