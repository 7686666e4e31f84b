"""Load full (TP=1 / PP=1) weights into one rank's shard of a GPTModel: the multi-rank workers start every
layout from the same single-process weights with it (training loads converted checkpoints instead)."""
import torch


def layer_offset(model) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_name(model, local_name: str) -> str:
    """`decoder.layers.<local>.x` -> `decoder.layers.<global>.x` for this pipeline stage."""
    parts = local_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + layer_offset(model))
    return ".".join(parts)


def shard_for_rank(param: torch.Tensor, full: torch.Tensor, *, gated: bool = False) -> torch.Tensor:
    """This TP rank's slice of a full (TP=1) tensor, following megatron's partition attributes.

    `gated`: the tensor is cat(gate, up) along the partitioned dim (linear_fc1 of SwiGLU, and its LoRA B):
    each rank holds [gate_r; up_r], not a contiguous block of the concatenation.
    """
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    size = param.shape[dim]
    rank = parallel_state.get_tensor_model_parallel_rank()
    if gated:
        gate, up = full.chunk(2, dim=dim)
        half = size // 2
        return torch.cat([gate.narrow(dim, rank * half, half), up.narrow(dim, rank * half, half)], dim=dim)
    return full.narrow(dim, rank * size, size)


def is_gated_fc1(name: str) -> bool:
    return "linear_fc1.weight" in name or "lora_hto4h_adapter.linear_out" in name


def load_full_state_dict(model, full: dict, *, strict: bool = True) -> None:
    """Load TP=1/PP=1 tensors (global layer numbers) into this rank's shard of `model`."""
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = global_name(model, name)
            if key not in full:
                missing.append(key)
                continue
            piece = shard_for_rank(param, full[key], gated=is_gated_fc1(key))
            if piece.shape != param.shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(full[key].shape)} does not fit this model "
                                 f"(this rank's shard {tuple(param.shape)})")
            param.copy_(piece)
    if strict and missing:
        raise ValueError(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
