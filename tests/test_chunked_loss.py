"""Chunked output layer + cross-entropy: the same per-token loss and gradients as the plain computation."""

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_HF, run_torchrun
from dist.checks import plain_and_chunked_loss
from nemotune.recipes.engine.loss import ENV_IMPL, chunk_tokens, linear_cross_entropy, loss_impl


def _inputs(n=37, hidden=24, vocab=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=torch.float32)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float32) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, labels


def _plain(h, w, labels):
    return F.cross_entropy(h @ w.t(), labels, reduction="none")


@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozen_weight", "trainable_weight"])
@pytest.mark.parametrize("chunk", [1, 5, 64], ids=lambda c: f"chunk{c}")
def test_chunked_loss_and_gradients_match_plain(weight_trainable, chunk):
    h, w, labels = _inputs()
    upstream = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(1))  # per-token loss weights
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(weight_trainable)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(weight_trainable)
    plain = _plain(h1, w1, labels)
    (plain * upstream).sum().backward()
    chunked = linear_cross_entropy(h2, w2, labels, chunk=chunk)
    (chunked * upstream).sum().backward()
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-6)
    if weight_trainable:
        torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-6)
    else:
        assert w2.grad is None
    assert h1.grad.abs().sum() > 0  # the comparison is not between zeros


def test_masked_rows_get_zero_loss_and_no_gradient():
    h, w, labels = _inputs()
    mask = torch.zeros(h.shape[0])
    mask[3:20] = 1.0
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    plain = _plain(h1, w, labels) * mask
    plain.sum().backward()
    chunked = linear_cross_entropy(h2, w, labels, loss_mask=mask, chunk=4)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-6)
    assert chunked[:3].abs().sum() == 0 and chunked[3:20].min() > 0
    assert h2.grad[20:].abs().sum() == 0


def test_micro_batch_without_answer_tokens_gives_zero_loss_and_gradient():
    h, w, labels = _inputs()
    h = h.requires_grad_()
    loss = linear_cross_entropy(h, w, labels, loss_mask=torch.zeros(h.shape[0]))
    loss.sum().backward()
    assert loss.shape == (h.shape[0],) and loss.abs().sum() == 0 and h.grad.abs().sum() == 0


@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozen_weight", "trainable_weight"])
def test_bf16_inputs_give_fp32_losses_and_bf16_gradients(weight_trainable):
    """The GPU case (bf16 weights and activations): the logits are upcast per chunk like megatron's loss."""
    h, w, labels = _inputs()
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_(weight_trainable)
    loss = linear_cross_entropy(hb, wb, labels, chunk=8)
    loss.sum().backward()
    reference = F.cross_entropy((hb.detach() @ wb.detach().t()).float(), labels, reduction="none")
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    h32 = hb.detach().float().requires_grad_()
    F.cross_entropy(h32 @ wb.detach().float().t(), labels, reduction="sum").backward()
    torch.testing.assert_close(hb.grad.float(), h32.grad, atol=2e-2, rtol=2e-2)
    if weight_trainable:
        assert wb.grad.dtype == torch.bfloat16 and wb.grad.abs().sum() > 0


def test_no_grad_forward_matches_and_builds_no_graph():
    h, w, labels = _inputs()
    with torch.no_grad():
        chunked = linear_cross_entropy(h.requires_grad_(), w, labels, chunk=7)
    assert chunked.grad_fn is None
    torch.testing.assert_close(chunked, _plain(h.detach(), w, labels), atol=1e-6, rtol=1e-6)


def test_large_logits_stay_finite():
    """Row maxima are subtracted before exp, as in log-softmax: logits around 1e4 give finite losses."""
    h, w, labels = _inputs()
    chunked = linear_cross_entropy(h * 300, w, labels, chunk=8)
    assert torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, _plain(h * 300, w, labels), atol=1e-3, rtol=1e-6)


def test_chunk_size_follows_the_vocabulary():
    assert chunk_tokens(128256) == 261  # 128 MiB of fp32 logits per chunk
    assert chunk_tokens(128256 // 8) == 2092  # a TP=8 shard: the same bytes, more tokens
    assert chunk_tokens(10 ** 9) == 1


def test_shape_mismatch_is_one_clear_error():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match=r"do not fit \[N, H\] x \[V, H\]"):
        linear_cross_entropy(h, w[:, :5], labels)


def test_unknown_impl_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_IMPL, "fast")
    with pytest.raises(ValueError, match=f"{ENV_IMPL}='fast' is not one of auto, chunked, plain"):
        loss_impl()
    monkeypatch.setenv(ENV_IMPL, "plain")
    assert loss_impl() == "plain"


def test_gpt_model_chunked_loss_equals_megatron_loss_tp1(monkeypatch):
    """The installed GPTModel loss path: same per-token loss and same gradients as megatron's own path."""
    pytest.importorskip("megatron.core")
    from nemotune.recipes.engine.model import build_gpt_model

    torch.manual_seed(0)
    model = build_gpt_model(dict(TINY_HF), device="cpu")
    tokens = torch.randint(0, TINY_HF["vocab_size"], (2, 12))
    labels = torch.randint(0, TINY_HF["vocab_size"], (2, 12))
    positions = torch.arange(12).expand(2, 12)
    mask = torch.ones(2, 12)
    mask[0, :4] = 0  # a prompt: no loss, skipped by the chunked path

    results = plain_and_chunked_loss(model, tokens, positions, labels, mask)
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results["plain"], results["chunked"]
    torch.testing.assert_close(chunked_loss * mask, plain_loss * mask, atol=1e-6, rtol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert plain_grads["output_layer.weight"].abs().sum() > 0


def test_tensor_parallel_chunked_loss_equals_plain_tp2():
    result = run_torchrun(REPO / "tests" / "dist" / "chunked_loss_tp.py", nproc=2, timeout=300)
    assert result.stdout.count("chunked_loss_tp ok") == 2, result.stdout


def _tiny_hf_lm(target_lm_head: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_HF.items() if k != "architectures"}))
    targets = ["q_proj", "v_proj"] + (["lm_head"] if target_lm_head else [])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # non-zero B: the adapter changes the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("target_lm_head", [False, True], ids=["lora_body", "lora_lm_head"])
def test_hf_answer_token_loss_equals_full_logits_reference(target_lm_head):
    from nemotune.recipes.engine.generation import masked_next_token_loss
    from nemotune.recipes.engine.loss import hf_answer_token_loss

    model = _tiny_hf_lm(target_lm_head)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY_HF["vocab_size"], (3, 20), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 14:] = 0  # a right-padded row
    mask = torch.zeros_like(ids)
    mask[0, 8:] = 1
    mask[1, 5:14] = 1
    mask[2, 19] = 1
    with torch.inference_mode():
        ref_sum, ref_count = masked_next_token_loss(model(input_ids=ids, attention_mask=attn).logits.float(), ids,
                                                    mask)
        got_sum, got_count = hf_answer_token_loss(model, ids, attn, mask, chunk=3)
        with model.disable_adapter():
            base_sum, _ = hf_answer_token_loss(model, ids, attn, mask, chunk=3)
    assert got_count == ref_count == 12 + 9 + 1  # the last answer token (row 2) is predicted from position 18
    assert got_sum == pytest.approx(ref_sum, rel=1e-6)
    assert abs(base_sum - got_sum) > 1e-4  # the adapter (and, when targeted, the LoRA lm_head) is applied


def test_training_step_losses_equal_megatron_loss_path(tiny_assets, tmp_path):
    """End to end through `nemotune train` (SupervisedTrainer, answer-only loss_mask, validation): the chunked
    default and NEMOTUNE_LOSS_IMPL=plain log the same train and val losses, step by step."""
    import json

    from conftest import run_module

    def losses(impl):
        run_dir = tmp_path / impl
        run_module("nemotune.recipes.lora_sft", "experiment=tiny_lora", f"model.hf_path={tiny_assets['base']}",
                   f"model.checkpoint={tiny_assets['mcore']}", f"data.output_dir={tiny_assets['prep']}",
                   f"run.output_dir={run_dir}", "run.tensorboard=false", "trainer.train_split=sft",
                   "trainer.validation_split=eval", "trainer.sft.max_steps=3", "trainer.sft.val_check_interval=3",
                   "trainer.sft.limit_val_batches=1", env={ENV_IMPL: impl})
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], k, r[k]) for r in rows for k in ("train/loss", "val/loss") if k in r]

    chunked, plain = losses("chunked"), losses("plain")
    assert [(s, k) for s, k, _ in chunked] == [(s, k) for s, k, _ in plain]
    assert len(chunked) == 4  # 3 train steps and one validation
    for (step, key, a), (_, _, b) in zip(chunked, plain):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), (step, key, a, b)
    assert chunked[2][2] < chunked[0][2]  # it learns: not a comparison of two untouched models


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
