"""User reward functions for the RL tests, selected by import path (`rl_rewards:aligned_tokens`): tests/dist is on
the workers' sys.path."""
import os

_ALIGNED = []


def aligned_ids(base_dir: str) -> set:
    """The half of the tiny vocabulary whose output-layer rows point along one fixed random direction u: a single
    change of the final hidden state (towards u) raises all of them at once, so a LoRA policy can learn to emit
    them within a few steps (an arbitrary half of a random model's vocabulary it could barely favour)."""
    import torch
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(os.listdir(base_dir)):
        if shard.endswith(".safetensors"):
            weights.update(load_file(os.path.join(base_dir, shard)))
    head = weights["lm_head.weight"].float()
    u = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    return set(torch.nonzero(head @ u > 0).flatten().tolist())


def aligned_tokens(completions, references, *, completion_ids, **_):
    """The fraction of a completion's tokens in `aligned_ids` of the base in $RL_TEST_BASE (about 0.5 for the
    random base policy)."""
    if not _ALIGNED:
        _ALIGNED.append(aligned_ids(os.environ["RL_TEST_BASE"]))
    good = _ALIGNED[0]
    return [sum(t in good for t in ids) / max(len(ids), 1) for ids in completion_ids]
