"""Training samples -> model inputs: labels, answer-only loss weights, per-document positions and masks.

A sample is a pack (NeMo packed format: `input_ids`, `loss_mask`, `seq_start_id`) or a single tokenized
example (a pack of one document). A Sample's loss_mask is label-aligned as in NeMo's packed files: position i
predicts token i+1 of the same document with weight loss_mask[i]; no position predicts across a document
boundary. Positions restart at every document.
On the local (PyTorch) spec documents are separated by a block-diagonal causal mask; with Transformer
Engine the same packs go through THD `cu_seqlens` (`PackedSeqParams`).

The sampler is a pure function of (seed, epoch, consumed samples): resuming at `consumed_samples`
continues with exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch


@dataclass
class Sample:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    seq_start_id: List[int]

    @property
    def document_lengths(self) -> List[int]:
        bounds = list(self.seq_start_id) + [len(self.input_ids)]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def sample_from_record(record: dict, *, label_aligned: bool) -> Sample:
    """A packed-file row (label-aligned mask) or a tokenized-jsonl row (token-aligned mask, one document)."""
    input_ids = np.asarray(record["input_ids"], dtype=np.int64)
    mask = np.asarray(record["loss_mask"], dtype=np.float32)
    if not label_aligned:
        mask = np.concatenate([mask[1:], np.zeros(1, dtype=np.float32)])
    starts = [int(s) for s in record.get("seq_start_id", [0])]
    return Sample(input_ids=input_ids, loss_mask=mask, seq_start_id=starts)


def targets_and_weights(sample: Sample):
    """labels[i] = input_ids[i+1] and weight[i] = loss_mask[i] within a document, 0 at its last token."""
    ids = sample.input_ids
    labels = np.zeros_like(ids)
    labels[:-1] = ids[1:]
    weights = sample.loss_mask.astype(np.float32).copy()
    bounds = list(sample.seq_start_id[1:]) + [len(ids)]
    for end in bounds:
        weights[end - 1] = 0.0
    return labels, weights


def positions(sample: Sample) -> np.ndarray:
    pos = np.zeros(len(sample.input_ids), dtype=np.int64)
    bounds = list(sample.seq_start_id) + [len(sample.input_ids)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos[start:end] = np.arange(end - start)
    return pos


class DocumentMask:
    """Where megatron expects an attention mask on the local spec: the documents of each row.

    The local spec's core attention (nemotune.recipes.engine.model.SdpaCoreAttention) runs causal attention per document:
    the same result as a block-diagonal causal mask, without building or applying an [S, S] mask, and with
    sum(l^2) instead of S^2 work per packed row. A row's padding tail attends within itself and carries no
    loss. `dense()` is the equivalent boolean mask (True = masked, megatron's convention).
    """

    def __init__(self, document_lengths: Sequence[Sequence[int]], seq_len: int):
        self.seq_len = seq_len
        self.spans = []
        for lengths in document_lengths:
            bounds, start = [], 0
            for length in list(lengths) + [seq_len - sum(lengths)]:
                if length > 0:
                    bounds.append((start, start + length))
                    start += length
            self.spans.append(bounds)

    def dense(self) -> torch.Tensor:
        doc = torch.full((len(self.spans), self.seq_len), -1, dtype=torch.long)
        for row, bounds in enumerate(self.spans):
            for index, (start, end) in enumerate(bounds):
                doc[row, start:end] = index
        return block_causal_mask(doc)


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where attention is NOT allowed (megatron's convention)."""
    seq = doc_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    padding_self = torch.eye(seq, dtype=torch.bool)[None] & (doc_ids[:, :, None] < 0)
    allowed = (same_doc & (doc_ids[:, :, None] >= 0) & causal) | padding_self
    return ~allowed[:, None]


def collate(samples: Sequence[Sample], pad_id: int, pad_to_multiple: int = 1, pad_to: int = 0) -> dict:
    """Right-pad a micro-batch to one length; returns CPU tensors."""
    longest = max(len(s.input_ids) for s in samples)
    length = max(longest, pad_to)
    if pad_to_multiple > 1:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    tokens = np.full((len(samples), length), pad_id, dtype=np.int64)
    labels = np.full((len(samples), length), pad_id, dtype=np.int64)
    weights = np.zeros((len(samples), length), dtype=np.float32)
    pos = np.zeros((len(samples), length), dtype=np.int64)
    doc_lengths = []
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        tokens[row, :n] = sample.input_ids
        lab, w = targets_and_weights(sample)
        labels[row, :n], weights[row, :n] = lab, w
        pos[row, :n] = positions(sample)
        doc_lengths.append(sample.document_lengths)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_weights": torch.from_numpy(weights),
        "position_ids": torch.from_numpy(pos),
        "document_lengths": doc_lengths,
        "real_tokens": int(sum(len(s.input_ids) for s in samples)),
    }


def packed_seq_params(batch: dict, device):
    """THD parameters for Transformer Engine (micro-batch of one pack): cu_seqlens over its documents."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = batch["document_lengths"][0]
    pad = batch["tokens"].shape[1] - sum(lengths)
    if pad:
        lengths = lengths + [pad]
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=device)
    longest = int(max(lengths))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    generator = np.random.default_rng([seed, epoch])
    return generator.permutation(num_samples)


def global_batch_indices(num_samples: int, global_batch_size: int, consumed_samples: int, seed: int,
                         shuffle: bool = True) -> tuple[np.ndarray, int]:
    """Sample indices of the next global batch and its epoch (drop-last: an epoch has
    num_samples // global_batch_size steps)."""
    steps_per_epoch = num_samples // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} training samples cannot fill one global batch of "
                         f"{global_batch_size}; lower trainer.global_batch_size")
    step = consumed_samples // global_batch_size
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    order = epoch_order(num_samples, seed, epoch, shuffle)
    start = step_in_epoch * global_batch_size
    return order[start:start + global_batch_size], epoch


def data_parallel_slice(indices: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    per_rank = len(indices) // dp_size
    return indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
