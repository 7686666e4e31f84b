"""Foundation: model builder, CPU megatron, config composition + validation, multi-rank parity."""
import json

import pytest
import torch

from nemotune.recipes.engine import megatron_cpu
from nemotune.recipes.engine.config import ConfigError, compose, experiment_names, validate
from nemotune.converters.formats.hf_config import ModelConfigError, load_hf_config
from nemotune.recipes.engine.model import build_gpt_model, transformer_config_from_hf

from conftest import REPO, run_torchrun


def test_transformer_config_matches_hf_fields(tiny_hf_config):
    hf = load_hf_config(tiny_hf_config)
    cfg = transformer_config_from_hf(hf)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 4)
    assert cfg.num_query_groups == hf["num_key_value_heads"] == 2
    assert cfg.kv_channels == hf["head_dim"] == 16
    assert cfg.ffn_hidden_size == hf["intermediate_size"] == 176
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == hf["rms_norm_eps"]
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.params_dtype == torch.float32  # CPU
    assert cfg.init_method_std == hf["initializer_range"]


def test_rope_llama3_scaling_matches_transformers(tiny_hf_config):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nemotune.recipes.engine.model import llama3_inv_freq

    hf = load_hf_config(tiny_hf_config)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**tiny_hf_config), "cpu")
    torch.testing.assert_close(llama3_inv_freq(hf), expected, rtol=0, atol=0)


def test_nano_8b_on_meta_device_has_8_03b_parameters():
    cfg = compose("lora_sft", ["model=nemotron_nano_8b"])
    from omegaconf import OmegaConf

    model = build_gpt_model(OmegaConf.to_container(cfg.model.hf_config), device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == 8_030_261_248
    assert f"{total / 1e9:.2f}B" == "8.03B"
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tied_embeddings_drop_the_output_layer(tiny_hf_config):
    model = build_gpt_model({**tiny_hf_config, "tie_word_embeddings": True}, device="meta")
    names = [n for n, _ in model.named_parameters()]
    assert "output_layer.weight" not in names and "embedding.word_embeddings.weight" in names


def test_unsupported_architecture_is_refused(tiny_hf_config):
    with pytest.raises(ModelConfigError, match="unsupported architecture"):
        load_hf_config({**tiny_hf_config, "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas"})


def test_cpu_adaptation_redirects_cuda_assumptions():
    assert megatron_cpu.enable_cpu_megatron() is True and megatron_cpu.enable_cpu_megatron() is True
    assert torch.cuda.current_device() == "cpu"
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert clip_grads.torch.tensor([1.0], device="cuda").device.type == "cpu"
    with megatron_cpu._cuda_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    assert torch.ones(2).cuda().device.type == "cpu"


@pytest.mark.slow
def test_forward_loss_is_the_same_for_tp1_tp2_tp2sp_pp2(tmp_path):
    out = tmp_path / "losses.json"
    run_torchrun(REPO / "tests" / "dist" / "forward_parity.py", out)
    losses = json.loads(out.read_text())
    assert set(losses) == {"tp1", "tp2", "tp2_sp", "pp2"}
    for layout, loss in losses.items():
        assert abs(loss - losses["tp1"]) <= 1e-5, (layout, losses)
    assert 5.0 < losses["tp1"] < 9.0  # ~ln(1024) for random weights: a real loss, not a constant


def test_every_experiment_composes_and_validates():
    names = experiment_names()
    assert len(names) >= 3
    for name in names:
        cfg = compose("lora_sft", [f"experiment={name}"])
        validate(cfg, check_files=False)


def test_validate_reports_every_problem_at_once():
    cfg = compose("lora_sft", ["parallel.tensor_model_parallel_size=3", "parallel.pipeline_model_parallel_size=3",
                               "trainer.global_batch_size=7", "trainer.micro_batch_size=2",
                               "model.checkpoint=/nonexistent/ckpt"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    for key in ("parallel.tensor_model_parallel_size=3", "parallel.pipeline_model_parallel_size=3",
                "trainer.micro_batch_size=2", "model.checkpoint=/nonexistent/ckpt"):
        assert key in text, text
    assert len(err.value.problems) >= 5


def test_sequence_parallel_without_tp_is_rejected():
    cfg = compose("lora_sft", ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="sequence_parallel=true: needs parallel.tensor_model_parallel_size"):
        validate(cfg, check_files=False)


@pytest.mark.parametrize("override, needle", [
    ("trainer.no_such_key=1", "no_such_key"),
    ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size=3"),
    ("model.checkpoint=/nonexistent/base", "model.checkpoint=/nonexistent/base"),
])
def test_bad_input_exits_nonzero_before_any_process_group(override, needle, capsys):
    from nemotune.recipes.lora_sft import main

    code = main([override])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_cli_lists_every_verb(capsys):
    from nemotune.recipes.cli import VERBS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("prep", "convert", "train", "export", "eval", "launch", "demo"):
        assert verb in VERBS and verb in out
    assert main(["nope"]) == 2


def test_tiny_model_config_is_what_the_tiny_writer_writes(tmp_path):
    from omegaconf import OmegaConf

    from nemotune.converters.tiny_model import write_tiny_llama

    written = load_hf_config(write_tiny_llama(tmp_path / "tiny", copy_tokenizer=False))
    declared = load_hf_config(OmegaConf.to_container(compose("lora_sft").model.hf_config))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_scaling", "tie_word_embeddings"):
        assert written[key] == declared[key], key
