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


# ---- the training checkpoint's adapter dir is an HF PEFT adapter; the template travels with every export ------

def tiny_tokenizer():
    from transformers import AutoTokenizer

    from nemotune.data_prep.tokenizer import tiny_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def prep_template_sha256(prep_dir: Path) -> str:
    """The chat template fingerprint prep recorded for the data it wrote."""
    return json.loads((prep_dir / "manifest.json").read_text())["tokenizer"]["chat_template_sha256"]


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("variant", ["canonical", "nemo"])
def test_adapter_dir_loads_in_peft_with_the_logits_megatron_gives(sharded_tiny_hf, sharded_tiny_mcore, tmp_path,
                                                                   variant):
    """What training writes as <checkpoint>/adapter: peft.PeftModel.from_pretrained reads it as is (no key
    warnings), transformers + PEFT give Megatron + LoRA's logits, and nemotune reads back the very tensors."""
    from peft import LoraConfig

    from nemotune.converters.checkpoint import verify

    state, config = random_adapter(load_hf_config(sharded_tiny_hf), variant=variant, layer_selection=[1, 2])
    adapter = adapter_io.save_adapter(tmp_path / "step0000004" / "adapter", state,
                                      {**config, "base_model_name_or_path": str(sharded_tiny_hf)},
                                      tokenizer=tiny_tokenizer())
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert (written["peft_type"], written["task_type"], written["r"], written["lora_alpha"]) == \
        ("LORA", "CAUSAL_LM", DIM, ALPHA)
    assert written["layers_to_transform"] == [0, 1] and written["base_model_name_or_path"] == str(sharded_tiny_hf)
    # PEFT's own schema: every key is a LoraConfig field, and LoraConfig writes back what we wrote
    peft_dict = LoraConfig.from_pretrained(str(adapter)).to_dict()
    for key, value in written.items():
        expected = set(value) if key == "target_modules" else value
        got = set(peft_dict[key]) if key == "target_modules" else peft_dict[key]
        assert got == expected, key
    ours = json.loads((adapter / "nemotune_adapter.json").read_text())
    assert ours["variant"] == variant and ours["target_modules"] == list(adapter_io.TARGETS)
    assert ours["layer_selection"] == [1, 2] and ours["base_model"]["hidden_size"] == 64
    assert (adapter / "adapter_weights.safetensors").is_file() == (variant == "nemo")

    input_ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(2))
    served = peft_logits(sharded_tiny_hf, adapter, input_ids)
    assert (served - logits(sharded_tiny_hf, input_ids)).abs().max() > 1e-2  # the adapter is in effect
    assert verify(sharded_tiny_hf, sharded_tiny_mcore, adapter=adapter, peft_dir=adapter) <= 1e-5
    loaded, loaded_config = adapter_io.load_adapter(adapter.parent)  # the checkpoint dir names its adapter
    assert loaded_config["variant"] == variant and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_adapter_dir_of_the_older_layout_still_loads(sharded_tiny_hf, tmp_path):
    """Adapter dirs written before adapter/ became PEFT: nemotune's schema in adapter_config.json."""
    from safetensors.torch import save_file

    state, config = random_adapter(load_hf_config(sharded_tiny_hf), seed=5)
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, str(old / "adapter_weights.safetensors"))
    (old / "adapter_config.json").write_text(json.dumps(config))
    loaded, loaded_config = adapter_io.load_adapter(old)
    assert loaded_config["dim"] == DIM and all(torch.equal(loaded[k], state[k]) for k in state)


def test_every_adapter_export_carries_the_template_prep_used(tiny_assets, tmp_path):
    """The adapter dir, HF PEFT, the LoRA .nemo and the merged model all hold the chat template prep formatted
    the data with (its sha256 in the prep manifest), verbatim."""
    tokenizer = tiny_tokenizer()
    template = tokenizer.chat_template
    assert sha256_text(template) == prep_template_sha256(tiny_assets["prep"])
    state, config = random_adapter(load_hf_config(tiny_assets["base"]), variant="canonical")
    adapter = adapter_io.save_adapter(tmp_path / "adapter", state, config, tokenizer=tokenizer)
    assert (adapter / "chat_template.jinja").read_text() == template and (adapter / "tokenizer.json").is_file()

    assert export_main(["hf-peft", "--adapter", str(adapter), "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "chat_template.jinja").read_text() == template
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "peft")).chat_template == template

    assert export_main(["nemo", "--adapter", str(adapter), "--out", str(tmp_path / "lora.nemo")]) == 0
    _, nemo_config = adapter_io.read_nemo_lora(tmp_path / "lora.nemo")
    assert nemo_config["tokenizer"]["chat_template"] == template and nemo_config["data"]["chat"] is True
    assert nemo_config["data"]["chat_prompt_tokens"]["end_of_turn"] == "<|eot_id|>"
    assert nemo_config["tokenizer"]["type"] == "nemo:tokenizer"
    with tarfile.open(tmp_path / "lora.nemo") as archive:
        members = {m.name.removeprefix("./") for m in archive.getmembers() if m.isfile()}
    assert {"tokenizer/tokenizer.json", "tokenizer/chat_template.jinja", "model_weights.ckpt"} <= members

    assert export_main(["merge", "--adapter", str(adapter), "--base", str(tiny_assets["base"]),
                        "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == template

    # an adapter without tokenizer files takes its checkpoint's hf/ (where training saves the tokenizer)
    bare = adapter_io.save_adapter(tmp_path / "ckpt" / "adapter", state, config)
    tokenizer.save_pretrained(str(tmp_path / "ckpt" / "hf"))
    assert export_main(["hf-peft", "--adapter", str(bare), "--out", str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft2" / "chat_template.jinja").read_text() == template


def test_full_model_exports_hf_and_nemo(tiny_assets, tmp_path):
    """export hf: sharded safetensors + config + generation_config + tokenizer + chat template, transformers'
    logits == Megatron's; export nemo: NeMo's SFT keys and the template, and our nemo-to-hf gives the same
    tensors bit for bit."""
    from safetensors.torch import load_file

    from nemotune.converters.checkpoint import verify
    from nemotune.converters.convert import main as convert_main

    template = tiny_tokenizer().chat_template
    hf_out = tmp_path / "hf"
    assert export_main(["hf", "--checkpoint", str(tiny_assets["mcore"]), "--out", str(hf_out),
                        "--max-shard-size", "200KB", "--no-progress"]) == 0
    assert len(list(hf_out.glob("model-*.safetensors"))) > 1 and (hf_out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf_out / name).is_file(), name
    assert (hf_out / "chat_template.jinja").read_text() == template
    assert sha256_text(template) == prep_template_sha256(tiny_assets["prep"])
    generation = json.loads((hf_out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 4)  # <|begin_of_text|>, <|eot_id|>
    assert verify(hf_out, tiny_assets["mcore"]) <= 1e-5

    nemo = tmp_path / "sft.nemo"
    assert export_main(["nemo", "--checkpoint", str(tiny_assets["mcore"]), "--out", str(nemo)]) == 0
    with tarfile.open(nemo) as archive:
        members = {m.name.removeprefix("./") for m in archive.getmembers() if m.isfile()}
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
    assert {"hf/tokenizer.json", "hf/chat_template.jinja", "hf/config.json", "model_weights/.metadata"} <= members
    assert (config["mcore_gpt"], config["tensor_model_parallel_size"], config["pipeline_model_parallel_size"]) == \
        (True, 1, 1)
    assert config["data"]["chat"] is True and config["data"]["chat_prompt_tokens"]["turn_start"] == \
        "<|start_header_id|>"
    assert config["tokenizer"]["chat_template"] == template and config["tokenizer"]["type"] == "nemo:hf"
    back = tmp_path / "back"
    assert convert_main(["nemo-to-hf", "--nemo", str(nemo), "--out", str(back), "--no-progress"]) == 0
    ours = load_file(str(back / "model.safetensors"))
    exported = {}
    for shard in hf_out.glob("model-*.safetensors"):
        exported.update(load_file(str(shard)))
    assert ours.keys() == exported.keys()
    assert all(torch.equal(ours[k], exported[k]) for k in ours)
    assert (back / "chat_template.jinja").read_text() == template
