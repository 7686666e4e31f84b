"""Pure functions of recipes/engine/batches.py: targets, weights, positions, masks, the sampler."""
import numpy as np

from nemotune.recipes.engine import batches


def pack():
    # two documents (lengths 3 and 4), label-aligned mask as in NeMo's packed files
    return batches.Sample(input_ids=np.array([10, 11, 12, 20, 21, 22, 23]),
                          loss_mask=np.array([0, 1, 0, 0, 1, 1, 0], dtype=np.float32), seq_start_id=[0, 3])


def test_targets_never_cross_a_document_boundary():
    labels, weights = batches.targets_and_weights(pack())
    assert labels.tolist()[:6] == [11, 12, 20, 21, 22, 23]
    assert weights.tolist() == [0, 1, 0, 0, 1, 1, 0]  # position 2 (last of doc 1) never predicts doc 2


def test_token_aligned_rows_are_shifted_to_label_aligned():
    sample = batches.sample_from_record({"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]},
                                        label_aligned=False)
    assert sample.loss_mask.tolist() == [0, 1, 1, 0] and sample.seq_start_id == [0]


def test_positions_restart_per_document_and_collate_pads():
    batch = batches.collate([pack()], pad_id=0, pad_to=9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]
    assert batch["tokens"][0, 7:].tolist() == [0, 0] and batch["loss_weights"][0, 7:].sum() == 0
    assert batch["document_lengths"] == [[3, 4]] and batch["real_tokens"] == 7


def test_document_mask_is_the_block_diagonal_causal_mask():
    mask = batches.DocumentMask([[3, 4]], seq_len=9)
    assert mask.spans == [[(0, 3), (3, 7), (7, 9)]]  # the padding tail is its own span
    dense = mask.dense()[0, 0]
    allowed = ~dense
    assert allowed[4, 3] and allowed[6, 3] and not allowed[3, 2] and not allowed[2, 3] and not allowed[4, 5]
    assert allowed.sum().item() == 6 + 10 + 3


def test_sampler_is_a_pure_function_of_seed_and_consumed_samples():
    first, epoch = batches.global_batch_indices(10, 4, 0, seed=3)
    again, _ = batches.global_batch_indices(10, 4, 0, seed=3)
    second, _ = batches.global_batch_indices(10, 4, 4, seed=3)
    assert epoch == 0 and first.tolist() == again.tolist() and not set(first) & set(second)
    _, next_epoch = batches.global_batch_indices(10, 4, 8, seed=3)  # 2 steps per epoch, drop-last
    assert next_epoch == 1
    assert batches.data_parallel_slice(np.arange(8), 1, 2).tolist() == [4, 5, 6, 7]
