"""Build megatron-core's hybrid Mamba-Transformer model (MambaModel) from a NemotronHForCausalLM config.

The HF config decides everything: `hybrid_override_pattern` (M Mamba-2, * attention, - squared-ReLU MLP)
goes to megatron's own layer allocation; the Mamba-2 sizes (mamba_num_heads, mamba_head_dim, ssm_state_size,
n_groups, conv_kernel, chunk_size) to its TransformerConfig / MambaMixer; no position embedding (Nemotron-H
attention has no RoPE). The layer spec is local PyTorch (as `model.layer_spec(False)`): separate RMSNorms,
Column/RowParallelLinear projections, SDPA core attention. Where mamba_ssm / causal_conv1d are absent (CPU),
`mamba_cpu.install()` puts the reference kernels behind megatron's mixer first.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemotune.converters.formats.mapping_nemotron_h import load_nemotron_h_config
from nemotune.recipes.engine.megatron_cpu import on_gpu
from nemotune.recipes.engine.model import (SequenceParallelRMSNorm, _sdpa_core_attention, default_params_dtype,
                                           runtime_fields)


def transformer_config_from_nemotron_h(hf: Mapping[str, Any], *, params_dtype: torch.dtype | None = None,
                                       tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                                       sequence_parallel: bool = False, **overrides):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = params_dtype or default_params_dtype()
    kwargs = dict(
        num_layers=len(hf["hybrid_override_pattern"]),
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_key_value_heads"],
        kv_channels=hf["head_dim"],
        ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf["layer_norm_epsilon"],
        gated_linear_unit=False,
        activation_func=squared_relu,
        add_bias_linear=False,
        add_qkv_bias=False,
        mamba_state_dim=hf["ssm_state_size"],
        mamba_head_dim=hf["mamba_head_dim"],
        mamba_num_groups=hf["n_groups"],
        mamba_num_heads=hf["mamba_num_heads"],
        init_method_std=hf["initializer_range"],
        **runtime_fields(params_dtype, tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def hybrid_stack_spec():
    """MambaStack spec with local (pure PyTorch) layers; the same module names as the TE spec except the norms,
    which are separate modules (`norm`, `input_layernorm`, `pre_mlp_layernorm`) instead of fused ones."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    norm = SequenceParallelRMSNorm
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear, core_attention=_sdpa_core_attention(),
                                          linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add)),
    ))


PACKING_REFUSED = (
    "packed sequences are refused for Nemotron-H: the Mamba-2 layers would carry their conv and SSM state "
    "across the documents of a pack (megatron's mixer resets state per document only through mamba_ssm's "
    "seq_idx, which nemotune does not yet derive from its packed batches); prepare and train unpacked data")


class PackedSequencesRefused(ValueError):
    pass


def _refuse_packed_documents(module, args, kwargs):
    """A packed batch (a DocumentMask or PackedSeqParams) reaching the hybrid stack is refused, not run wrong."""
    from nemotune.recipes.engine.batches import DocumentMask

    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if isinstance(mask, DocumentMask) or kwargs.get("packed_seq_params") is not None:
        raise PackedSequencesRefused(PACKING_REFUSED)


def build_hybrid_model(hf: Mapping[str, Any], *, pre_process: bool | None = None,
                       post_process: bool | None = None, device: str | torch.device | None = None,
                       init_weights: bool = True, params_dtype=None, **config_overrides):
    """megatron-core MambaModel for this pipeline stage; `device="meta"` builds shapes only."""
    from megatron.core import parallel_state
    from megatron.core.models.mamba import MambaModel

    from nemotune.recipes.engine import mamba_cpu
    from nemotune.recipes.engine.distributed import init_distributed
    from nemotune.recipes.engine.model import _mark_tensor_parallel_weights

    if not parallel_state.model_parallel_is_initialized():
        init_distributed()
    hf = load_nemotron_h_config(hf)
    mamba_cpu.install(final_norm_cls=SequenceParallelRMSNorm)
    meta = str(device) == "meta"
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    config = transformer_config_from_nemotron_h(
        hf, params_dtype=params_dtype, perform_initialization=init_weights and not meta,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        **config_overrides)
    build_kwargs = dict(
        config=config, mamba_stack_spec=hybrid_stack_spec(), vocab_size=hf["vocab_size"],
        max_sequence_length=hf["max_position_embeddings"], pre_process=pre_process, post_process=post_process,
        hybrid_override_pattern=hf["hybrid_override_pattern"],
        share_embeddings_and_output_weights=bool(hf["tie_word_embeddings"]), position_embedding_type="none")
    if meta:
        with torch.device("meta"):
            model = MambaModel(**build_kwargs)
    else:
        model = MambaModel(**build_kwargs)
        if device is not None:
            model = model.to(device)
        elif on_gpu():
            model = model.cuda()
    # megatron's mixer fixes the gated norm's epsilon at 1e-5; the model's own is layer_norm_epsilon
    for module in model.modules():
        if type(module).__name__ == "MambaMixer" and getattr(module, "norm", None) is not None:
            module.norm.eps = hf["layer_norm_epsilon"]
    model.decoder.register_forward_pre_hook(_refuse_packed_documents, with_kwargs=True)
    if not (init_weights and not meta):
        _mark_tensor_parallel_weights(model)
    if post_process:
        from nemotune.recipes.engine import loss

        loss.install(model)
    model.hf_config = hf
    return model
