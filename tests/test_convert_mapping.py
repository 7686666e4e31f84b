"""Pure tensor-level tests of the HF <-> Megatron mapping table (no megatron import, milliseconds)."""

import pytest
import torch

from nemotune.converters.formats.mapping import (
    LlamaDims,
    check_hf_shapes,
    convert_state_dict_hf_to_megatron,
    convert_state_dict_megatron_to_hf,
    expected_hf_shapes,
    fuse_qkv,
    split_qkv,
)

DIMS = LlamaDims(num_layers=2, hidden=64, heads=4, groups=2, head_dim=16, ffn=176, vocab=1024, tied=False)


def random_hf_state(dims, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in expected_hf_shapes(dims).items()}


def test_qkv_is_interleaved_per_query_group():
    # Row r of q/k/v holds the value r, offset per projection, so the fused layout is readable.
    hd = DIMS.head_dim
    q = torch.arange(DIMS.heads * hd).float().unsqueeze(1)
    k = 1000 + torch.arange(DIMS.groups * hd).float().unsqueeze(1)
    v = 2000 + torch.arange(DIMS.groups * hd).float().unsqueeze(1)
    fused = fuse_qkv(q, k, v, DIMS).squeeze(1)
    # group 0: q heads 0,1 then k head 0 then v head 0; group 1: q heads 2,3, k head 1, v head 1
    expected = torch.cat([q[: 2 * hd], k[:hd], v[:hd], q[2 * hd:], k[hd:], v[hd:]]).squeeze(1)
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused.unsqueeze(1), DIMS), (q, k, v)))


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(spec, tied):
    dims = LlamaDims(**{**DIMS.__dict__, "tied": tied})
    hf = random_hf_state(dims)
    megatron = convert_state_dict_hf_to_megatron(hf, dims, spec)
    norm = ("self_attention.linear_qkv.layer_norm_weight" if spec == "te" else "input_layernorm.weight")
    assert f"decoder.layers.1.{norm}" in megatron
    assert ("output_layer.weight" in megatron) is (not tied)
    assert megatron["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * dims.ffn, dims.hidden)
    assert torch.equal(megatron["decoder.layers.0.mlp.linear_fc1.weight"][: dims.ffn],
                       hf["model.layers.0.mlp.gate_proj.weight"])
    back = convert_state_dict_megatron_to_hf(megatron, dims, spec)
    assert back.keys() == hf.keys()
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


def test_incomplete_fused_tensor_is_reported():
    hf = random_hf_state(DIMS)
    del hf["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="decoder.layers.1.self_attention.linear_qkv.weight"):
        convert_state_dict_hf_to_megatron(hf, DIMS)


def test_shape_check_lists_every_problem():
    shapes = {k: tuple(v) for k, v in expected_hf_shapes(DIMS).items()}
    shapes["model.layers.0.mlp.up_proj.weight"] = (100, 64)
    del shapes["model.norm.weight"]
    with pytest.raises(ValueError) as info:
        check_hf_shapes(shapes, DIMS, origin="ckpt")
    assert "model.layers.0.mlp.up_proj.weight: shape [100, 64] but the config implies [176, 64]" in str(info.value)
    assert "missing tensor model.norm.weight" in str(info.value)
