"""LoRA on megatron layers, one process: targets, exact parameter counts, zero-B identity, merged-weight
equivalence, freezing, state-dict round trip and clear errors. Multi-rank layouts: tests/test_lora_dist.py."""
import pytest
import torch

from nemotune.recipes.engine import lora
from nemotune.recipes.engine.config import LoraConfig
from nemotune.recipes.engine.lora import apply_lora, resolve_targets

NANO_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192))
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_resolve_targets_accepts_megatron_names_hf_aliases_and_all_linear():
    assert resolve_targets(QKVO) == ["linear_qkv", "linear_proj"]
    assert resolve_targets(["down_proj", "gate_proj", "linear_qkv"]) == ["linear_qkv", "linear_fc1", "linear_fc2"]
    assert resolve_targets(["all-linear"]) == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    with pytest.raises(ValueError, match=r"unknown LoRA target_modules \['qkv_proj'\]"):
        resolve_targets(["q_proj", "qkv_proj"])


@pytest.mark.parametrize("variant, targets, expected", [
    ("canonical", QKVO, 6_815_744),           # = HF PEFT r=8 on q,k,v,o of Llama-3.1-8B
    ("canonical", ["all-linear"], 20_971_520),  # = HF PEFT r=8 on all seven projections
    ("nemo", QKVO, 4_718_592),                # fused: one A shared by q,k,v
    ("nemo", ["all-linear"], 17_825_792),
])
def test_nano_8b_parameter_counts_on_meta(variant, targets, expected):
    cfg = LoraConfig(dim=8, alpha=16, target_modules=targets, variant=variant)
    assert lora.count_lora_parameters(NANO_8B, cfg) == expected


def _tiny_model(hf, seed=0):
    from nemotune.recipes.engine.model import build_gpt_model

    torch.manual_seed(seed)
    return build_gpt_model(hf)


def _batch(hf, seq=12):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, hf["vocab_size"], (2, seq), generator=gen)
    return ids, torch.arange(seq).expand(2, seq)


def _randomize_adapter(model, scale=0.1):
    gen = torch.Generator().manual_seed(11)
    full = {k: torch.randn(v.shape, generator=gen) * scale for k, v in lora.adapter_state_dict(model).items()}
    lora.load_adapter_state(model, full)
    return full


@pytest.mark.parametrize("variant", lora.VARIANTS)
def test_zero_b_is_the_base_model_and_only_adapters_train(tiny_hf_config, variant):
    model = _tiny_model(tiny_hf_config)
    ids, pos = _batch(tiny_hf_config)
    with torch.no_grad():
        base_logits = model(ids, pos, None)
    summary = apply_lora(model, LoraConfig(dim=4, alpha=8, variant=variant), seed=3)
    state = lora.adapter_state_dict(model)
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("linear_in.weight"))
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.endswith("linear_out.weight"))
    logits = model(ids, pos, None)
    torch.testing.assert_close(logits, base_logits, rtol=0, atol=0)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_layer." in n for n in trainable)
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.layer_numbers == [1, 2]
    logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable
    # with B = 0 only B receives gradient (the usual LoRA start)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "linear_out" in n)
    assert all(g.abs().sum() == 0 for n, g in grads.items() if "linear_in" in n)


def _merged_delta(state, layer, target, variant, hf):
    """The dense update B @ A of one target in linear_<target>'s TP=1 row layout (scale not applied)."""
    parent = "self_attention" if target in ("linear_qkv", "linear_proj") else "mlp"
    adapter = lora._adapter_name(target, variant)

    def ba(name):
        prefix = f"decoder.layers.{layer}.{parent}.adapter_layer.{name}."
        return state[prefix + "linear_out.weight"] @ state[prefix + "linear_in.weight"]

    if adapter == "lora_unfused_kqv_adapter":  # rows of linear_qkv: [q heads, k, v] per query group
        groups, hidden = hf["num_key_value_heads"], hf["hidden_size"]
        q, k, v = (ba(f"{adapter}.{p}_adapter").reshape(groups, -1, hidden) for p in "qkv")
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)
    if adapter == "lora_unfused_hto4h_adapter":  # rows of linear_fc1: cat(gate, up)
        return torch.cat([ba(f"{adapter}.gate_adapter"), ba(f"{adapter}.up_adapter")])
    return ba(adapter)


@pytest.mark.parametrize("variant", lora.VARIANTS)
def test_lora_forward_equals_merged_weights(tiny_hf_config, variant):
    cfg = LoraConfig(dim=4, alpha=8, variant=variant)
    model = _tiny_model(tiny_hf_config)
    base_state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    apply_lora(model, cfg)
    adapter = _randomize_adapter(model)
    ids, pos = _batch(tiny_hf_config)

    # one layer, explicitly: linear_qkv(x) == x @ (W + scale * delta).T
    x = torch.randn(5, 2, tiny_hf_config["hidden_size"])
    qkv = model.decoder.layers[1].self_attention.linear_qkv
    merged_w = qkv.weight + cfg.scale * _merged_delta(adapter, 1, "linear_qkv", variant, tiny_hf_config)
    torch.testing.assert_close(qkv(x)[0], x @ merged_w.T, rtol=1e-5, atol=1e-5)

    # the whole model: every target of every layer merged into a plain base model
    merged = dict(base_state)
    for layer in range(tiny_hf_config["num_hidden_layers"]):
        for target in lora.TARGETS:
            parent = "self_attention" if target in ("linear_qkv", "linear_proj") else "mlp"
            key = f"decoder.layers.{layer}.{parent}.{target}.weight"
            merged[key] = base_state[key] + cfg.scale * _merged_delta(adapter, layer, target, variant,
                                                                      tiny_hf_config)
    plain = _tiny_model(tiny_hf_config, seed=1)
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos, None), plain(ids, pos, None), rtol=1e-5, atol=1e-5)


def test_layer_selection_and_alpha_scale(tiny_hf_config):
    model = _tiny_model(tiny_hf_config)
    summary = apply_lora(model, LoraConfig(dim=2, alpha=6, target_modules=["o_proj"], layer_selection=[2]))
    assert summary.targets == ["linear_proj"] and summary.layer_numbers == [2]
    assert sorted(lora.adapter_state_dict(model)) == [
        "decoder.layers.1.self_attention.adapter_layer.lora_dense_attention_adapter.linear_in.weight",
        "decoder.layers.1.self_attention.adapter_layer.lora_dense_attention_adapter.linear_out.weight"]
    assert model.decoder.layers[1].self_attention.adapter_layer.lora_dense_attention_adapter.scale == 3.0
    with pytest.raises(ValueError, match="layer numbers are 1-based, 1..2"):
        apply_lora(_tiny_model(tiny_hf_config), LoraConfig(layer_selection=[0, 1]))
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


def test_invalid_config_reports_every_problem(tiny_hf_config):
    with pytest.raises(ValueError) as err:
        apply_lora(_tiny_model(tiny_hf_config), LoraConfig(dim=0, variant="fused", init_method_a="normal",
                                                           target_modules=["qkv"]))
    for text in ("variant='fused'", "init_method_a='normal'", "dim=0", "['qkv']"):
        assert text in str(err.value)


def test_seeded_init_and_xavier(tiny_hf_config):
    def a_weights(cfg, seed):
        model = _tiny_model(tiny_hf_config)
        apply_lora(model, cfg, seed=seed)
        return {k: v for k, v in lora.adapter_state_dict(model).items() if "linear_in" in k}

    first, again = a_weights(LoraConfig(), 1), a_weights(LoraConfig(), 1)
    other, xavier = a_weights(LoraConfig(), 2), a_weights(LoraConfig(init_method_a="xavier"), 1)
    key = next(iter(first))
    assert torch.equal(first[key], again[key]) and not torch.equal(first[key], other[key])
    bound = (6 / sum(xavier[key].shape)) ** 0.5
    assert xavier[key].abs().max() <= bound and not torch.equal(first[key], xavier[key])


def test_restore_round_trip_and_shape_mismatch(tiny_hf_config, capsys):
    model = _tiny_model(tiny_hf_config)
    apply_lora(model, LoraConfig(dim=4))
    saved = _randomize_adapter(model)
    gathered = lora.gather_adapter(model)
    assert all(torch.equal(saved[k], gathered[k]) for k in saved) and sorted(saved) == sorted(gathered)
    trainable, total = lora.print_trainable(model)
    assert capsys.readouterr().out.strip() == \
        f"trainable {trainable:,} / total {total:,} ({100 * trainable / total:.4f}%)"

    other = _tiny_model(tiny_hf_config)
    apply_lora(other, LoraConfig(dim=8))
    with pytest.raises(ValueError, match=r"lora_dense_attention_adapter\.linear_in\.weight: the adapter's tensor "
                                         r"has shape \(4, 64\) but this model expects \(8, 64\)"):
        lora.load_adapter_state(other, saved)
    fused = _tiny_model(tiny_hf_config)
    apply_lora(fused, LoraConfig(dim=4, variant="nemo"))
    with pytest.raises(ValueError, match="lora_unfused_kqv_adapter.q_adapter.linear_in.weight: this model has no "
                                         "such adapter"):
        lora.load_adapter_state(fused, saved)
