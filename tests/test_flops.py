"""LoRA FLOP accounting (recipes/engine/flops.py): the Nano-8B numbers worked by hand, and the per-step figures the
trainer logs are exactly that formula over the step's real documents and its measured time."""
import numpy as np
import pytest
import torch

from nemotune.recipes.engine import flops

NANO_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=14336, vocab_size=128256)


def test_nano_8b_dense_forward_matmul_flops_per_token_by_hand():
    # one layer's matmul weights (no biases):
    qkv = 4096 * (32 + 2 * 8) * 128     # 4096 x 6144  = 25,165,824
    proj = 32 * 128 * 4096              # 4096 x 4096  = 16,777,216
    fc1 = 4096 * 2 * 14336              # gate + up    = 117,440,512
    fc2 = 14336 * 4096                  # down         = 58,720,256
    per_layer = qkv + proj + fc1 + fc2
    assert per_layer == 218_103_808
    output_layer = 4096 * 128256        # untied LM head = 525,336,576
    matmul_weights = 32 * per_layer + output_layer
    assert matmul_weights == 7_504_658_432
    # the model's 8,030,261,248 parameters less the input embedding and the 2 * 32 + 1 RMSNorm weights
    assert matmul_weights == 8_030_261_248 - 128256 * 4096 - (2 * 32 + 1) * 4096
    # forward: one multiply-add (2 FLOPs) per weight per token; the same for every token of a 4096 pack
    assert flops.matmul_params(NANO_8B) == matmul_weights
    assert flops.dense_forward_flops_per_token(NANO_8B) == 2 * 7_504_658_432 == 15_009_316_864


def test_nano_8b_causal_attention_of_one_4096_document_by_hand():
    # token i attends to i + 1 positions: 4096 * 4097 / 2 = 8,390,656 (query, key) pairs; per pair and head
    # QK^T and AV each take head_dim multiply-adds: 2 matmuls * 2 FLOPs * 128; 32 heads, 32 layers
    pairs = 4096 * 4097 // 2
    assert pairs == 8_390_656
    expected = 32 * 32 * (2 * 2 * 128) * pairs
    assert expected == 4_399_120_252_928
    assert flops.attention_forward_flops(NANO_8B, [4096]) == expected
    # documents of a pack attend only within themselves: two halves cost less than one whole
    assert flops.attention_forward_flops(NANO_8B, [2048, 2048]) == 32 * 32 * 512 * 2 * (2048 * 2049 // 2)


def test_nano_8b_lora_step_flops_and_the_h100_ceiling():
    tokens = 4096
    dense = 2 * 15_009_316_864 * tokens   # forward + activation-grad backward: 2/3 of full FT's 6N per token
    attention = 3 * 4_399_120_252_928     # forward + backward (2x) of QK^T and AV, no weights to skip
    assert flops.lora_step_flops(NANO_8B, [4096]) == dense + attention == 136_153_684_508_672
    assert dense == 2 * (6 * 7_504_658_432 * tokens) // 3
    # the ceiling: ~29,800 tokens/s/GPU at 100% MFU of an H100 (989.4 dense bf16 TFLOP/s)
    ceiling = flops.PEAK_BF16_TFLOPS["H100"] * 1e12 / (flops.lora_step_flops(NANO_8B, [4096]) / tokens)
    assert ceiling == pytest.approx(29_765, abs=1)


def test_matmul_params_are_the_models_linear_weights():
    """The formula's weights are exactly the GPTModel's linear layers + output layer (meta device)."""
    from nemotune.recipes.engine.model import build_gpt_model

    hf = dict(NANO_8B, architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=131072)
    model = build_gpt_model(hf, device="meta")
    linear = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                                "linear_fc2.weight", "output_layer.weight")))
    assert linear == flops.matmul_params(NANO_8B) == 7_504_658_432


def test_logged_tflops_and_mfu_are_the_formula_over_the_measured_step(tiny_hf_config, tmp_path):
    """One real SupervisedTrainer step (tiny model, 1 process): train/tflops_per_gpu * step_time is
    lora_step_flops over the documents of the step's packs, and MFU divides by the device peak."""
    from omegaconf import OmegaConf

    from nemotune.recipes.engine import batches
    from nemotune.recipes.engine.config import compose
    from nemotune.recipes.engine.config import LoraConfig
    from nemotune.recipes.engine.lora import apply_lora
    from nemotune.recipes.engine.builders import build_scheduler, wrap_for_training
    from nemotune.recipes.engine.model import build_gpt_model
    from nemotune.recipes.engine.trainer import SupervisedTrainer, format_step_line

    cfg = compose("lora_sft", ["experiment=tiny_lora", "trainer.global_batch_size=2", f"run.output_dir={tmp_path}",
                               "run.tensorboard=false"])
    hf = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    torch.manual_seed(0)
    model = build_gpt_model(hf, calculate_per_token_loss=True)
    apply_lora(model, LoraConfig(dim=8, alpha=16))
    chunks, optimizer = wrap_for_training(cfg, model)
    rng = np.random.default_rng(0)
    samples = []
    for doc_lengths in ([40, 70, 18], [128], [64, 64], [5, 90, 30]):
        n = sum(doc_lengths)
        starts = list(np.cumsum([0] + doc_lengths[:-1]))
        samples.append(batches.Sample(input_ids=rng.integers(0, hf["vocab_size"], n),
                                      loss_mask=(rng.random(n) > 0.3).astype(np.float32), seq_start_id=starts))
    trainer = SupervisedTrainer(cfg=cfg, model=chunks, optimizer=optimizer,
                                scheduler=build_scheduler(cfg, optimizer, 2), train_samples=samples,
                                val_samples=samples, pad_id=0, seq_length=128, hf_config=hf, run_dir=tmp_path,
                                checkpointer=None, log_metrics=False)
    trainer.peak_flops = 1e12  # a pretend device peak, so MFU is defined on the CPU
    indices = np.array([2, 0])
    m = trainer.train_step(indices)

    doc_lengths = samples[2].document_lengths + samples[0].document_lengths
    assert doc_lengths == [64, 64, 40, 70, 18]
    expected_flops = flops.lora_step_flops(hf, doc_lengths)
    assert expected_flops == 2 * 2 * flops.matmul_params(hf) * 256 + 3 * flops.attention_forward_flops(hf, doc_lengths)
    assert m["train/tflops_per_gpu"] * 1e12 * m["train/step_time"] == pytest.approx(expected_flops, rel=1e-9)
    assert m["train/tokens_per_sec_per_gpu"] * m["train/step_time"] == pytest.approx(256, rel=1e-9)
    assert m["train/mfu"] == pytest.approx(m["train/tflops_per_gpu"] * 1e12 / 1e12, rel=1e-12)
    assert np.isfinite(m["train/loss"]) and m["train/loss_tokens"] > 0
    line = format_step_line(1, 2, m)
    assert f"MFU {100 * m['train/mfu']:5.2f}%" in line and "tokens/s/GPU" in line


def _conf_model(name):
    import yaml

    from conftest import REPO

    return yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())["hf_config"]


def test_nemotron_mini_4b_plain_mlp_has_two_ffn_matrices_per_layer_by_hand():
    hf = _conf_model("nemotron_mini_4b")  # squared-ReLU MLP: up_proj, down_proj; no gate
    qkv = 3072 * (24 + 2 * 8) * 128     # 3072 x 5120 = 15,728,640
    proj = 24 * 128 * 3072              # 3072 x 3072 =  9,437,184
    fc1 = 3072 * 9216                   # up alone    = 28,311,552
    fc2 = 9216 * 3072                   # down        = 28,311,552
    per_layer = qkv + proj + fc1 + fc2
    assert per_layer == 81_788_928
    matmul_weights = 32 * per_layer + 3072 * 256000
    assert matmul_weights == 3_403_677_696
    assert flops.matmul_params(hf) == matmul_weights
    assert flops.dense_forward_flops_per_token(hf) == 2 * matmul_weights
    # a gated MLP of the same shapes would count one more 3072 x 9216 matrix per layer
    assert flops.matmul_params(dict(hf, architectures=["LlamaForCausalLM"], model_type="llama",
                                    hidden_act="silu")) - matmul_weights == 32 * 3072 * 9216


def test_mistral_nemo_12b_uses_its_head_dim_not_hidden_over_heads_by_hand():
    hf = _conf_model("mistral_nemo_12b")  # head_dim 128, hidden / heads = 160
    qkv = 5120 * (32 + 2 * 8) * 128     # 5120 x 6144  = 31,457,280
    proj = 32 * 128 * 5120              # 4096 x 5120  = 20,971,520
    fc1 = 5120 * 2 * 14336              # gate + up    = 146,800,640
    fc2 = 14336 * 5120                  # down         = 73,400,320
    per_layer = qkv + proj + fc1 + fc2
    assert per_layer == 272_629_760
    assert flops.matmul_params(hf) == 40 * per_layer + 5120 * 131072 == 11_576_279_040
    # attention: 32 heads x 128, not x 160
    assert flops.attention_forward_flops(hf, [4096]) == 40 * 32 * (2 * 2 * 128) * (4096 * 4097 // 2)


def test_tied_embedding_still_costs_its_output_matmul():
    hf = _conf_model("llama32_1b")  # tie_word_embeddings: the embedding matrix is also the output layer
    per_layer = 2048 * (32 + 2 * 8) * 64 + 32 * 64 * 2048 + 3 * 2048 * 8192
    assert flops.matmul_params(hf) == 16 * per_layer + 2048 * 128256
