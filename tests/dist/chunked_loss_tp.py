"""2-rank worker: the chunked vocab-parallel linear + cross-entropy equals the plain computation at TP=2.

1. The bare function: each rank holds half the vocabulary rows; loss, the (all-reduced) hidden gradient and
   each rank's weight-gradient shard equal the single-process plain cross-entropy on the full weight.
2. A megatron GPTModel at TP=2 and TP=2 + sequence parallel: the chunked path gives the same per-token loss
   and the same gradient on every parameter of this rank as megatron's own path (NEMOTUNE_LOSS_IMPL=plain).
Prints "chunked_loss_tp ok" on each rank.
"""
import sys

import torch
import torch.nn.functional as F

from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.loss import linear_cross_entropy
from nemotune.recipes.engine.model import build_gpt_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from conftest import TINY_HF  # noqa: E402

from checks import plain_and_chunked_loss  # noqa: E402  (this folder is first on sys.path under torchrun)

TOL = dict(atol=1e-6, rtol=1e-5)


def check_function(rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, hidden, vocab = 29, 16, 96
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen)
    rows = vocab // world
    for trainable in (False, True):
        ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_(trainable)
        ref = F.cross_entropy(ref_h @ ref_w.t(), labels, reduction="none")
        (ref * upstream).sum().backward()
        mine_h = h.clone().requires_grad_()
        mine_w = w[rank * rows:(rank + 1) * rows].clone().requires_grad_(trainable)
        loss = linear_cross_entropy(mine_h, mine_w, labels, vocab_start=rank * rows,
                                    group=torch.distributed.group.WORLD, chunk=6)
        (loss * upstream).sum().backward()
        torch.testing.assert_close(loss, ref.detach(), **TOL)
        grad_h = mine_h.grad.clone()
        torch.distributed.all_reduce(grad_h)  # what the output layer's input all-reduce does
        torch.testing.assert_close(grad_h, ref_h.grad, **TOL)
        if trainable:
            torch.testing.assert_close(mine_w.grad, ref_w.grad[rank * rows:(rank + 1) * rows], **TOL)


def check_gpt_model(sequence_parallel: bool) -> None:
    from megatron.core import parallel_state

    distributed.init_distributed(2, 1, seed=0)
    torch.manual_seed(0)
    model = build_gpt_model(TINY_HF, sequence_parallel=sequence_parallel, device="cpu")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY_HF["vocab_size"], (1, 16), generator=gen)
    labels = torch.randint(0, TINY_HF["vocab_size"], (1, 16), generator=gen)
    positions = torch.arange(16).unsqueeze(0)
    mask = torch.ones(1, 16)
    mask[0, :5] = 0

    results = plain_and_chunked_loss(model, tokens, positions, labels, mask)
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results["plain"], results["chunked"]
    torch.testing.assert_close(chunked_loss * mask, plain_loss * mask, **TOL)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **TOL, msg=f"sp={sequence_parallel} {name}")
    parallel_state.destroy_model_parallel()


def main() -> None:
    distributed.init_distributed(1, 1, seed=0)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == 2, "launch with 2 ranks"
    check_function(rank, world)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    check_gpt_model(sequence_parallel=False)
    check_gpt_model(sequence_parallel=True)
    print(f"rank {rank}: chunked_loss_tp ok", flush=True)


if __name__ == "__main__":
    main()
