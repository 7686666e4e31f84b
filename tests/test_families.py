"""The supported families through the same tables, each on a tiny random model of its own transformers class:
the mapping table against the class's state dict, the builder field by field, HF -> Megatron -> HF and
HF -> .nemo -> HF bit-exact with NeMo's key names, `convert verify` against transformers, and the real
models' parameter counts on the meta device (conf/model/)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemotune.converters import checkpoint
from nemotune.converters.formats import checkpoint as checkpoint_files
from nemotune.converters.formats.hf_config import load_hf_config
from nemotune.converters.formats.mapping import FAMILY_ROWS, LlamaDims, expected_hf_shapes, family_rules
from nemotune.converters.tiny_model import TINY_FAMILIES, tiny_family_config, write_tiny_llama

FAMILIES = list(TINY_FAMILIES)
CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"

# NeMo key names (prefixed, layers stacked) each family's .nemo must hold / must not hold
NEMO_KEYS = {
    "llama": ({"model.decoder.layers.mlp.linear_fc1.layer_norm_weight", "model.output_layer.weight"}, set()),
    "llama32": ({"model.embedding.word_embeddings.weight"}, {"model.output_layer.weight"}),
    "nano4b": ({"model.decoder.layers.self_attention.linear_qkv.weight"}, set()),
    "mistral": ({"model.decoder.layers.self_attention.linear_proj.weight"}, set()),
    "qwen2": ({"model.decoder.layers.self_attention.linear_qkv.bias"}, {"model.output_layer.weight"}),
    "qwen3": ({"model.decoder.layers.self_attention.q_layernorm.weight",
               "model.decoder.layers.self_attention.k_layernorm.weight"},
              {"model.decoder.layers.self_attention.linear_qkv.bias"}),
    "nemotron": ({"model.decoder.layers.self_attention.linear_qkv.layer_norm_bias",
                  "model.decoder.layers.mlp.linear_fc1.layer_norm_bias", "model.decoder.final_layernorm.bias"},
                 {"model.decoder.layers.mlp.linear_fc1.bias"}),
}


def hf_tensors(path: Path) -> dict:
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def assert_bit_exact(a: Path, b: Path):
    sa, sb = hf_tensors(a), hf_tensors(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF dir, Megatron dir, .nemo): built once per family, on first use."""
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            hf = write_tiny_llama(root / "hf", family=family, seed=7)  # with the tiny tokenizer: training reads it
            mcore = checkpoint.hf_to_megatron(hf, root / "mcore", progress=False)
            nemo = checkpoint.hf_to_nemo(hf, root / "tiny.nemo", progress=False)
            cache[family] = hf, mcore, nemo
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_table_names_every_tensor_of_the_transformers_class(family):
    """expected_hf_shapes (what the converters read and write) is exactly the class's state dict."""
    import transformers

    config = tiny_family_config(family)
    with torch.device("meta"):
        model = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))(config)
    theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    hf = load_hf_config({**config.to_dict(), "architectures": [type(model).__name__]})
    assert expected_hf_shapes(LlamaDims.from_hf(hf)) == theirs
    # every HF name has exactly one rule, and each family's named rows are there
    rules = family_rules(LlamaDims.from_hf(hf))
    hf_names = [n for rule in rules for n in rule.hf]
    assert len(hf_names) == len(set(hf_names))
    named = {"qkv_bias": "model.layers.*.self_attn.q_proj.bias", "qk_norm": "model.layers.*.self_attn.q_norm.weight",
             "norm_bias": "model.norm.bias", "mlp_without_gate": "model.layers.*.mlp.up_proj.weight"}
    for row in FAMILY_ROWS[hf["family"]]:
        assert named[row] in hf_names, row
    assert ("model.layers.*.mlp.gate_proj.weight" in hf_names) is ("mlp_without_gate" not in FAMILY_ROWS[hf["family"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_builder_maps_each_hf_field(family):
    from nemotune.recipes.engine.model import transformer_config_from_hf

    config = tiny_family_config(family)
    hf = load_hf_config({**config.to_dict(),
                         "architectures": [type(config).__name__.replace("Config", "ForCausalLM")]})
    cfg = transformer_config_from_hf(hf)
    nemotron = family == "nemotron"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
        config.intermediate_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert cfg.kv_channels == head_dim
    assert (head_dim * config.num_attention_heads != config.hidden_size) is (family in ("mistral", "nano4b"))
    assert cfg.layernorm_epsilon == (config.norm_eps if nemotron else config.rms_norm_eps)
    assert cfg.normalization == ("LayerNorm" if nemotron else "RMSNorm")
    assert cfg.layernorm_zero_centered_gamma is nemotron
    assert cfg.gated_linear_unit is not nemotron
    x = torch.linspace(-2, 2, 9)
    expected = torch.relu(x) ** 2 if nemotron else torch.nn.functional.silu(x)
    assert torch.equal(cfg.activation_func(x), expected)
    assert cfg.add_qkv_bias is (family == "qwen2") and cfg.add_bias_linear is False
    assert cfg.qk_layernorm is (family == "qwen3")
    assert hf["partial_rotary_factor"] == (0.5 if nemotron else 1.0)
    assert hf["tie_word_embeddings"] is bool(config.tie_word_embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_conversions_are_bit_exact_and_verify_against_transformers(family, converted, tmp_path):
    from megatron.core import dist_checkpointing

    hf, mcore, nemo = converted(family)
    back = checkpoint.megatron_to_hf(mcore, tmp_path / "from_mcore", progress=False)
    assert_bit_exact(hf, back)
    back_nemo = checkpoint.megatron_to_hf(nemo, tmp_path / "from_nemo", progress=False)
    assert_bit_exact(hf, back_nemo)
    with checkpoint_files.open_megatron_checkpoint(nemo) as (_, weights, prefix, _aux):
        keys = set(dist_checkpointing.load_tensors_metadata(str(weights)))
    present, absent = NEMO_KEYS[family]
    assert prefix == "model." and present <= keys and not absent & keys, sorted(keys)
    with tarfile.open(nemo) as archive:
        nemo_cfg = yaml.safe_load(archive.extractfile("./model_config.yaml"))
    assert nemo_cfg["normalization"] == ("layernorm1p" if family == "nemotron" else "rmsnorm")
    assert nemo_cfg["activation"] == ("squared-relu" if family == "nemotron" else "fast-swiglu")
    assert nemo_cfg["qkv_bias"] is (family == "qwen2") and nemo_cfg["qk_layernorm"] is (family == "qwen3")
    diff = checkpoint.verify(hf, mcore)
    print(f"{family}: convert verify max |logit diff| {diff:.3g}")
    assert diff <= 1e-5
    # the check can fail: the same family with other weights is far off
    other = write_tiny_llama(tmp_path / "other", family=family, seed=8, copy_tokenizer=False)
    assert checkpoint.verify(other, mcore) > 1e-2


@pytest.mark.parametrize("family", ["nemotron", "qwen2", "qwen3"])
def test_nemo_without_hf_folder_rebuilds_the_family(family, converted, tmp_path):
    """A NeMo-written .nemo has no hf/ folder: model_config.yaml alone gives back the family's config."""
    import shutil

    hf, _, nemo = converted(family)
    root = tmp_path / "extracted"
    checkpoint_files.safe_extract(nemo, root)
    shutil.rmtree(root / "hf")
    out = checkpoint.megatron_to_hf(root, tmp_path / "back", progress=False)
    assert_bit_exact(hf, out)
    rebuilt, original = load_hf_config(out), load_hf_config(hf)
    for key in ("architectures", "norm", "gated_mlp", "qkv_bias", "qk_norm", "partial_rotary_factor", "head_dim",
                "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert rebuilt[key] == original[key], key


# conf/model file -> the published parameter count in billions as the Hub rounds it. The ones marked "unconfirmed" were
# not found in a public source (written from the model cards' shapes); the sources of the others are in EXACT.
PUBLISHED = {"nemotron_mini_4b": 4.19,  # unconfirmed
             "mistral_nemo_12b": 12.2, "mistral_nemo_minitron_8b": 8.41,  # the latter unconfirmed
             "openreasoning_nemotron_7b": 7.61, "qwen3_8b": 8.2, "llama32_1b": 1.24,
             "nemotron_nano_4b": 4.51}  # unconfirmed
# exact counts found in public sources (bf16 model.safetensors.index.json total_size / 2, or a quoted count)
EXACT = {
    # total_size 24,495,564,800 B: https://huggingface.co/mistralai/Mistral-Nemo-Instruct-2407/blob/main/model.safetensors.index.json
    "mistral_nemo_12b": 12_247_782_400,
    # Qwen2.5-7B-Instruct, same shapes; total_size 15,231,233,024 B:
    # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/raw/main/model.safetensors.index.json
    "openreasoning_nemotron_7b": 7_615_616_512,
    # total_size 16,381,470,720 B: https://huggingface.co/Qwen/Qwen3-8B/blob/main/model.safetensors.index.json
    "qwen3_8b": 8_190_735_360,
    # github.com/ModelCloud/GPTQModel tests/test_parameter_count.py; https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct
    "llama32_1b": 1_235_814_400,
}


def _transformers_parameter_count(raw: dict) -> int:
    """The same config through transformers' own class on the meta device (an independent count)."""
    import transformers

    architecture = raw["architectures"][0]
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    rope.update(fields.pop("rope_scaling", None) or {})
    if "partial_rotary_factor" in fields:
        rope["partial_rotary_factor"] = fields.pop("partial_rotary_factor")
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**fields, rope_parameters=rope)
    with torch.device("meta"):
        model = getattr(transformers, architecture)(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_meta_device_build_has_the_published_parameter_count(name):
    from nemotune.recipes.engine.model import build_gpt_model

    raw = yaml.safe_load((CONF_MODEL / f"{name}.yaml").read_text())["hf_config"]
    model = build_gpt_model(raw, device="meta")
    total = sum(p.numel() for p in model.parameters())
    print(f"{name}: {total:,} parameters (published {PUBLISHED[name]}B)")
    assert total == _transformers_parameter_count(raw)
    digits = len(str(PUBLISHED[name]).split(".")[1])
    assert abs(total / 1e9 - PUBLISHED[name]) <= 10 ** -digits, total
    if name in EXACT:
        assert total == EXACT[name]


@pytest.mark.parametrize("variant", ["nemo", "canonical"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_peft_export_merge_and_nemo_per_family(family, variant, converted, tmp_path):
    """A trained-looking adapter (random A and B) on every linear: Megatron + adapter equals transformers + the
    HF PEFT export (loaded by peft, no key warnings), the merged checkpoint equals PEFT, and the .nemo LoRA
    holds the adapter's keys."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemotune.converters.formats import adapters as adapter_io

    hf, mcore, _ = converted(family)
    base = load_hf_config(hf)
    config = {"dim": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(adapter_io.TARGETS),
              "variant": variant, "layer_selection": None, "base_model": base, "base_model_name_or_path": None}
    adapter = adapter_io.save_adapter(tmp_path / "adapter", adapter_io.random_adapter(config, seed=3), config)
    peft_dir = adapter_io.export_hf_peft(adapter, tmp_path / "peft")
    modules = yaml.safe_load((peft_dir / "adapter_config.json").read_text())["target_modules"]
    gate = [] if family == "nemotron" else ["gate_proj"]
    assert sorted(modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", *gate])
    diff = checkpoint.verify(hf, mcore, adapter=adapter, peft_dir=peft_dir)
    print(f"{family} {variant}: Megatron + adapter vs transformers + PEFT max |logit diff| {diff:.3g}")
    assert diff <= 1e-5

    input_ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    assert [str(w.message) for w in caught if "key" in str(w.message).lower()] == []
    merged = adapter_io.merge_adapter(hf, adapter, tmp_path / "merged", progress=False)
    with torch.no_grad():
        via_peft = peft_model(input_ids=input_ids).logits
        via_merge = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()(
            input_ids=input_ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()(input_ids=input_ids).logits
    torch.testing.assert_close(via_peft, via_merge, atol=1e-5, rtol=0)
    assert (via_peft - plain).abs().max() > 1e-2
    if variant == "canonical" and family in ("mistral", "nano4b"):
        # NeMo's unfused q adapter maps hidden -> hidden: it cannot hold a q_proj of heads * head_dim != hidden
        with pytest.raises(adapter_io.AdapterError, match="heads\\*head_dim"):
            adapter_io.export_nemo_lora(adapter, tmp_path / "lora.nemo")
        return
    nemo = adapter_io.export_nemo_lora(adapter, tmp_path / "lora.nemo")
    weights, nemo_config = adapter_io.read_nemo_lora(nemo)
    state, _ = adapter_io.load_adapter(adapter)
    assert set(weights) == {"model." + k for k in state}
    assert nemo_config["peft"]["lora_tuning"]["variant"] == variant
    assert nemo_config["activation"] == ("squared-relu" if family == "nemotron" else "fast-swiglu")


def test_nemotron_lora_refuses_gate_proj():
    from nemotune.recipes.engine.lora import resolve_targets

    assert resolve_targets(["up_proj", "down_proj"], gated=False) == ["linear_fc1", "linear_fc2"]
    with pytest.raises(ValueError, match=r"unknown LoRA target_modules \['gate_proj'\].*'up_proj'"):
        resolve_targets(["gate_proj"], gated=False)


PARITY_FAMILIES = ("mistral", "qwen2", "qwen3", "nemotron")  # Llama's layouts: tests/test_training.py


def test_tp2_and_pp2_train_with_the_tp1_losses_for_every_family(converted, tiny_assets, tmp_path):
    """One 2-rank launch: LoRA on all-linear, 3 steps per family under TP=1 (DP=2), TP=2 and PP=2."""
    import json

    from conftest import REPO, run_torchrun

    bases = [f"{family}={converted(family)[0]}:{converted(family)[1]}" for family in PARITY_FAMILIES]
    out = tmp_path / "families.json"
    run_torchrun(REPO / "tests" / "dist" / "family_parity.py", out, tiny_assets["prep"], tmp_path / "runs", *bases,
                 timeout=900)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(PARITY_FAMILIES)
    for family, layouts in results.items():
        reference = layouts["tp1"]
        assert list(reference) == ["1", "2", "3"], family
        print(family, {layout: [round(v, 6) for v in losses.values()] for layout, losses in layouts.items()})
        for layout in ("tp2", "pp2"):
            for step, loss in reference.items():
                assert abs(layouts[layout][step] - loss) <= 1e-5, (family, layout, step, layouts[layout][step], loss)
        assert reference["3"] != reference["1"]  # the adapters train


def test_gpt_model_deprecation_notice_is_dropped_and_other_warnings_pass(monkeypatch):
    """megatron-core 0.19 warns at every GPTModel build that HybridModel replaces it; nemotune keeps GPTModel
    (0.16 has no HybridModel) and drops that one notice. 0.19 is not installed here: its notice is simulated."""
    import warnings

    from nemotune.recipes.engine import megatron_cpu

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    megatron_cpu.quiet_import_warnings()
    warnings.showwarning(DeprecationWarning("GPTModel is deprecated and will be removed; use HybridModel"),
                         DeprecationWarning, "gpt_model.py", 1)
    warnings.showwarning(UserWarning("an unrelated warning"), UserWarning, "elsewhere.py", 2)
    assert shown == ["an unrelated warning"]


# each family's chat format (written for this test, in the shape of the published templates), with the special
# token that ends an assistant turn (None: the turn ends with a newline and the next header)
CHAT_TEMPLATES = {
    "qwen": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
                "{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}", "</s>"),
    "nemotron": ("{% for m in messages %}{% if m.role == 'system' %}<extra_id_0>System\n{{ m.content }}\n"
                 "{% elif m.role == 'user' %}<extra_id_1>User\n{{ m.content }}\n{% else %}<extra_id_1>Assistant\n"
                 "{{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<extra_id_1>Assistant\n"
                 "{% endif %}", None),
}


@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_the_familys_own_chat_template_drives_the_answer_mask(family):
    """No per-family code in prep: the tiny tokenizer with the family's template masks exactly each answer
    (and the special token closing it), checked by decoding."""
    from nemotune.data_prep.templating import masked_segments, render_and_mask
    from nemotune.data_prep.tokenizer import load_tokenizer, tiny_tokenizer_dir

    template, end = CHAT_TEMPLATES[family]
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir()))
    tokenizer.chat_template = template
    specials = ["<|im_start|>", "<|im_end|>"] if family == "qwen" else ["[INST]", "[/INST]", "</s>"] \
        if family == "mistral" else ["<extra_id_0>", "<extra_id_1>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    # answers end in a letter: the tiny byte-level BPE has a ".\n" token, which would straddle the end of a
    # Nemotron answer (its template closes a turn with a newline) and prep refuses such an example (MaskError)
    messages = [{"role": "user", "content": "What is a bond?"}, {"role": "assistant", "content": "A loan you hold"},
                {"role": "user", "content": "And a stock?"}, {"role": "assistant", "content": "A share of a company"}]
    if family != "mistral":
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    ids, mask, _ = render_and_mask(tokenizer, messages)
    decoded = [tokenizer.decode(run) for run in masked_segments(ids, mask)]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert decoded == [a + (end or "") for a in answers]
