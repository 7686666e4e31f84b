"""Sequence packing as pure functions: lengths -> bins of example indices -> NeMo packed dicts.

Every example lands in exactly one bin, no bin holds more than pack_size tokens, and examples are never
split. `seq_start_id` lists the offset of each document in its pack (NeMo's packed .npy convention).
"""
from __future__ import annotations

import random
from typing import Sequence


def _first_fit(order: Sequence[int], lengths: Sequence[int], pack_size: int) -> list[list[int]]:
    """Place items, in `order`, into the first bin with room. A segment tree over the bins' free space finds
    the leftmost bin that fits in O(log n), so this stays fast for hundreds of thousands of examples."""
    for i in order:
        if lengths[i] > pack_size:
            raise ValueError(f"example {i} has {lengths[i]} tokens > pack_size {pack_size}; drop or truncate it first")
    capacity = 1
    while capacity < max(1, len(order)):
        capacity *= 2
    tree = [pack_size] * (2 * capacity)  # max free space in each subtree; leaves are (possible) bins
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < capacity:  # descend to the leftmost leaf with enough free space
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        leaf = node - capacity
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def first_fit_decreasing(lengths: Sequence[int], pack_size: int) -> list[list[int]]:
    """Longest first (ties by index), each into the first bin with room. Deterministic; needs no seed."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return _first_fit(order, lengths, pack_size)


def first_fit_shuffle(lengths: Sequence[int], pack_size: int, seed: int) -> list[list[int]]:
    """Seeded random order, each into the first bin with room (mixes lengths within packs)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return _first_fit(order, lengths, pack_size)


def pack_bins(lengths: Sequence[int], pack_size: int, algorithm: str = "first_fit_decreasing",
              seed: int = 0) -> list[list[int]]:
    if algorithm == "first_fit_decreasing":
        return first_fit_decreasing(lengths, pack_size)
    if algorithm == "first_fit_shuffle":
        return first_fit_shuffle(lengths, pack_size, seed)
    raise ValueError(f"unknown pack_algorithm {algorithm!r}: use first_fit_decreasing or first_fit_shuffle")


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def pad_to_multiple(input_ids: Sequence[int], loss_mask: Sequence[int], multiple: int,
                    pad_id: int) -> tuple[list[int], list[int]]:
    """Right-pad one example to a multiple of `multiple` (TP/CP kernels need it); padding never counts in the loss."""
    extra = padded_length(len(input_ids), multiple) - len(input_ids)
    return list(input_ids) + [pad_id] * extra, list(loss_mask) + [0] * extra


def build_packs(examples: Sequence[dict], bins: list[list[int]]) -> list[dict]:
    """Concatenate the examples of each bin: NeMo packed dicts with input_ids, loss_mask, seq_start_id.

    As in NeMo's packer, a pack's loss_mask is label-aligned: loss_mask[i] weights the prediction of token
    i+1 (the example's token-aligned mask shifted left by one, False at each example's last position).
    """
    packs = []
    for members in bins:
        input_ids, loss_mask, starts = [], [], []
        for i in members:
            starts.append(len(input_ids))
            input_ids.extend(examples[i]["input_ids"])
            loss_mask.extend(list(examples[i]["loss_mask"])[1:] + [0])
        packs.append({"input_ids": input_ids, "loss_mask": loss_mask, "seq_start_id": starts})
    return packs


def packing_stats(lengths: Sequence[int], bins: list[list[int]], pack_size: int,
                  real_lengths: Sequence[int] | None = None) -> dict:
    """Efficiency = real tokens / (packs x pack_size), every pack counted (the last one too)."""
    real = list(real_lengths if real_lengths is not None else lengths)
    n_packs = len(bins)
    fills = [sum(lengths[i] for i in b) for b in bins]
    return {
        "pack_size": pack_size,
        "n_packs": n_packs,
        "n_examples": len(lengths),
        "packing_factor": round(len(lengths) / n_packs, 4) if n_packs else 0.0,
        "packing_efficiency": round(sum(real) / (n_packs * pack_size), 6) if n_packs else 0.0,
        "real_tokens": int(sum(real)),
        "capacity_tokens": n_packs * pack_size,
        "max_samples_per_bin": max((len(b) for b in bins), default=0),
        "dataset_max_seqlen": max(lengths, default=0),
        "min_packed_seqlen": min(fills, default=0),
        "max_packed_seqlen": max(fills, default=0),
    }


def pad_to_longest_stats(lengths: Sequence[int], batch_size: int) -> dict:
    """The baseline packing is compared with: batches in order, each padded to its longest example."""
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    slots = sum(len(b) * max(b) for b in batches)
    return {"batch_size": batch_size, "n_batches": len(batches), "real_tokens": int(sum(lengths)),
            "slot_tokens": int(slots), "efficiency": sum(lengths) / slots if slots else 0.0}
