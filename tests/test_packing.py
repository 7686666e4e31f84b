"""Packing algorithms are pure functions: never over pack size, never split or lose an example."""
from __future__ import annotations

import json
import random

import pytest
from test_data_prep_support import SHARED_FIQA, needs_shared_fiqa

from nemotune.data_prep import packing


def check_bins(bins, lengths, pack_size):
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= pack_size for b in bins)
    assert all(b for b in bins)


def test_first_fit_decreasing_known_answer():
    lengths = [5, 4, 3, 3, 2, 2, 1]
    assert packing.first_fit_decreasing(lengths, 8) == [[0, 2], [1, 3, 6], [4, 5]]


@pytest.mark.parametrize("seed", range(5))
def test_properties_on_random_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 512) for _ in range(rng.randint(1, 400))]
    for bins in (packing.first_fit_decreasing(lengths, 512), packing.first_fit_shuffle(lengths, 512, seed)):
        check_bins(bins, lengths, 512)
        # first fit never leaves two bins that could have been merged
        fills = sorted(sum(lengths[i] for i in b) for b in bins)
        assert len(fills) < 2 or fills[0] + fills[1] > 512
    assert packing.first_fit_shuffle(lengths, 512, seed) == packing.first_fit_shuffle(lengths, 512, seed)


def test_shuffle_order_depends_on_seed_and_ffd_beats_or_ties_it():
    rng = random.Random(0)
    lengths = [rng.randint(50, 900) for _ in range(300)]
    a, b = packing.first_fit_shuffle(lengths, 1024, 1), packing.first_fit_shuffle(lengths, 1024, 2)
    assert a != b
    assert len(packing.first_fit_decreasing(lengths, 1024)) <= min(len(a), len(b))


def test_oversized_example_is_refused():
    with pytest.raises(ValueError, match="pack_size"):
        packing.first_fit_decreasing([10, 2000], 1024)


def test_build_packs_and_pad_to_multiple():
    examples = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [0, 1]}]
    [pack] = packing.build_packs(examples, [[1, 0]])
    # NeMo's label-aligned pack mask: per example shifted left by one, 0 at its last token
    assert pack == {"input_ids": [4, 5, 1, 2, 3], "loss_mask": [1, 0, 1, 1, 0], "seq_start_id": [0, 2]}
    assert packing.pad_to_multiple([1, 2, 3], [0, 1, 1], 4, pad_id=9) == ([1, 2, 3, 9], [0, 1, 1, 0])
    assert packing.pad_to_multiple([1, 2, 3, 4], [1, 1, 1, 1], 4, pad_id=9) == ([1, 2, 3, 4], [1, 1, 1, 1])


def test_stats_count_every_pack():
    stats = packing.packing_stats([600, 500, 400], [[0, 2], [1]], 1024)
    assert stats["n_packs"] == 2 and stats["packing_efficiency"] == round(1500 / 2048, 6)
    assert stats["packing_factor"] == 1.5 and stats["max_samples_per_bin"] == 2
    baseline = packing.pad_to_longest_stats([600, 500, 400], batch_size=2)
    assert baseline["slot_tokens"] == 2 * 600 + 400


@needs_shared_fiqa
def test_ffd_efficiency_on_real_fiqa_rows_at_4096():
    from nemotune.data_prep import templating
    from nemotune.data_prep.config import FIQA_SYSTEM_PROMPT
    from nemotune.data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("nemotune/tiny")
    lengths = []
    for line in SHARED_FIQA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        messages = [{"role": "system", "content": FIQA_SYSTEM_PROMPT},
                    {"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        encoded = templating.encode(tokenizer, messages, 4096)
        if encoded.status == templating.OK:
            lengths.append(len(encoded.input_ids))
    assert len(lengths) >= 646
    bins = packing.first_fit_decreasing(lengths, 4096)
    check_bins(bins, lengths, 4096)
    stats = packing.packing_stats(lengths, bins, 4096)
    print(f"FFD @4096 on {len(lengths)} real FiQA rows: {stats['n_packs']} packs, "
          f"efficiency {100 * stats['packing_efficiency']:.2f}% (all packs counted)")
    assert stats["packing_efficiency"] >= 0.98
