"""Nemotron-H on megatron-core's hybrid model, on CPU: the reference Mamba-2 kernels against transformers' own
PyTorch path and a plain recurrence, the HF <-> Megatron conversion (bit-exact both ways, logits within 1e-4
of NemotronHForCausalLM in fp32), training through the reference kernels, the Nano 9B v2 parameter count, and
the refusals (MoE, unsupported activations, packed documents)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402
from transformers.models.nemotron_h import modeling_nemotron_h as hf_nh  # noqa: E402

from nemotune.converters.formats import mapping_nemotron_h as mh  # noqa: E402
from nemotune.recipes.engine import mamba_cpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, hidden_size=32, hybrid_override_pattern="M*M-M", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=4,
            mamba_head_dim=8, n_groups=2, chunk_size=4, layer_norm_epsilon=1e-5)


def _sequential_scan(x, dt, A, B, C, D):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;  y_t = C_t h_t + D x_t, one step at a time (ground truth)."""
    b, length, h, p = x.shape
    rep = h // B.shape[2]
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), state


def _scan_inputs(seed=0, b=2, length=13, h=4, p=3, g=2, n=5):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, length, h, p), dt=r(b, length, h), A=-torch.rand(h, generator=gen) * 2 - 0.1,
                B=r(b, length, g, n), C=r(b, length, g, n), D=r(h), dt_bias=r(h))


def test_reference_scan_matches_a_plain_recurrence_and_transformers():
    i = _scan_inputs()
    dt = torch.nn.functional.softplus(i["dt"] + i["dt_bias"])
    want, want_state = _sequential_scan(*(t.double() for t in (i["x"], dt, i["A"], i["B"], i["C"], i["D"])))
    for chunk in (4, 5, 64):  # padded last chunk, several chunks, one chunk
        y, state = mamba_cpu.mamba_chunk_scan_combined(
            i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, D=i["D"], dt_bias=i["dt_bias"], dt_softplus=True,
            return_final_states=True)
        assert (y.double() - want).abs().max() < 1e-4
        assert (state.double() - want_state).abs().max() < 1e-4
        hf_y = hf_nh.mamba2_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, D=i["D"],
                                       dt_bias=i["dt_bias"], dt_softplus=True)
        assert (y - hf_y).abs().max() < 1e-5
    # continuing from a state: the second half started from the first half's final state
    half = 6
    _, mid = mamba_cpu.mamba_chunk_scan_combined(
        *(i[k][:, :half] for k in ("x", "dt")), i["A"], *(i[k][:, :half] for k in ("B", "C")), 4, D=i["D"],
        dt_bias=i["dt_bias"], dt_softplus=True, return_final_states=True)
    tail = mamba_cpu.mamba_chunk_scan_combined(
        *(i[k][:, half:] for k in ("x", "dt")), i["A"], *(i[k][:, half:] for k in ("B", "C")), 4, D=i["D"],
        dt_bias=i["dt_bias"], dt_softplus=True, initial_states=mid)
    assert (tail.double() - want[:, half:]).abs().max() < 1e-4


def test_seq_idx_resets_conv_and_scan_state_per_document():
    torch.manual_seed(0)
    heads, headdim, groups, state = 4, 3, 2, 5
    dim = heads * headdim
    conv_w, conv_b = torch.randn(dim + 2 * groups * state, 4), torch.randn(dim + 2 * groups * state)
    zxbcdt = torch.randn(1, 14, 2 * dim + 2 * groups * state + heads)
    args = (conv_w, conv_b, torch.randn(heads), -torch.rand(heads) - 0.1, torch.randn(heads), 4)
    kw = dict(headdim=headdim, ngroups=groups, norm_before_gate=False)
    seq_idx = torch.tensor([[0] * 5 + [1] * 9], dtype=torch.int32)
    packed = mamba_cpu.mamba_split_conv1d_scan_combined(zxbcdt, *args, seq_idx=seq_idx, **kw)
    alone = torch.cat([mamba_cpu.mamba_split_conv1d_scan_combined(zxbcdt[:, s:e], *args, **kw)
                       for s, e in ((0, 5), (5, 14))], dim=1)
    joined = mamba_cpu.mamba_split_conv1d_scan_combined(zxbcdt, *args, **kw)
    assert torch.equal(packed, alone)
    assert (joined[:, 5:] - alone[:, 5:]).abs().max() > 1e-3  # without the reset the second document differs


def _tiny_hf(seed=0, **overrides):
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # weights large enough that every mixer moves the logits
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias")) or "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif param.dim() > 1:
                param.normal_(0.0, 0.25)
    return model


def _unclamped_dt(hf_model):
    """transformers' mixer floors softplus(dt) at config.time_step_min (0.001) instead of using the config's
    time_step_limit (0, inf); megatron-core's mixer (what trained Nemotron-H) applies no floor. Give
    transformers the config's own limit so both compute the same function."""
    for layer in hf_model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = tuple(hf_model.config.time_step_limit)
    return hf_model


@pytest.fixture(scope="module")
def tiny_pair():
    from nemotune.recipes.engine.hybrid_model import build_hybrid_model

    hf_model = _unclamped_dt(_tiny_hf())
    hf = mh.load_nemotron_h_config(hf_model.config.to_dict())
    model = build_hybrid_model(hf, init_weights=False)
    missing, unexpected = model.load_state_dict(mh.hf_to_megatron(hf_model.state_dict(), hf), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    return hf_model, hf, model.eval()


def _logits(model, ids):
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return model(ids, positions, None)


def test_megatron_hybrid_model_matches_transformers_and_converts_back_exactly(tiny_pair):
    hf_model, hf, model = tiny_pair
    assert [type(layer).__name__ for layer in model.decoder.layers] == [
        "MambaLayer", "TransformerLayer", "MambaLayer", "MLPLayer", "MambaLayer"]
    ids = torch.randint(0, TINY["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(ids).logits
        got = _logits(model, ids)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| megatron hybrid vs transformers (fp32): {diff:.3e}")
    assert diff <= 1e-4
    assert want.std() > 0.5  # the comparison is not of near-constant logits
    back = mh.megatron_to_hf(model.state_dict(), hf)
    ref = hf_model.state_dict()
    assert sorted(back) == sorted(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    # NVIDIA's own checkpoints name the base model `backbone.`: read the same
    backbone = {k.replace("model.", "backbone.", 1): v for k, v in ref.items()}
    assert all(torch.equal(a, b) for a, b in zip(mh.hf_to_megatron(backbone, hf).values(),
                                                 mh.hf_to_megatron(ref, hf).values()))
    # a mixer that does not run would leave the logits unchanged: perturbing one moves them
    with torch.no_grad():
        model.decoder.layers[2].mixer.A_log.add_(0.5)
        moved = (_logits(model, ids) - want).abs().max().item()
        model.decoder.layers[2].mixer.A_log.sub_(0.5)
    assert moved > 1e-3


def test_training_through_the_reference_kernels_lowers_the_loss(tiny_pair):
    from nemotune.recipes.engine.hybrid_model import build_hybrid_model

    _, hf, base = tiny_pair
    model = build_hybrid_model(hf, init_weights=False)
    model.load_state_dict(base.state_dict())
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(ids, -1, dims=1)
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        logits = _logits(model, ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optim.zero_grad()
        loss.backward()
        for name in ("in_proj.weight", "A_log", "dt_bias", "conv1d.weight", "D"):
            grad = dict(model.decoder.layers[0].mixer.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_packed_documents_are_refused_not_run_across_documents(tiny_pair):
    from nemotune.recipes.engine.batches import DocumentMask
    from nemotune.recipes.engine.hybrid_model import PackedSequencesRefused

    _, _, model = tiny_pair
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(PackedSequencesRefused, match="state across the documents"):
        model(ids, torch.arange(8)[None], DocumentMask([[3, 5]], 8))


def test_nano_9b_v2_shapes_give_the_published_parameter_count():
    from nemotune.recipes.engine.hybrid_model import build_hybrid_model

    hf_config = yaml.safe_load((REPO / "conf/model/nemotron_nano_9b_v2.yaml").read_text())["hf_config"]
    model = build_hybrid_model(hf_config, device="meta")
    count = sum(p.numel() for p in model.parameters())
    kinds = [type(layer).__name__ for layer in model.decoder.layers]
    assert (kinds.count("MambaLayer"), kinds.count("TransformerLayer"), kinds.count("MLPLayer")) == (27, 4, 25)
    with torch.device("meta"):
        hf_model = NemotronHForCausalLM(NemotronHConfig(**{k: v for k, v in hf_config.items()
                                                           if k not in ("architectures", "num_hidden_layers")}))
    assert count == sum(p.numel() for p in hf_model.parameters()) == 8_888_227_328  # "8.89B"
    names = {n for n, _ in model.named_parameters()}
    assert names == {m for m, _ in mh.name_table(mh.load_nemotron_h_config(hf_config))}


@pytest.mark.parametrize("change, needle", [
    (dict(hybrid_override_pattern="M*ME"), "MoE layers"),
    (dict(hybrid_override_pattern="M*X"), "unknown symbols ['X']"),
    (dict(num_hidden_layers=7), "num_hidden_layers 7 but hybrid_override_pattern has 5"),
    (dict(mlp_hidden_act="silu"), "mlp_hidden_act 'silu'"),
    (dict(mamba_num_heads=5), "not a multiple of n_groups"),
    (dict(use_bias=True), "use_bias=true"),
    (dict(hybrid_override_pattern=None, layers_block_type=None), "neither hybrid_override_pattern"),
], ids=["moe", "symbol", "layers", "activation", "groups", "bias", "no-pattern"])
def test_unsupported_configs_are_refused_naming_the_field(change, needle):
    with pytest.raises(mh.NemotronHConfigError, match=None) as err:
        mh.load_nemotron_h_config({**TINY, **change}, origin="config.json")
    assert needle in str(err.value) and str(err.value).startswith("config.json: ")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nemotron_h") / "hf"
    _tiny_hf(seed=3).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def converted(tiny_hf_dir):
    from conftest import run_module

    mcore = tiny_hf_dir.parent / "mcore"
    run_module("nemotune.converters.convert", "hf-to-megatron", "--hf", tiny_hf_dir, "--out", mcore,
               "--no-progress")
    return mcore


def test_convert_cli_round_trip_and_verify(tiny_hf_dir, converted, tmp_path):
    from safetensors.torch import load_file

    from conftest import run_module

    mcore, back = converted, tmp_path / "back"
    result = run_module("nemotune.converters.convert", "verify", "--hf", tiny_hf_dir, "--ckpt", mcore,
                        "--tolerance", "1e-4", "--seq-len", "24")
    print(result.stdout.strip())
    assert "OK" in result.stdout
    run_module("nemotune.converters.convert", "megatron-to-hf", "--ckpt", mcore, "--out", back, "--no-progress")
    original, restored = load_file(str(tiny_hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)


def test_tensor_parallel_2_matches_transformers_tp1_gradients_and_lora(tiny_hf_dir, converted, tmp_path):
    import json

    from conftest import run_torchrun

    report = tmp_path / "report.json"
    run_torchrun(Path(__file__).parent / "dist" / "nemotron_h_tp.py", tiny_hf_dir, converted, report)
    result = json.loads(report.read_text())
    print(f"TP=2 vs transformers max |logit diff| {result['logit_diff']:.3e}, TP=2 vs TP=1 mixer grads "
          f"{result['grad_diff']:.3e} (norm {result['grad_norm']:.3e})")
    assert result["logit_diff"] <= 1e-4 and result["logit_diff_tp1"] <= 1e-4
    assert result["grad_norm"] > 1e-3 and result["grad_diff"] <= 1e-5
    print(f"LoRA TP=2 vs TP=1 max |logit diff| {result['lora_diff']:.3e} (LoRA moves logits by "
          f"{result['lora_effect']:.3e})")
    assert result["lora_effect"] > 1e-2 and result["lora_diff"] <= 1e-4
    # in_proj's B is sharded per z / x / B / C / dt section: gathered back in the TP=1 order
    print(f"consolidated adapter TP=2 vs TP=1 max |diff| {result['adapter_gather_diff']:.3e}")
    assert result["adapter_keys_equal"] and result["adapter_in_proj_B"] == 3 and result["adapter_gather_diff"] == 0


def test_lora_on_mamba_attention_and_mlp_trains_and_loads_in_peft_with_equal_logits(tiny_pair, tmp_path):
    peft = pytest.importorskip("peft")
    from nemotune.converters.nemotron_h import write_peft_adapter
    from nemotune.recipes.engine.hybrid_lora import DEFAULT_TARGETS, apply_hybrid_lora, peft_state_dict
    from nemotune.recipes.engine.hybrid_model import build_hybrid_model

    _, hf, base = tiny_pair
    model = build_hybrid_model(hf, init_weights=False)
    model.load_state_dict(base.state_dict())
    trainable = apply_hybrid_lora(model, dim=4, alpha=8.0, seed=7)
    assert {n.split(".adapter_layer.")[1].split(".")[0] for n in trainable} == {
        "in_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(8):
        logits = _logits(model, ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        want = _logits(model, ids)
    # the names are peft's own on NemotronHForCausalLM
    reference = peft.get_peft_model(_unclamped_dt(_tiny_hf()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS)))
    ours = peft_state_dict(model)
    assert sorted(ours) == sorted(peft.utils.get_peft_model_state_dict(reference))
    adapter = write_peft_adapter(model, tmp_path / "peft", dim=4, alpha=8.0)
    loaded = peft.PeftModel.from_pretrained(_unclamped_dt(_tiny_hf()), str(adapter)).eval()
    with torch.no_grad():
        got = loaded(ids).logits
        merged = loaded.merge_and_unload()(ids).logits
        plain = base(ids, torch.arange(16).expand(2, -1), None)
    diff, merged_diff = (got - want).abs().max().item(), (merged - want).abs().max().item()
    print(f"LoRA: megatron vs peft max |logit diff| {diff:.3e}, merged {merged_diff:.3e}")
    assert diff <= 1e-4 and merged_diff <= 1e-4
    assert (want - plain).abs().max() > 1e-2  # the adapter changed the model
    with_out_proj = build_hybrid_model(hf, init_weights=False)
    apply_hybrid_lora(with_out_proj, target_modules=["out_proj"])
    with pytest.raises(ValueError, match="has no HF PEFT export"):
        peft_state_dict(with_out_proj)


@pytest.mark.parametrize("mode, line", [("think", "/think"), ("no_think", "/no_think")])
def test_nano_v2_reasoning_switch_in_prep(mode, line):
    from nemotune.data_prep.config import SYSTEM_PROMPT_MODES
    from nemotune.data_prep.templating import apply_thinking_mode

    assert mode in SYSTEM_PROMPT_MODES
    messages = [{"role": "system", "content": "/think\nAnswer as a financial analyst."},
                {"role": "user", "content": "What is a bond?"}, {"role": "assistant", "content": "A loan."}]
    out = apply_thinking_mode(messages, mode)
    assert out[0] == {"role": "system", "content": line}  # the switch alone, as the model card's examples
    assert out[1]["content"] == "Answer as a financial analyst.\n\nWhat is a bond?"
    kept = apply_thinking_mode(messages, mode, task_prompt_placement="system")
    assert kept[0]["content"] == f"{line}\nAnswer as a financial analyst." and len(kept) == 3


# ---- nemotune train / eval on Nemotron-H ------------------------------------------------------------------------

TRAIN_STEPS = 4


@pytest.fixture(scope="module")
def nh_train_assets(tiny_assets, tmp_path_factory):
    """A tiny random NemotronHForCausalLM carrying the tiny tokenizer (so the tiny model's prepared data trains it),
    and its `nemotune convert hf-to-megatron` checkpoint."""
    import shutil

    from nemotune.converters.nemotron_h import hf_to_megatron

    root = tmp_path_factory.mktemp("nh_train")
    hf_dir = root / "hf"
    _tiny_hf(seed=11, vocab_size=1024, hybrid_override_pattern="M*M-").save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_assets["base"] / name).is_file():
            shutil.copyfile(tiny_assets["base"] / name, hf_dir / name)
    hf_to_megatron(hf_dir, root / "mcore", progress=False)
    return {"hf": hf_dir, "mcore": root / "mcore", "prep": tiny_assets["prep"], "root": root}


def _train_nh(assets, run_dir, *extra, check=True):
    from conftest import run_module

    return run_module("nemotune.recipes.lora_sft", "experiment=tiny_lora", f"model.hf_path={assets['hf']}",
                      f"model.checkpoint={assets['mcore']}", f"data.output_dir={assets['prep']}", "data.packing=false",
                      "trainer.train_split=sft", "trainer.validation_split=eval", f"trainer.sft.max_steps={TRAIN_STEPS}",
                      "trainer.sft.val_check_interval=2", "trainer.sft.limit_val_batches=1",
                      "trainer.optim.lr=2e-2", f"run.output_dir={run_dir}", *extra, check=check)


def _losses(run_dir):
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.fixture(scope="module")
def nh_trained(nh_train_assets):
    """An uninterrupted `nemotune train` LoRA run of TRAIN_STEPS steps (checkpoints at 2 and 4)."""
    run_dir = nh_train_assets["root"] / "whole"
    _train_nh(nh_train_assets, run_dir)
    return run_dir


def test_nemotune_train_lora_on_nemotron_h_learns_resumes_and_exports_a_peft_adapter(nh_train_assets, nh_trained,
                                                                                       tmp_path):
    """`nemotune train` on a tiny NemotronHForCausalLM: the loss falls, a run stopped after its step-2 checkpoint
    and rerun gives the uninterrupted run's losses, and the last checkpoint's adapter/ loads in peft on
    transformers' model with the Megatron model's logits."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from nemotune.converters.nemotron_h import model_from_checkpoint
    from nemotune.recipes.engine.hybrid_lora import apply_hybrid_lora
    from nemotune.recipes.engine.hybrid_training import peft_names

    whole, resumed = nh_trained, tmp_path / "resumed"
    _train_nh(nh_train_assets, resumed, "trainer.stop_after_steps=2")
    assert sorted(_losses(resumed)) == [1, 2]
    _train_nh(nh_train_assets, resumed)
    want, got = _losses(whole), _losses(resumed)
    print(f"Nemotron-H LoRA losses {[round(want[s], 4) for s in sorted(want)]}, resumed "
          f"{[round(got[s], 4) for s in sorted(got)]}")
    assert sorted(want) == sorted(got) == list(range(1, TRAIN_STEPS + 1))
    assert max(abs(want[s] - got[s]) for s in want) <= 1e-5
    assert want[TRAIN_STEPS] < want[1] - 0.1

    adapter = whole / "checkpoints" / f"step{TRAIN_STEPS:07d}" / "adapter"
    hf_model = _unclamped_dt(NemotronHForCausalLM.from_pretrained(str(nh_train_assets["hf"]), dtype=torch.float32))
    loaded = peft.PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    # the Megatron model with the same adapter, copied by the names the checkpoint wrote
    hf, model = model_from_checkpoint(nh_train_assets["mcore"])
    apply_hybrid_lora(model, dim=8, alpha=16.0, target_modules=loaded.peft_config["default"].target_modules)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    params = {n: p for n, p in model.named_parameters() if ".adapter_layer." in n}
    assert len(params) == len(saved) > 0
    with torch.no_grad():
        for name, param in params.items():
            (peft_name, _), = peft_names({name: param}).items()
            param.copy_(saved[peft_name])
    ids = torch.randint(0, hf["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        megatron = _logits(model.eval(), ids)
        served = loaded(ids).logits
        base = loaded.get_base_model()
        with loaded.disable_adapter():
            plain = base(ids).logits
    diff = (served - megatron).abs().max().item()
    print(f"Nemotron-H trained adapter: peft vs Megatron max |logit diff| {diff:.3e} (the adapter moves logits by "
          f"{(served - plain).abs().max().item():.3e})")
    assert diff <= 1e-4
    assert (served - plain).abs().max() > 1e-2


def test_nemotune_eval_on_nemotron_h_reports_the_trained_adapters_held_out_loss(nh_train_assets, nh_trained, tmp_path):
    """`nemotune eval` with a trained Nemotron-H adapter: transformers + peft and the Megatron model (the adapter
    restored into the hybrid LoRA) both report a lower held-out answer-token loss than the base."""
    import json

    from conftest import run_module

    adapter = nh_trained / "checkpoints" / f"step{TRAIN_STEPS:07d}" / "adapter"
    overrides = ["experiment=tiny_lora", f"model.hf_path={nh_train_assets['hf']}",
                 f"model.checkpoint={nh_train_assets['mcore']}", "data.packing=false"]
    run_module("nemotune.recipes.evaluate", f"data_dir={nh_train_assets['prep']}", f"base_model={nh_train_assets['hf']}",
               f"adapter={adapter}", f"out_dir={tmp_path / 'eval'}", "eval.split=eval", "eval.limit=2",
               "eval.max_new_tokens=2", "eval.megatron_loss=true", "eval.train_overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]")
    loss = json.loads((tmp_path / "eval" / "summary.json").read_text())["loss"]
    print("Nemotron-H held-out answer loss base -> LoRA: " + ", ".join(
        f"{engine} {loss[engine]['base']['loss']:.4f} -> {loss[engine]['lora']['loss']:.4f} "
        f"({loss[engine]['lora']['tokens']} tokens)" for engine in ("hf", "megatron")))
    for engine in ("hf", "megatron"):
        assert loss[engine]["lora"]["loss"] < loss[engine]["base"]["loss"] - 0.05
    assert loss["megatron"]["lora"]["samples"] == 48
