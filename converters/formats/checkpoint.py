"""Checkpoint conversion: HF Llama (safetensors) <-> Megatron dist checkpoint <-> NeMo 1.x ``.nemo``.

Formats written here
  Megatron checkpoint dir   config.json (the HF config) + tokenizer files + ``weights/`` (megatron-core
                            dist_checkpointing, torch_dist; layers stacked, loadable under any TP/PP)
                            + ``nemotune_checkpoint.json``.
  ``.nemo``                 an uncompressed tar: ``model_config.yaml`` (NeMo GPT config, ``mcore_gpt: true``),
                            ``model_weights/`` (the same dist checkpoint with NeMo's ``model.`` key prefix)
                            and ``hf/`` (config.json + tokenizer files, so the HF side is restored exactly).
  HF dir                    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, config
                            and tokenizer files copied; loadable by ``transformers`` unmodified.

Memory: the Megatron model is built once without initialisation (untouched pages cost nothing) and filled
tensor by tensor from memory-mapped shards, so a conversion holds about one copy of the model plus one
shard. Every output is written to a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from nemotune.converters.formats.hf_config import load_hf_config, read_config_json
from nemotune.converters.formats.outputs import MARKER as OUTPUT_MARKER
from nemotune.converters.formats.safe_pickle import UnsafeFileError, check_checkpoint_files
from nemotune.converters.formats.mapping import (
    NEMO_PREFIX,
    LlamaDims,
    check_hf_shapes,
)

log = logging.getLogger("nemotune.converters")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
INDEX_NAME = "model.safetensors.index.json"
MARKER_NAME = "nemotune_checkpoint.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ConversionError(RuntimeError, ValueError):
    """A checkpoint cannot be converted; the message says what is wrong and what to do."""


# ---- HF side -------------------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, refusing a truncated or corrupt file."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in read_safetensors_layout(path).items()}


def read_safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, byte offset of its data in the file), refusing a truncated or corrupt file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds the file size")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not a valid safetensors file ({err}); re-download it") from err
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ConversionError(
            f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + header_len + data_end}); "
            "the download or copy was interrupted -- fetch this shard again")
    return {name: (entry["dtype"], tuple(entry["shape"]), 8 + header_len + entry["data_offsets"][0])
            for name, entry in header.items()}


def _bytes_of(tensor: torch.Tensor):
    """A writable byte buffer over a contiguous tensor's storage."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def read_into(handle, offset: int, dst: torch.Tensor) -> None:
    """Fill ``dst`` (possibly a strided view) with the bytes at ``offset``, in row-major order, no staging."""
    if dst.is_contiguous() or dst.dim() <= 1:
        buffer = _bytes_of(dst)
        handle.seek(offset)
        done = 0
        while done < len(buffer):
            count = handle.readinto(buffer[done:])
            if not count:
                raise ConversionError(f"{handle.name}: unexpected end of file (truncated shard?)")
            done += count
        return
    step = dst[0].numel() * dst.element_size()
    for i in range(dst.shape[0]):
        read_into(handle, offset + i * step, dst[i])


def hf_weight_map(hf_dir: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index or the single ``model.safetensors``."""
    index = hf_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_config_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no weight_map object; re-download this file")
        return {name: hf_dir / shard for name, shard in weight_map.items()}
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        found = sorted(p.name for p in hf_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        hint = f" (found {found}: only safetensors is read; pickled weights are never unpickled)" if found else ""
        raise ConversionError(f"{hf_dir}: no *.safetensors weights{hint}")
    return {name: shard for shard in shards for name in read_safetensors_header(shard)}


def inspect_hf_checkpoint(hf_dir: str | Path) -> tuple[dict, dict[str, Path], torch.dtype]:
    """Validate an HF checkpoint before anything is written: config, every shard, every tensor shape."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    hf = load_hf_config(hf_dir)
    weight_map = hf_weight_map(hf_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if not shard.is_file():
            raise ConversionError(f"{shard}: listed in {INDEX_NAME} but missing")
        for name, (dtype, shape) in read_safetensors_header(shard).items():
            shapes[name], dtypes[name] = shape, dtype
    try:
        check_hf_shapes(shapes, LlamaDims.from_hf(hf), origin=str(hf_dir))
    except ValueError as err:
        raise ConversionError(str(err)) from err
    dtype_name = dtypes["model.embed_tokens.weight"]
    if dtype_name not in SAFETENSORS_DTYPES:
        raise ConversionError(f"{hf_dir}: unsupported weight dtype {dtype_name}")
    return hf, weight_map, SAFETENSORS_DTYPES[dtype_name]


def auxiliary_files(src_dir: Path) -> list[Path]:
    """config, generation config, tokenizer and chat template files: everything that is not weights."""
    return sorted(p for p in src_dir.iterdir()
                  if p.is_file() and p.suffix not in WEIGHT_SUFFIXES
                  and p.name not in (INDEX_NAME, MARKER_NAME, OUTPUT_MARKER))


def copy_auxiliary_files(src_dir: Path, dst_dir: Path) -> None:
    for path in auxiliary_files(src_dir):
        shutil.copy2(path, dst_dir / path.name)


# ---- outputs ---------------------------------------------------------------------------------------------------

def write_hf_shards(named_tensors: list[tuple[str, torch.Tensor] | tuple[str, torch.Tensor, tuple[int, ...]]],
                    out_dir: Path, *, max_shard_size: int = 5 * 1024**3, progress: bool = True) -> None:
    """Write tensors (in order) as HF safetensors shards + index, one shard in memory at a time.

    An entry may carry the shape to write: its tensor is then a view in that shape's row-major element
    order (see ``megatron_to_hf_views``), reshaped -- copied only if strided -- when its shard is written.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    named_tensors = [(name, tensor, tuple(rest[0]) if rest else tuple(tensor.shape))
                     for name, tensor, *rest in named_tensors]
    plan: list[list[int]] = [[]]
    shard_bytes = 0
    for i, (_, tensor, _) in enumerate(named_tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if plan[-1] and shard_bytes + nbytes > max_shard_size:
            plan.append([])
            shard_bytes = 0
        plan[-1].append(i)
        shard_bytes += nbytes
    total = sum(t.numel() * t.element_size() for _, t, _ in named_tensors)
    if len(plan) == 1:
        save_file({n: t.reshape(shape).contiguous() for n, t, shape in named_tensors},
                  str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, indices in enumerate(tqdm(plan, desc="writing shards", unit="shard", disable=not progress), 1):
        file_name = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        shard = {named_tensors[i][0]: named_tensors[i][1].reshape(named_tensors[i][2]).contiguous()
                 for i in indices}
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# ---- Megatron side ---------------------------------------------------------------------------------------------


def _loadable_sharded_state_dict(model, prefix: str = "") -> dict:
    """The model's sharded state dict without the (empty) TE extra-state objects, for loading."""
    return {k: v for k, v in model.sharded_state_dict(prefix=prefix).items() if not k.endswith("_extra_state")}


def _streaming_save_strategy():
    """megatron-core's torch_dist save strategy, writing through torch DCP's own FileSystemWriter.

    The format is the same (megatron's planner, metadata and file layout; loads under any TP/PP). Only the
    staging differs: megatron's async writer copies every tensor that is a view (the gate/up halves of each
    ``linear_fc1``, i.e. a third of a Llama) up front so that a forked process can write them later; torch's
    synchronous writer copies one tensor at a time while it writes, so saving adds one tensor, not a model.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp

    class StreamingTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False))

    return StreamingTorchDistSaveStrategy("torch_dist", 1, thread_count=1)


def save_dist_checkpoint(model, out_dir: Path, *, prefix: str = "") -> None:
    from megatron.core import dist_checkpointing

    out_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(prefix=prefix), str(out_dir),
                            sharded_strategy=_streaming_save_strategy())


# local-spec name <-> TE-spec name of the layer norms folded into the following linear layer: a checkpoint
# written under one spec loads into a model built with the other (convert on CPU, train with TE on GPU).
NORM_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _norm_alias(key: str) -> str | None:
    for local, te in NORM_ALIASES.items():
        if key.endswith(local):
            return key[: -len(local)] + te
        if key.endswith(te):
            return key[: -len(te)] + local
    return None


def _tiles(target: torch.Tensor, parts: list) -> bool:
    """Whether ``parts`` are contiguous views that cover ``target``'s memory in order, end to end."""
    if not target.is_contiguous() or not all(isinstance(p, torch.Tensor) and p.is_contiguous() for p in parts):
        return False
    pointer = target.data_ptr()
    for part in parts:
        if part.data_ptr() != pointer or part.dtype != target.dtype:
            return False
        pointer += part.numel() * part.element_size()
    return pointer == target.data_ptr() + target.numel() * target.element_size()


def _merge_factories_in_place(sharded: dict) -> None:
    """Skip the copy of a factory merge when the pieces were loaded into the parameter itself.

    A factory (e.g. the gate/up halves of a SwiGLU ``linear_fc1``) splits a parameter into views, the
    checkpoint is read into those views, and megatron's merge concatenates them into a new tensor -- a
    copy of every ``linear_fc1`` held at once until ``load_state_dict`` copies it back. When the loaded
    pieces tile the parameter, the parameter already is the merged tensor.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for factory in sharded.values():
        if isinstance(factory, ShardedTensorFactory):
            def merge(parts, target=factory.data, original=factory.merge_fn):
                pieces = parts if isinstance(parts, list) else [parts]
                return target if _tiles(target, pieces) else original(parts)

            factory.merge_fn = merge


def load_dist_checkpoint(model, ckpt_dir: Path, *, prefix: str = "") -> None:
    """Load a dist checkpoint into ``model`` under the current TP/PP (the checkpoint's own TP/PP is irrelevant)."""
    from megatron.core import dist_checkpointing

    check_checkpoint_files(ckpt_dir)  # megatron / torch unpickle its files: only data may be in them
    sharded = _loadable_sharded_state_dict(model, prefix)
    available = set(dist_checkpointing.load_tensors_metadata(str(ckpt_dir)))
    for tensor in sharded.values():
        alias = _norm_alias(tensor.key) if tensor.key not in available else None
        if alias is not None and alias in available:
            tensor.key = alias
    absent = sorted(t.key for t in sharded.values() if t.key not in available)
    if absent:
        raise ConversionError(f"{ckpt_dir}: the checkpoint lacks {len(absent)} tensors this model needs, e.g. "
                              f"{absent[:3]}; was it converted from a model of this shape?")
    _merge_factories_in_place(sharded)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict="log_unexpected")
    if prefix:  # a training step dir's common state (optimizer param groups) comes back too: not the model's
        loaded = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{ckpt_dir}: missing {missing}, unexpected {unexpected}")


# ---- .nemo -----------------------------------------------------------------------------------------------------

def nemo_model_config(hf: Mapping[str, Any], *, tokenizer_type: str | None = None) -> dict:
    """NeMo 1.x megatron_gpt model_config.yaml content for an HF config of a supported family."""
    scaling = hf.get("rope_scaling") or {}
    llama3 = scaling.get("rope_type", scaling.get("type")) == "llama3"
    layer_norm_1p = hf.get("norm") == "LayerNorm1P"
    return {
        "mcore_gpt": True,
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "encoder_seq_length": hf["max_position_embeddings"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_query_groups": hf["num_key_value_heads"],
        "kv_channels": hf["head_dim"],
        "init_method_std": hf.get("initializer_range", 0.02),
        "use_scaled_init_method": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "ffn_dropout": 0.0,
        "normalization": "layernorm1p" if layer_norm_1p else "rmsnorm",
        "layernorm_epsilon": hf["rms_norm_eps"],
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": 1,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": False,
        "qkv_bias": bool(hf.get("qkv_bias", False)),
        "qk_layernorm": bool(hf.get("qk_norm", False)),
        "activation": "fast-swiglu" if hf.get("gated_mlp", True) else "squared-relu",
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "openai_gelu": False,
        "normalize_attention_scores": True,
        "position_embedding_type": "rope",
        "rotary_percentage": float(hf.get("partial_rotary_factor", 1.0)),
        "rotary_base": hf["rope_theta"],
        "apply_rope_fusion": False,
        "scale_positional_embedding": llama3,
        "seq_len_interpolation_factor": scaling.get("factor") if llama3 else None,
        "share_embeddings_and_output_weights": bool(hf["tie_word_embeddings"]),
        "apply_query_key_layer_scaling": False,
        "precision": "bf16",
        "tokenizer": {"library": "huggingface", "type": tokenizer_type or "nemo:hf", "use_fast": True},
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "nemo_version": "1.23.0",
    }


def nemo_chat_config(model_config: dict, template: str | None, *, tokenizer_member: str) -> dict:
    """Record in a model_config.yaml the tokenizer files at ``tokenizer_member/`` inside the archive and the
    chat template that trained the model, under NeMo's keys (in place; returns ``model_config``):

      data.chat, data.chat_prompt_tokens  NeMo-Aligner examples/nlp/gpt/conf/gpt_sft.yaml (``model.data.chat``,
                                          ``model.data.chat_prompt_tokens`` {system_turn_start, turn_start,
                                          label_start, end_of_turn, end_of_name})
      tokenizer.chat_template             NeMo nemo/collections/nlp/models/language_modeling/megatron_base_model.py
                                          (``_build_tokenizer`` passes ``cfg.tokenizer.chat_template`` to
                                          ``get_nmt_tokenizer``): the Jinja template, verbatim
    ``chat_prompt_tokens`` are filled for Llama-3-style templates (NeMo's turn shape with Llama-3's header / eot
    tokens) and null otherwise; the verbatim template is authoritative.
    """
    from nemotune.converters.formats.tokenizer_files import llama3_chat_prompt_tokens

    model_config["tokenizer"] = {**model_config.get("tokenizer", {}), "library": "huggingface",
                                 "type": f"nemo:{tokenizer_member}", "chat_template": template}
    model_config["data"] = {**model_config.get("data", {}), "chat": template is not None,
                            "chat_prompt_tokens": llama3_chat_prompt_tokens(template)}
    return model_config


def hf_config_from_nemo(cfg: Mapping[str, Any], vocab_size: int) -> dict:
    """Rebuild an HF config from a NeMo model_config.yaml (for .nemo files without an ``hf/`` folder): Nemotron
    (layernorm1p + squared-relu), Qwen3 (qk_layernorm), Qwen2 (qkv_bias) or else Llama (which also computes a
    Mistral without sliding window)."""
    if not cfg.get("mcore_gpt", False):
        raise ConversionError("only mcore GPT .nemo files (model_config.yaml `mcore_gpt: true`) are supported")
    activation = str(cfg.get("activation", "")).replace("fast-", "")
    nemotron = activation == "squared-relu" and cfg.get("normalization") == "layernorm1p"
    if not (activation == "swiglu" or nemotron) or cfg.get("bias", False):
        raise ConversionError(f"unsupported NeMo model: activation {cfg.get('activation')!r}, normalization "
                              f"{cfg.get('normalization')!r}, bias {cfg.get('bias')!r} (supported: swiglu + "
                              "rmsnorm, or squared-relu + layernorm1p; no linear bias)")
    architecture = ("NemotronForCausalLM" if nemotron else "Qwen3ForCausalLM" if cfg.get("qk_layernorm")
                    else "Qwen2ForCausalLM" if cfg.get("qkv_bias") else "LlamaForCausalLM")
    heads = cfg["num_attention_heads"]
    hf = {
        "architectures": [architecture],
        "model_type": architecture.replace("ForCausalLM", "").lower(),
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["ffn_hidden_size"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_query_groups") or heads,
        "head_dim": cfg.get("kv_channels") or cfg["hidden_size"] // heads,
        "max_position_embeddings": cfg.get("max_position_embeddings", cfg.get("encoder_seq_length", 4096)),
        "rms_norm_eps": cfg.get("layernorm_epsilon", 1e-5),
        "rope_theta": float(cfg.get("rotary_base", 10000.0)),
        "tie_word_embeddings": bool(cfg.get("share_embeddings_and_output_weights", False)),
        "vocab_size": vocab_size,
        "hidden_act": "relu2" if nemotron else "silu",
        "torch_dtype": "float32",
    }
    if nemotron:
        hf["norm_eps"] = hf.pop("rms_norm_eps")
        hf["partial_rotary_factor"] = float(cfg.get("rotary_percentage", 0.5))
    if cfg.get("scale_positional_embedding"):
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": float(cfg.get("seq_len_interpolation_factor") or 8.0),
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    return hf


def safe_extract(tar_path: Path, dest: Path) -> None:
    """Extract a tarball, refusing absolute paths, ``..`` components and links out of ``dest``."""
    try:
        with tarfile.open(tar_path, "r:*") as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts:
                    raise ConversionError(f"{tar_path}: refusing unsafe member path {member.name!r}")
            archive.extractall(dest, filter="data")
    except tarfile.FilterError as err:
        raise ConversionError(f"{tar_path}: refusing unsafe tar member ({err})") from err
    except tarfile.TarError as err:
        raise ConversionError(f"{tar_path}: not a readable .nemo tarball ({err})") from err


def write_tar(src_dir: Path, tar_path: Path, *, verb: str | None = None) -> None:
    """An uncompressed tar (NeMo's default) of the files under ``src_dir``, paths relative to it; ``verb``
    marks it as that verb's output (a PAX header, so a later run can recognise -- and only then replace -- it)."""
    from nemotune.converters.formats.outputs import tar_marker

    with tarfile.open(tar_path, "w:", format=tarfile.PAX_FORMAT,
                      pax_headers=tar_marker(verb) if verb else None) as archive:
        for path in sorted(src_dir.rglob("*")):
            archive.add(path, arcname="./" + str(path.relative_to(src_dir)), recursive=False)


def read_nemo_config(root: Path) -> dict:
    import yaml

    config_file = root / "model_config.yaml"
    if not config_file.is_file():
        raise ConversionError(f"{root}: no model_config.yaml in the .nemo archive")
    return yaml.safe_load(config_file.read_text())


# ---- reading converted checkpoints --------------------------------------------------------------------------


@contextlib.contextmanager
def open_megatron_checkpoint(path: str | Path) -> Iterator[tuple[dict, Path, str, Path | None]]:
    """(hf config, dist-checkpoint dir, key prefix, dir with config/tokenizer files or None) of a
    Megatron checkpoint dir, a ``.nemo`` (extracted safely to a temporary dir for the block) or a full-SFT
    training step dir (``<run>/checkpoints/stepN``: ``dist/`` with keys under ``model.``, ``hf/``)."""
    path = Path(path)
    if path.is_dir() and (path / TRAINING_STATE).is_file():
        _check_training_step(path)
        check_checkpoint_files(path / "dist")
        yield load_hf_config(path / "hf"), path / "dist", TRAINING_PREFIX, path / "hf"
        return
    if path.is_dir() and (path / "weights").is_dir():
        check_checkpoint_files(path / "weights")
        yield load_hf_config(path), path / "weights", "", path
        return
    if path.is_dir() and (path / "model_config.yaml").is_file():  # an extracted .nemo
        _check_nemo_root(path, path)
        yield _nemo_hf_config(path), path / "model_weights", NEMO_PREFIX, _nemo_aux_dir(path)
        return
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="nemotune-nemo-") as tmp:
            safe_extract(path, Path(tmp))
            root = Path(tmp)
            try:
                _check_nemo_root(root, path)
            except UnsafeFileError as err:  # name the member inside the .nemo, not the temporary copy
                raise ConversionError(str(err).replace(f"{root}/", f"{path}:")) from None
            yield _nemo_hf_config(root), root / "model_weights", NEMO_PREFIX, _nemo_aux_dir(root)
        return
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory; pass a Megatron checkpoint dir "
                              "(nemotune convert hf-to-megatron) or a .nemo file")
    raise ConversionError(f"{path}: neither a Megatron checkpoint dir (with weights/) nor a .nemo file")


TRAINING_STATE = "trainer_state.json"  # a training step dir (recipes/engine/checkpointing.py writes it)
TRAINING_PREFIX = "model."  # the key prefix of a full-SFT step dir's model tensors


def _check_training_step(path: Path) -> None:
    """A training step dir loads as a model only when it holds the whole model (full SFT, peft_scheme none)."""
    try:
        scheme = json.loads((path / TRAINING_STATE).read_text()).get("peft_scheme") or "lora"
    except (OSError, ValueError, AttributeError) as err:
        raise ConversionError(f"{path / TRAINING_STATE}: unreadable ({err}); pass another step dir") from None
    if scheme != "none" or (path / "adapter").is_dir():
        raise ConversionError(f"{path}: an adapter-only checkpoint (LoRA training, peft_scheme {scheme}) holds no "
                              f"base weights; use `nemotune export hf-peft/merge --adapter {path / 'adapter'}` "
                              f"with its base, or pass a full-SFT (peft=none) step dir or a converted checkpoint")
    if not (path / "dist").is_dir() or not (path / "hf" / "config.json").is_file():
        raise ConversionError(f"{path}: a full-SFT step dir without dist/ and hf/config.json (incomplete or "
                              f"damaged); pass another step dir")


def _check_nemo_root(root: Path, source: Path) -> None:
    """A base-model .nemo: its dist checkpoint is safe to read (restricted unpickling) and it is not a LoRA."""
    if not (root / "model_weights").is_dir():
        if (root / "model_weights.ckpt").is_file():
            raise ConversionError(f"{source}: a LoRA adapter .nemo (model_weights.ckpt holds adapter weights only), "
                                  "not a base model; pass the base model's .nemo or Megatron checkpoint dir, "
                                  "and the adapter with --adapter / peft.restore_from")
        raise ConversionError(f"{source}: no model_weights/ folder; not a mcore GPT .nemo checkpoint")
    check_checkpoint_files(root / "model_weights")


def _nemo_aux_dir(root: Path) -> Path | None:
    return root / "hf" if (root / "hf" / "config.json").is_file() else None


def _nemo_hf_config(root: Path) -> dict:
    if (root / "hf" / "config.json").is_file():
        return load_hf_config(root / "hf")
    from megatron.core import dist_checkpointing

    cfg = read_nemo_config(root)
    metadata = dist_checkpointing.load_tensors_metadata(str(root / "model_weights"))
    vocab = metadata[NEMO_PREFIX + "embedding.word_embeddings.weight"].global_shape[0]
    return load_hf_config(hf_config_from_nemo(cfg, vocab))


def load_megatron_weights(model, path: str | Path) -> dict:
    """Load a Megatron checkpoint dir or ``.nemo`` written by the converters into ``model`` (any TP/PP).

    Returns the checkpoint's HF config. This is what training uses for ``model.checkpoint``.
    """
    with open_megatron_checkpoint(path) as (hf, weights, prefix, _):
        load_dist_checkpoint(model, weights, prefix=prefix)
    return hf
