"""LoRA adapter formats: consolidated dir <-> HF PEFT, NeMo .nemo LoRA layout, merge; checked with peft itself."""

import json
import logging
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from nemotune.converters.formats import adapters as adapter_io
from nemotune.converters.formats.hf_config import load_hf_config
from nemotune.converters.export import main as export_main

FIXTURES = Path(__file__).parent / "fixtures"
DIM, ALPHA = 8, 16.0


def random_adapter(hf, targets=tuple(adapter_io.TARGETS), seed=0, layer_selection=None, variant="nemo"):
    config = {"dim": DIM, "alpha": ALPHA, "dropout": 0.0, "target_modules": list(targets), "variant": variant,
              "layer_selection": layer_selection, "base_model": hf, "base_model_name_or_path": None}
    return adapter_io.random_adapter(config, seed=seed), config


@pytest.fixture(scope="module")
def adapter_dir(sharded_tiny_hf, tmp_path_factory) -> Path:
    state, config = random_adapter(load_hf_config(sharded_tiny_hf))
    return adapter_io.save_adapter(tmp_path_factory.mktemp("adapter") / "adapter", state, config)


def logits(model_dir_or_model, input_ids):
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


def peft_logits(base, peft_dir, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(peft_dir))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert key_warnings == [], key_warnings
    return logits(peft_model, input_ids)


def test_peft_export_matches_merge_and_changes_the_model(sharded_tiny_hf, adapter_dir, tmp_path):
    peft_dir = tmp_path / "peft"
    assert export_main(["hf-peft", "--adapter", str(adapter_dir), "--out", str(peft_dir),
                        "--base-model", str(sharded_tiny_hf)]) == 0
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == DIM and config["lora_alpha"] == ALPHA
    assert config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    from safetensors.torch import load_file

    keys = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, DIM)

    merged = tmp_path / "merged"
    assert export_main(["merge", "--adapter", str(adapter_dir), "--base", str(sharded_tiny_hf), "--out", str(merged),
                        "--no-progress"]) == 0
    input_ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    via_peft = peft_logits(sharded_tiny_hf, peft_dir, input_ids)
    via_merge = logits(merged, input_ids)
    torch.testing.assert_close(via_peft, via_merge, atol=1e-5, rtol=0)
    assert (via_peft - logits(sharded_tiny_hf, input_ids)).abs().max() > 1e-2


def test_peft_dir_loads_back_to_the_same_adapter(sharded_tiny_hf, adapter_dir, tmp_path):
    peft_dir = adapter_io.export_hf_peft(adapter_dir, tmp_path / "peft", base_model_name_or_path=str(sharded_tiny_hf))
    original, original_config = adapter_io.load_adapter(adapter_dir)
    # base config found through base_model_name_or_path; PEFT imports as canonical, q/k/v share A: fuses exactly
    state, config = adapter_io.load_adapter(peft_dir, variant="nemo")
    assert config["dim"] == DIM and config["alpha"] == ALPHA and config["target_modules"] == list(adapter_io.TARGETS)
    assert state.keys() == original.keys()
    for key in state:
        assert torch.equal(state[key], original[key]), key


def test_peft_adapter_with_separate_q_v_matrices_imports_exactly(sharded_tiny_hf, tmp_path):
    """A PEFT adapter trained by others (q_proj/v_proj only, independent A) becomes a fused qkv adapter (stacked)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(sharded_tiny_hf), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_dir = tmp_path / "theirs"
    peft_model.save_pretrained(str(peft_dir))
    input_ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    expected = logits(peft_model, input_ids)
    state, config = adapter_io.load_adapter(peft_dir, base_config=sharded_tiny_hf, variant="nemo", stack=True)
    assert config["target_modules"] == ["linear_qkv"] and config["dim"] == 8  # q and v A stacked: 2 x r=4 (k: B=0)
    mine = adapter_io.save_adapter(tmp_path / "mine", state, config)
    merged = adapter_io.merge_adapter(sharded_tiny_hf, mine, tmp_path / "merged", progress=False)
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)


def assert_nemo_matches_fixture(nemo_path, fixture: str, state) -> None:
    """A .nemo LoRA's members, keys, shapes and YAML against a fixture written from NeMo's documented
    layout (not from our writer), and its tensors against the adapter it was exported from."""
    expected = json.loads((FIXTURES / f"{fixture}.json").read_text())
    expected_config = yaml.safe_load((FIXTURES / f"{fixture}_config.yaml").read_text())
    with tarfile.open(nemo_path) as archive:
        members = sorted(m.name.removeprefix("./") for m in archive.getmembers() if m.isfile())
    assert members == sorted(expected["archive_members"])
    weights, config = adapter_io.read_nemo_lora(nemo_path)
    assert {k: list(v.shape) for k, v in weights.items()} == expected["keys"]
    for key, value in expected_config.items():
        assert config[key] == value, key
    for key, tensor in state.items():
        assert torch.equal(weights["model." + key], tensor)


def test_nemo_lora_layout_matches_nemo_fixture(adapter_dir, tmp_path, caplog):
    out = tmp_path / "lora.nemo"
    with caplog.at_level(logging.WARNING, logger="nemotune.converters"):
        assert export_main(["nemo", "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert "only the qkv adapter" in caplog.text
    state, _ = adapter_io.load_adapter(adapter_dir)
    assert_nemo_matches_fixture(out, "nemo_lora_tiny", state)


def test_bad_adapter_reports_every_problem(sharded_tiny_hf, tmp_path):
    state, config = random_adapter(load_hf_config(sharded_tiny_hf), targets=("linear_qkv", "linear_fc2"))
    del state[adapter_io.adapter_key(1, "linear_fc2", "linear_in")]
    state[adapter_io.adapter_key(0, "linear_qkv", "linear_out")] = torch.zeros(96, DIM)
    with pytest.raises(adapter_io.AdapterError) as info:
        adapter_io.save_adapter(tmp_path / "bad", state, config)
    message = str(info.value)
    assert "missing decoder.layers.1.mlp.adapter_layer.lora_4htoh_adapter.linear_in.weight" in message
    assert "lora_kqv_adapter.linear_out.weight: shape [96, 8], expected [128, 8]" in message
    assert not (tmp_path / "bad").exists()
