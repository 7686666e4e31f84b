"""bench/gpu_lora.py and bench/train_cpu.py run on this CPU: the GPU bench's dry run and its CPU smoke run
through SupervisedTrainer, its FLOP formula is recipes/engine/flops.py's, and the CPU comparison trains the same
work on both sides (equal step-1 losses)."""
import json
import sys

import numpy as np
import pytest

from conftest import REPO, run_module

sys.path.insert(0, str(REPO / "bench"))

import gpu_lora  # noqa: E402


def test_gpu_bench_uses_the_trainers_flop_formula():
    import nemotune.recipes.engine.flops

    assert gpu_lora.lora_step_flops is nemotune.recipes.engine.flops.lora_step_flops


def test_synthetic_packs_are_full_fiqa_like_and_answer_only():
    packs = gpu_lora.synthetic_packs(8, 4096, vocab_size=128256, seed=0)
    docs = [l for p in packs for l in p.document_lengths]
    assert all(len(p.input_ids) == 4096 and sum(p.document_lengths) == 4096 for p in packs)
    assert min(docs) >= 16 and max(docs) <= 2048
    assert 200 <= np.median(docs) <= 400  # FiQA chat-templated examples: a few hundred tokens
    for pack in packs:
        for start, length in zip(pack.seq_start_id, pack.document_lengths):
            prompt = min(gpu_lora.PROMPT_TOKENS, length - 1)
            assert pack.loss_mask[start:start + prompt].sum() == 0  # the prompt is out of the loss
            assert pack.loss_mask[start + prompt:start + length].all()
    again = gpu_lora.synthetic_packs(8, 4096, vocab_size=128256, seed=0)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(packs, again))


def test_gpu_bench_dry_run_counts_nano_8b(tmp_path):
    out = tmp_path / "dry.json"
    assert gpu_lora.main(["--dry-run", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())["dry_run"]
    assert plan["trainable_parameters"] == 20_971_520  # = HF PEFT r=8 all-linear on Llama-3.1-8B
    assert plan["total_parameters"] == 8_030_261_248 + 20_971_520
    assert plan["tokens_per_step"] == 4 * 4096
    from nemotune.recipes.engine.flops import lora_step_flops
    from nemotune.recipes.engine.config import compose
    from omegaconf import OmegaConf

    hf = OmegaConf.to_container(compose("lora_sft", ["model=nemotron_nano_8b"]).model.hf_config)
    docs = [l for p in gpu_lora.synthetic_packs(4, 4096, hf["vocab_size"], seed=0) for l in p.document_lengths]
    assert plan["flops_per_step"] == lora_step_flops(hf, docs)
    # packs of FiQA-length documents attend over less than one 4096 document: the ceiling is above ~29,800
    assert 29_800 < plan["h100_ceiling_tokens_per_s_at_100pct_mfu"] < 34_000


def test_gpu_bench_runs_the_trainer_step_on_cpu_tiny(tmp_path):
    out = tmp_path / "tiny.json"
    result = run_module("bench.gpu_lora", "--device", "cpu", "--tiny", "--seq", "256", "--micro-batches", "2",
                        "--steps", "2", "--warmup", "1", "--json", out, timeout=300)
    assert "reproduce: python bench/gpu_lora.py --device cpu --tiny" in result.stdout
    r = json.loads(out.read_text())["fp32"]
    assert r["te_spec"] is False and r["mfu"] is None  # CPU: local spec, no device peak
    assert r["tokens_per_s_per_gpu"] > 0 and r["tflops_per_gpu"] > 0 and r["peak_mem_gib"] > 0
    assert np.isfinite(r["last_loss"]) and 5.0 < r["last_loss"] < 9.0  # ~ln(1024) for random weights
    assert r["trainable_parameters"] == 18_688  # tiny model, dim 8 all-linear, canonical variant


def test_train_cpu_bench_trains_the_same_work_on_both_sides(tiny_assets, tmp_path):
    out = tmp_path / "train_cpu.json"
    run_module("bench.train_cpu", "--hf", tiny_assets["base"], "--mcore", tiny_assets["mcore"], "--prep",
               tiny_assets["prep"], "--split", "sft", "--no-dist", "--steps", "1", "--warmup", "1",
               "--repeats", "1", "--json", out, timeout=300)
    single = json.loads(out.read_text())["single"]
    # B = 0 at step 1: both compute the base model's answer-only loss on the same packs
    assert single["step1_loss"]["ours"] == pytest.approx(single["step1_loss"]["peer"], rel=1e-5)
    assert single["ours"]["tokens_per_s"] > 0 and single["peer"]["tokens_per_s"] > 0
    assert single["ratio_wall_median"] == pytest.approx(single["ours"]["tokens_per_s"] / single["peer"]["tokens_per_s"])
