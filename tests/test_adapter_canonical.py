"""The canonical LoRA variant (one adapter per HF projection): HF PEFT 1:1, NeMo's unfused .nemo layout, exact
conversions to / from the fused variant, merge, and the real Megatron LoRA module against transformers + peft."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from test_adapter_export import (ALPHA, DIM, assert_nemo_matches_fixture, logits, peft_logits,
                                 random_adapter)

from nemotune.converters.formats import adapters as adapter_io
from nemotune.converters import checkpoint
from nemotune.converters.formats.hf_config import load_hf_config

ALL_HF = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def hf(sharded_tiny_hf):
    return load_hf_config(sharded_tiny_hf)


@pytest.fixture(scope="module")
def canonical_dir(hf, tmp_path_factory):
    state, config = random_adapter(hf, variant="canonical", seed=1)
    return adapter_io.save_adapter(tmp_path_factory.mktemp("canonical") / "adapter", state, config)


def input_ids():
    return torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))


def test_canonical_keys_and_shapes_are_the_documented_ones(hf):
    state, _ = random_adapter(hf, variant="canonical")
    prefix = "decoder.layers.0.self_attention.adapter_layer.lora_unfused_kqv_adapter"
    assert state[f"{prefix}.q_adapter.linear_out.weight"].shape == (4 * 16, DIM)
    assert state[f"{prefix}.k_adapter.linear_out.weight"].shape == (2 * 16, DIM)
    assert state[f"{prefix}.v_adapter.linear_in.weight"].shape == (DIM, 64)
    assert state["decoder.layers.1.mlp.adapter_layer.lora_unfused_hto4h_adapter.up_adapter.linear_out.weight"].shape \
        == (176, DIM)
    assert len(state) == 2 * (3 + 1 + 2 + 1) * 2
    assert adapter_io.parse_adapter_key(f"{prefix}.k_adapter.linear_in.weight") == (
        0, "linear_qkv", "linear_in", "canonical", 1)


def test_canonical_export_to_peft_matches_merge_and_changes_the_model(sharded_tiny_hf, canonical_dir, tmp_path):
    peft_dir = adapter_io.export_hf_peft(canonical_dir, tmp_path / "peft", base_model_name_or_path=str(sharded_tiny_hf))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ALL_HF and config["r"] == DIM and config["lora_alpha"] == ALPHA
    peft_state = load_file(str(peft_dir / "adapter_model.safetensors"))
    state, _ = adapter_io.load_adapter(canonical_dir)
    unfused = "decoder.layers.1.self_attention.adapter_layer.lora_unfused_kqv_adapter"
    assert torch.equal(peft_state["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"],
                       state[f"{unfused}.k_adapter.linear_in.weight"])
    assert torch.equal(peft_state["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"],
                       state["decoder.layers.1.mlp.adapter_layer.lora_unfused_hto4h_adapter.gate_adapter.linear_out.weight"])
    assert len(peft_state) == len(state)  # 1:1

    merged = adapter_io.merge_adapter(sharded_tiny_hf, canonical_dir, tmp_path / "merged", progress=False)
    via_peft = peft_logits(sharded_tiny_hf, peft_dir, input_ids())  # also asserts: no missing / unexpected key warnings
    torch.testing.assert_close(via_peft, logits(merged, input_ids()), atol=1e-5, rtol=0)
    assert (via_peft - logits(sharded_tiny_hf, input_ids())).abs().max() > 1e-2


def test_peft_adapter_imports_as_canonical_bit_exact(sharded_tiny_hf, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(sharded_tiny_hf), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_HF, task_type="CAUSAL_LM",
                                                  layers_to_transform=[1]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))

    state, config = adapter_io.load_adapter(tmp_path / "theirs", base_config=sharded_tiny_hf)
    assert config["variant"] == "canonical" and config["dim"] == 4 and config["alpha"] == 8
    assert config["layer_selection"] == [2]  # 1-based, as in NeMo and nemotune.recipes.engine.lora
    assert config["target_modules"] == list(adapter_io.TARGETS)
    peft_state, peft_config = adapter_io.to_peft(state, config)
    assert peft_state.keys() == theirs.keys() and peft_config["layers_to_transform"] == [1]
    for key, tensor in theirs.items():
        assert torch.equal(peft_state[key], tensor), key

    # and it computes what peft computes
    mine = adapter_io.save_adapter(tmp_path / "mine", state, config)
    merged = adapter_io.merge_adapter(sharded_tiny_hf, mine, tmp_path / "merged", progress=False)
    torch.testing.assert_close(logits(merged, input_ids()), logits(peft_model, input_ids()), atol=1e-5, rtol=0)


def test_nemo_to_canonical_is_exact_and_back(hf):
    fused, fused_config = random_adapter(hf, variant="nemo", seed=2)
    canonical, canonical_config = adapter_io.convert_adapter(fused, fused_config, "canonical")
    assert canonical_config["variant"] == "canonical" and canonical_config["dim"] == DIM
    expected, got = adapter_io.lora_deltas(fused, fused_config), adapter_io.lora_deltas(canonical, canonical_config)
    assert expected.keys() == got.keys() and len(got) == 2 * 7
    for name, (lora_b, lora_a) in expected.items():
        assert torch.equal(got[name][0], lora_b) and torch.equal(got[name][1], lora_a), name
    # q, k, v share A after nemo -> canonical, so canonical -> nemo is exact and gives the original back
    back, back_config = adapter_io.convert_adapter(canonical, canonical_config, "nemo")
    assert back.keys() == fused.keys() and back_config["dim"] == DIM
    for key in fused:
        assert torch.equal(back[key], fused[key]), key


def test_canonical_to_nemo_refuses_distinct_a_unless_stacked(hf):
    canonical, config = random_adapter(hf, variant="canonical", seed=3)
    with pytest.raises(adapter_io.AdapterError, match="different A matrices"):
        adapter_io.convert_adapter(canonical, config, "nemo")
    stacked, stacked_config = adapter_io.convert_adapter(canonical, config, "nemo", stack=True)
    assert stacked_config["dim"] == 3 * DIM and stacked_config["alpha"] == 3 * ALPHA
    expected, got = adapter_io.lora_deltas(canonical, config), adapter_io.lora_deltas(stacked, stacked_config)
    for name, (lora_b, lora_a) in expected.items():
        torch.testing.assert_close(got[name][0] @ got[name][1], lora_b @ lora_a, atol=1e-6, rtol=0)


def test_load_adapter_converts_to_the_requested_variant(hf, canonical_dir, tmp_path):
    fused, fused_config = random_adapter(hf, variant="nemo", seed=4)
    fused_config.pop("variant")  # a dir written before the variant field: fused
    fused_dir = adapter_io.save_adapter(tmp_path / "old", fused, fused_config)
    assert json.loads((fused_dir / "nemotune_adapter.json").read_text())["variant"] == "nemo"
    state, config = adapter_io.load_adapter(fused_dir, variant="canonical")
    assert config["variant"] == "canonical" and all("unfused" in k or "dense" in k or "4htoh" in k for k in state)
    with pytest.raises(adapter_io.AdapterError, match="peft.lora.variant=canonical"):
        adapter_io.load_adapter(canonical_dir, variant="nemo")


def test_canonical_nemo_lora_layout_matches_nemo_fixture(hf, tmp_path, caplog):
    state, config = random_adapter(hf, variant="canonical", layer_selection=[2])
    adapter_dir = adapter_io.save_adapter(tmp_path / "adapter", state, config)
    out = tmp_path / "lora.nemo"
    with caplog.at_level(logging.WARNING, logger="nemotune.converters"):
        adapter_io.export_nemo_lora(adapter_dir, out)
    assert "only the fused qkv adapter" in caplog.text
    assert_nemo_matches_fixture(out, "nemo_lora_canonical_tiny", state)


def test_canonical_validation_reports_every_problem(hf, tmp_path):
    state, config = random_adapter(hf, targets=("linear_qkv", "linear_fc1"), variant="canonical")
    unfused = "decoder.layers.0.self_attention.adapter_layer.lora_unfused_kqv_adapter"
    state[f"{unfused}.k_adapter.linear_out.weight"] = torch.zeros(64, DIM)  # q's rows, not k's
    del state["decoder.layers.1.mlp.adapter_layer.lora_unfused_hto4h_adapter.up_adapter.linear_in.weight"]
    state["decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight"] = torch.zeros(DIM, 64)
    with pytest.raises(adapter_io.AdapterError) as info:
        adapter_io.save_adapter(tmp_path / "bad", state, config)
    message = str(info.value)
    assert f"{unfused}.k_adapter.linear_out.weight: shape [64, 8], expected [32, 8]" in message
    assert "missing decoder.layers.1.mlp.adapter_layer.lora_unfused_hto4h_adapter.up_adapter.linear_in" in message
    assert "unexpected decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in" in message
    with pytest.raises(adapter_io.AdapterError) as info:
        adapter_io.save_adapter(tmp_path / "bad", state, {**config, "variant": "fused", "layer_selection": [0, 3]})
    assert "variant: 'fused'" in str(info.value) and "layer_selection: [0, 3] out of range" in str(info.value)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("variant", ["canonical", "nemo"])
def test_megatron_lora_matches_transformers_with_exported_peft(sharded_tiny_hf, hf, sharded_tiny_mcore, variant, tmp_path):
    """nemotune.recipes.engine.lora on our Megatron model with the adapter == transformers + peft with its HF PEFT export."""
    state, config = random_adapter(hf, variant=variant, seed=5, layer_selection=[2] if variant == "nemo" else None)
    adapter_dir = adapter_io.save_adapter(tmp_path / "adapter", state, config)
    assert checkpoint.verify(sharded_tiny_hf, sharded_tiny_mcore, adapter=adapter_dir) <= 1e-5
    # the same comparison fails without the adapter on the HF side: the check has teeth
    no_op = adapter_io.save_adapter(tmp_path / "zero", {k: torch.zeros_like(v) for k, v in state.items()}, config)
    peft_dir = adapter_io.export_hf_peft(no_op, tmp_path / "zero-peft")
    assert checkpoint.verify(sharded_tiny_hf, sharded_tiny_mcore, adapter=adapter_dir, peft_dir=peft_dir) > 1e-3
