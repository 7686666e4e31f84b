"""2-rank worker: the same tiny model and batch give the same forward loss for TP=1, TP=2, TP=2+SP, PP=2.

Writes {layout: loss} as JSON to argv[1] (rank 0).
"""
import json
import sys

import torch

from nemotune.recipes.engine import distributed
from nemotune.recipes.engine.model import build_gpt_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from conftest import TINY_HF  # noqa: E402
from full_weights import load_full_state_dict  # noqa: E402

LAYOUTS = {"tp1": (1, 1, False), "tp2": (2, 1, False), "tp2_sp": (2, 1, True), "pp2": (1, 2, False)}


def full_weights():
    """Reference TP=1 weights, identical on every rank (seeded)."""
    from megatron.core import parallel_state

    distributed.init_distributed(1, 1, seed=0)
    torch.manual_seed(0)
    model = build_gpt_model(TINY_HF)
    full = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    full = {k: torch.randn_like(v) * 0.05 if v.dim() > 1 else v for k, v in full.items()}
    parallel_state.destroy_model_parallel()
    return full


def loss_for(layout, full, tokens, labels):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp, pp, sp = LAYOUTS[layout]
    distributed.init_distributed(tp, pp, seed=0)
    model = build_gpt_model(TINY_HF, sequence_parallel=sp)
    load_full_state_dict(model, full)
    model.eval()

    def step(iterator, m):
        ids, lab = next(iterator)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        out = m(ids, pos, None, labels=lab)
        return out, lambda o: (o.sum(), torch.tensor(o.numel()), {"s": torch.stack([o.sum(), torch.tensor(float(o.numel()))])})

    with torch.no_grad():
        outs = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([(tokens, labels)]),
                                           model=[model], num_microbatches=1, seq_length=tokens.shape[1],
                                           micro_batch_size=tokens.shape[0], forward_only=True)
    total = torch.zeros(2, dtype=torch.float64)
    for o in outs:
        total += o["s"].double()
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        pass
    else:
        total.zero_()
    torch.distributed.all_reduce(total)
    parallel_state.destroy_model_parallel()
    return (total[0] / total[1]).item()


def main():
    full = full_weights()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY_HF["vocab_size"], (2, 32), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    losses = {layout: loss_for(layout, full, tokens, labels) for layout in LAYOUTS}
    if distributed.is_rank_zero():
        with open(sys.argv[1], "w") as f:
            json.dump(losses, f)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
