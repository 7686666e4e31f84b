"""Load frozen base weights into a GPTModel from a checkpoint `nemotune convert` wrote.

Accepts a megatron-core dist checkpoint directory or a `.nemo` file / extracted directory (its
`model_weights/` holds the same checkpoint with NeMo's `model.` key prefix). dist_checkpointing reshards to
this run's TP/PP. A checkpoint written with the local spec loads into the Transformer Engine spec and back:
the two name their layer norms differently (`input_layernorm.weight` vs
`self_attention.linear_qkv.layer_norm_weight`).
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

# local-spec name <-> TE-spec name of the layer norms folded into the following linear layer
NORM_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _alias(key: str) -> list[str]:
    out = []
    for local, te in NORM_ALIASES.items():
        if key.endswith(local):
            out.append(key[: -len(local)] + te)
        if key.endswith(te):
            out.append(key[: -len(te)] + local)
    return out


def _checkpoint_dir(path: Path, workdir: Path) -> tuple[Path, str]:
    """(dist checkpoint dir, key prefix) of a dist checkpoint, a .nemo tarball or an extracted .nemo."""
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise ValueError(f"{path}: neither a dist checkpoint directory nor a .nemo tarball")
        with tarfile.open(path) as tar:
            tar.extractall(workdir, filter="data")
        path = workdir
    if (path / "model_weights").is_dir():
        return path / "model_weights", "model."
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: no megatron dist checkpoint (metadata.json) or .nemo model_weights/")
    return path, ""


def load_base_weights(model, checkpoint: str | Path) -> None:
    from megatron.core import dist_checkpointing

    with tempfile.TemporaryDirectory(prefix="nemotune-base-") as tmp:
        ckpt_dir, prefix = _checkpoint_dir(Path(checkpoint), Path(tmp))
        available = set(dist_checkpointing.load_tensors_metadata(str(ckpt_dir)).keys())
        sharded = {k: v for k, v in model.sharded_state_dict().items()
                   if "adapter_layer" not in k and not k.endswith("_extra_state")}
        missing = []
        for name, tensor in sharded.items():
            key = prefix + tensor.key
            if key not in available:
                alias = next((prefix + a for a in _alias(tensor.key) if prefix + a in available), None)
                if alias is None:
                    missing.append(tensor.key)
                    continue
                key = alias
            tensor.key = key
        if missing:
            raise ValueError(f"{checkpoint}: base checkpoint lacks {len(missing)} tensors of this model, "
                             f"e.g. {missing[:3]}; was it converted from a model of this shape?")
        state = dist_checkpointing.load(sharded, str(ckpt_dir))
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    if unexpected:
        raise ValueError(f"{checkpoint}: unexpected tensors {unexpected[:3]}")
