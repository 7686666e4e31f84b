"""The conversions: HF Llama (safetensors) <-> Megatron dist checkpoint <-> NeMo 1.x ``.nemo``, and verify.

These build a TP=1/PP=1 Megatron model (the engine's builder) and move its weights through the file formats
of ``nemotune.converters.formats.checkpoint``, which describes every format written here.

Memory: the Megatron model is built once without initialisation (untouched pages cost nothing) and filled
tensor by tensor from the shards, so a conversion holds about one copy of the model plus one tensor. Every
output is written to a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from nemotune.converters.formats.checkpoint import (
    MARKER_NAME,
    SAFETENSORS_DTYPES,
    ConversionError,
    read_into,
    copy_auxiliary_files,
    inspect_hf_checkpoint,
    load_dist_checkpoint,
    nemo_model_config,
    open_megatron_checkpoint,
    read_safetensors_layout,
    save_dist_checkpoint,
    write_hf_shards,
    write_tar,
)
from nemotune.converters.formats.mapping import NEMO_PREFIX, LlamaDims, expected_hf_shapes, megatron_to_hf_views
from nemotune.converters.formats.outputs import output_target

VERB = "convert"
EXPORT_VERB = "export"  # the full-model exports mark their outputs as `nemotune export`'s
log = logging.getLogger("nemotune.converters")


def _output(out, *, inputs, overwrite: bool, is_dir: bool = True, verb: str = VERB):
    """Where a conversion writes (see nemotune.converters.formats.outputs): refusals are ConversionErrors."""
    return output_target(out, verb=verb, overwrite=overwrite, is_dir=is_dir, inputs=inputs,
                         error=ConversionError)


def _param_spec(state_dict: Mapping[str, Any]) -> str:
    return "local" if any(k.endswith("input_layernorm.weight") for k in state_dict) else "te"


def fill_model_from_hf(model, hf: Mapping[str, Any], weight_map: Mapping[str, Path], *, progress: bool = True) -> None:
    """Read every HF tensor straight into its place in the Megatron model, shard by shard.

    The mapping table's views say where each HF tensor's elements live inside its (fused) Megatron
    parameter, so the bytes go from the file into the parameter with no intermediate tensor: the
    conversion holds the model and nothing else (no memory-mapped shard, no fused copy).
    """
    from tqdm.auto import tqdm

    dims = LlamaDims.from_hf(hf)
    params = {k: v for k, v in model.state_dict(keep_vars=True).items()
              if isinstance(v, torch.Tensor) and not k.endswith("_extra_state") and "rotary" not in k}
    spec = _param_spec(params)
    destination = {hf_name: (name, view) for name, param in params.items()
                   for hf_name, view in megatron_to_hf_views(name, param.data, dims, spec)}
    by_shard: dict[Path, list[str]] = {}
    for hf_name, shard in weight_map.items():
        if hf_name in destination:  # others: a tied model's lm_head, rotary buffers
            by_shard.setdefault(shard, []).append(hf_name)
    unfilled = set(destination)
    with torch.no_grad():
        for shard in tqdm(sorted(by_shard), desc="reading shards", unit="shard", disable=not progress):
            layout = read_safetensors_layout(shard)
            with open(shard, "rb", buffering=0) as handle:
                for hf_name in by_shard[shard]:
                    dtype_name, shape, offset = layout[hf_name]
                    name, view = destination[hf_name]
                    dtype = SAFETENSORS_DTYPES.get(dtype_name)
                    if dtype is None or math.prod(shape) != view.numel():
                        raise ConversionError(f"{shard}: {hf_name} is {dtype_name} {list(shape)}, which does not "
                                              f"fit {name} {list(view.shape)}")
                    if dtype == view.dtype:
                        read_into(handle, offset, view)
                    else:  # a dtype conversion needs the source tensor once
                        source = torch.empty(shape, dtype=dtype)
                        read_into(handle, offset, source)
                        view.copy_(source.view(view.shape))
                    unfilled.discard(hf_name)
    if unfilled:
        raise ConversionError(f"conversion left parameters unset: "
                              f"{sorted({destination[n][0] for n in unfilled})} (missing {sorted(unfilled)})")


def _marker(kind: str, hf: Mapping[str, Any], source: Path, dtype: torch.dtype) -> str:
    return json.dumps({"format": kind, "source": str(source), "dtype": str(dtype).replace("torch.", ""),
                       "architecture": hf["architectures"][0]}, indent=2) + "\n"


def _dtype(name: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    mapping = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in mapping:
        raise ConversionError(f"unknown dtype {name!r}; use one of {sorted(mapping)}")
    return mapping[name]


def _hf_config_for_disk(hf: Mapping[str, Any]) -> dict:
    """config.json of the family's own transformers config class (the derived keys left out)."""
    import transformers

    from nemotune.converters.formats.hf_config import DERIVED_KEYS

    architecture = hf["architectures"][0]
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", *DERIVED_KEYS)}
    if architecture == "NemotronForCausalLM":
        fields.pop("rms_norm_eps", None)
    config = config_class(**fields)
    config.architectures = [architecture]
    return config.to_dict()


def _hf_order(name: str) -> tuple:
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (2, 0, name)


def _bytes(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _check_output(out, inputs, overwrite: bool, *, is_dir: bool = True, verb: str = VERB) -> None:
    """Refuse an output path before any model is built (the same checks run again when writing)."""
    from nemotune.converters.formats.outputs import OutputError, preflight

    try:
        preflight(Path(out), verb=verb, inputs=inputs, overwrite=overwrite,
                  overwrite_hint="--overwrite")
    except OutputError as err:
        raise ConversionError(str(err)) from None


def build_conversion_model(hf: Mapping[str, Any], dtype: torch.dtype = torch.float32):
    """A TP=1/PP=1 GPTModel with uninitialised parameters (a world of one is started if needed)."""
    from nemotune.recipes.engine.model import build_gpt_model

    return build_gpt_model(hf, init_weights=False, device="cpu", use_te=False, params_dtype=dtype,
                           pre_process=True, post_process=True)


def _model_from_hf(hf_dir: Path, dtype, progress: bool):
    hf, weight_map, ckpt_dtype = inspect_hf_checkpoint(hf_dir)
    dtype = _dtype(dtype, ckpt_dtype)
    model = build_conversion_model(hf, dtype)
    fill_model_from_hf(model, hf, weight_map, progress=progress)
    return hf, model, dtype


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, dtype=None, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """HF Llama dir -> Megatron checkpoint dir (dist checkpoint in ``weights/``, HF config + tokenizer beside)."""
    hf_dir = Path(hf_dir)
    _check_output(out_dir, [hf_dir], overwrite)
    hf, model, dtype = _model_from_hf(hf_dir, dtype, progress)
    with _output(out_dir, inputs=[hf_dir], overwrite=overwrite) as tmp:
        save_dist_checkpoint(model, tmp / "weights")
        copy_auxiliary_files(hf_dir, tmp)
        (tmp / MARKER_NAME).write_text(_marker("megatron-dist", hf, hf_dir, dtype))
    return Path(out_dir)


def hf_to_nemo(hf_dir: str | Path, out_path: str | Path, *, dtype=None, overwrite: bool = False,
               progress: bool = True) -> Path:
    """HF Llama dir -> NeMo 1.x ``.nemo`` tarball (mcore keys prefixed ``model.``)."""
    hf_dir = Path(hf_dir)
    _check_output(out_path, [hf_dir], overwrite, is_dir=False)
    hf, model, dtype = _model_from_hf(hf_dir, dtype, progress)
    return _write_nemo(model, hf, dtype, hf_dir, out_path, inputs=[hf_dir], overwrite=overwrite)


def _write_nemo(model, hf: Mapping[str, Any], dtype: torch.dtype, aux: Path | None, out_path: str | Path, *,
                inputs, overwrite: bool, chat: bool = False, tokenizer=None, verb: str = VERB) -> Path:
    """A full ``.nemo``: model_config.yaml, model_weights/ (NeMo's ``model.`` prefix) and hf/ (config + tokenizer
    files from ``aux``, overlaid by ``tokenizer``); ``chat`` records the chat template under NeMo's keys."""
    import yaml

    from nemotune.converters.formats.checkpoint import nemo_chat_config

    with _output(out_path, inputs=inputs, overwrite=overwrite, is_dir=False, verb=verb) as tmp_file:
        staging = tmp_file.parent / "staging"
        save_dist_checkpoint(model, staging / "model_weights", prefix=NEMO_PREFIX)
        config = nemo_model_config(hf, tokenizer_type=hf.get("_name_or_path") or "nemo:hf")
        config["precision"] = {torch.float32: 32, torch.bfloat16: "bf16", torch.float16: 16}[dtype]
        (staging / "hf").mkdir()
        if aux is not None:
            copy_auxiliary_files(Path(aux), staging / "hf")
        if not (staging / "hf" / "config.json").is_file():
            (staging / "hf" / "config.json").write_text(json.dumps(_hf_config_for_disk(hf), indent=2) + "\n")
        if chat:
            nemo_chat_config(config, _serving_tokenizer(staging / "hf", tokenizer), tokenizer_member="hf")
        (staging / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        write_tar(staging, tmp_file, verb=verb)
        shutil.rmtree(staging)
    return Path(out_path)


def _serving_tokenizer(out_dir: Path, tokenizer=None) -> str | None:
    """Overlay ``tokenizer`` (a dir of tokenizer files) on ``out_dir`` and make sure chat_template.jinja is there;
    returns the chat template (None, with a warning, when there is none)."""
    from nemotune.converters.formats.tokenizer_files import TokenizerFilesError, ensure_chat_template, write_tokenizer

    try:
        template = write_tokenizer(out_dir, tokenizer) if tokenizer is not None else ensure_chat_template(out_dir)
    except TokenizerFilesError as err:
        raise ConversionError(str(err)) from None
    if template is None:
        log.warning("the export carries no chat template (the checkpoint has no tokenizer files with one); pass "
                    "--tokenizer <the training tokenizer dir> to include it")
    return template


def _write_generation_config(out_dir: Path, hf: Mapping[str, Any]) -> None:
    """generation_config.json: the source's, with the bos / eos / pad ids it lacks filled from the model config
    and the tokenizer in ``out_dir`` (eos = the tokenizer's end-of-turn token, so generation stops there)."""
    from transformers import GenerationConfig

    from nemotune.converters.formats.tokenizer_files import special_token_ids

    path = out_dir / "generation_config.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    tokens = special_token_ids(out_dir)
    eos = hf.get("eos_token_id")
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if "eos" in tokens and tokens["eos"] not in eos:
        eos.append(tokens["eos"])

    def first(*values):
        return next((v for v in values if v is not None), None)

    fields = {"bos_token_id": first(hf.get("bos_token_id"), tokens.get("bos")),
              "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
              "pad_token_id": first(hf.get("pad_token_id"), tokens.get("pad"))}
    if not existing:
        existing = GenerationConfig().to_diff_dict()
    for key, value in fields.items():
        if existing.get(key) is None and value is not None:
            existing[key] = value
    path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")


def refuse_adapter_checkpoint(path: str | Path) -> None:
    """A LoRA training checkpoint (or an adapter dir) is no full model: one line naming the commands that export it."""
    path = Path(path)
    if not path.is_dir():
        return
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    state = path / "trainer_state.json"
    scheme = None
    if state.is_file():
        try:
            scheme = json.loads(state.read_text()).get("peft_scheme")
        except ValueError:
            scheme = None
    markers = ("adapter_config.json", "nemotune_adapter.json", "adapter_weights.safetensors")
    if adapter != path or scheme == "lora" or any((path / name).is_file() for name in markers):
        raise ConversionError(f"{path}: an adapter-only checkpoint (LoRA), not a full model; export it with "
                              f"`nemotune export hf-peft --adapter {adapter}` or `nemotune export merge --base "
                              f"<base HF dir> --adapter {adapter}`")


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
              max_shard_size: int | str = "5GB", dtype=None, overwrite: bool = False, progress: bool = True) -> Path:
    """A full-model checkpoint (full-SFT step dir, Megatron checkpoint dir or ``.nemo``) -> HF dir for serving:
    sharded safetensors + config.json + tokenizer files + chat_template.jinja + generation_config.json."""
    refuse_adapter_checkpoint(checkpoint)
    return megatron_to_hf(checkpoint, out_dir, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite,
                          progress=progress, tokenizer=tokenizer, serving=True, verb=EXPORT_VERB)


def export_nemo(checkpoint: str | Path, out_path: str | Path, *, tokenizer: str | Path | None = None,
                dtype=None, overwrite: bool = False) -> Path:
    """A full-model checkpoint -> a full NeMo 1.x ``.nemo`` of the fine-tuned model: model_config.yaml (NeMo's
    GPT keys plus ``data.chat``, ``data.chat_prompt_tokens`` and ``tokenizer.chat_template``), model_weights/
    in NeMo's layout, and hf/ with config.json and the tokenizer files (``tokenizer.type: nemo:hf``)."""
    refuse_adapter_checkpoint(checkpoint)
    inputs = [checkpoint, tokenizer]
    _check_output(out_path, inputs, overwrite, is_dir=False, verb=EXPORT_VERB)
    with open_megatron_checkpoint(checkpoint) as (hf, weights, prefix, aux):
        marker = json.loads((aux / MARKER_NAME).read_text()) if aux and (aux / MARKER_NAME).is_file() else {}
        model_dtype = _dtype(dtype or marker.get("dtype"), torch.float32)
        model = build_conversion_model(hf, model_dtype)
        load_dist_checkpoint(model, weights, prefix=prefix)
        return _write_nemo(model, hf, model_dtype, aux, out_path, inputs=inputs, overwrite=overwrite, chat=True,
                           tokenizer=tokenizer, verb=EXPORT_VERB)


def megatron_model_from_checkpoint(path: str | Path, *, dtype=torch.float32):
    with open_megatron_checkpoint(path) as (hf, weights, prefix, aux):
        model = build_conversion_model(hf, dtype)
        load_dist_checkpoint(model, weights, prefix=prefix)
    return hf, model


def megatron_to_hf(ckpt: str | Path, out_dir: str | Path, *, max_shard_size: int | str = "5GB",
                   dtype=None, hf_dir: str | Path | None = None, overwrite: bool = False,
                   progress: bool = True, tokenizer: str | Path | None = None, serving: bool = False,
                   verb: str = VERB) -> Path:
    """Megatron checkpoint dir or ``.nemo`` -> HF Llama dir (safetensors + config + tokenizer files).

    ``hf_dir`` optionally supplies config/tokenizer files when the checkpoint carries none; ``tokenizer`` (a dir)
    overlays its tokenizer files; ``serving`` also writes chat_template.jinja and generation_config.json.
    """
    inputs = [ckpt, hf_dir, tokenizer]
    _check_output(out_dir, inputs, overwrite, verb=verb)
    with open_megatron_checkpoint(ckpt) as (hf, weights, prefix, aux):
        dims = LlamaDims.from_hf(hf)
        marker = json.loads((aux / MARKER_NAME).read_text()) if aux and (aux / MARKER_NAME).is_file() else {}
        model_dtype = _dtype(dtype or marker.get("dtype"), torch.float32)
        model = build_conversion_model(hf, model_dtype)
        load_dist_checkpoint(model, weights, prefix=prefix)
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        spec = _param_spec(state)
        # views, not split copies: a split QKV is materialised only while its shard is written
        hf_shapes = expected_hf_shapes(dims)  # a layout view's shape is not the HF one (q/k/v: [groups, rows, ...])
        named = [(hf_name, view, hf_shapes[hf_name])
                 for name, tensor in state.items() if not name.endswith("_extra_state")
                 for hf_name, view in megatron_to_hf_views(name, tensor, dims, spec)]
        named.sort(key=lambda item: _hf_order(item[0]))
        with _output(out_dir, inputs=inputs, overwrite=overwrite, verb=verb) as tmp:
            write_hf_shards(named, tmp, max_shard_size=_bytes(max_shard_size), progress=progress)
            source = Path(hf_dir) if hf_dir else aux
            if source is not None:
                copy_auxiliary_files(source, tmp)
            if not (tmp / "config.json").is_file():
                (tmp / "config.json").write_text(json.dumps(_hf_config_for_disk(hf), indent=2) + "\n")
            if serving or tokenizer is not None:
                _serving_tokenizer(tmp, tokenizer)
            if serving:
                _write_generation_config(tmp, hf)
    return Path(out_dir)


def verify(hf_dir: str | Path, ckpt: str | Path, *, tolerance: float = 1e-5, batch_size: int = 2,
           seq_len: int = 32, seed: int = 0, adapter: str | Path | None = None,
           peft_dir: str | Path | None = None) -> float:
    """Max |logit difference| between transformers (HF dir) and our Megatron model (ckpt), fp32 on CPU.

    With `adapter` (a nemotune adapter dir), the Megatron side gets LoRA with that adapter and the HF side
    the exported HF PEFT adapter (`peft_dir`, or one exported from `adapter` to a temporary dir) through
    `peft.PeftModel`: the serving format is checked against what training computes.
    """
    from transformers import AutoModelForCausalLM

    for name, value, least in (("--seq-len", seq_len, 1), ("--batch-size", batch_size, 1)):
        if int(value) < least:
            raise ConversionError(f"{name} {value}: must be >= {least} (the batch of random tokens compared)")
    if not tolerance >= 0:
        raise ConversionError(f"--tolerance {tolerance}: must be >= 0, e.g. 1e-5")
    hf_config, hf_shapes = _hf_shapes(Path(hf_dir))
    if seq_len > hf_config["max_position_embeddings"]:
        raise ConversionError(f"--seq-len {seq_len}: longer than max_position_embeddings "
                              f"{hf_config['max_position_embeddings']} of {Path(hf_dir) / 'config.json'}")
    with open_megatron_checkpoint(ckpt) as (hf, weights, prefix, aux):
        _check_same_model(Path(hf_dir), hf_config, hf_shapes, Path(ckpt), hf)
        model = build_conversion_model(hf, torch.float32)
        load_dist_checkpoint(model, weights, prefix=prefix)
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="nemotune-verify-") as tmp:
        if adapter is not None:
            hf_model = _with_peft_adapter(hf_model, adapter, peft_dir, Path(tmp))
            _apply_adapter(model, adapter)
        return max_logit_difference(hf_model, model, hf["vocab_size"], batch_size=batch_size, seq_len=seq_len,
                                    seed=seed)


def max_logit_difference(hf_model, model, vocab_size: int, *, batch_size: int, seq_len: int, seed: int) -> float:
    """max |logit difference| of the transformers model and the Megatron model on one seeded batch of random
    tokens (what `convert verify` reports)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids).logits.float()
        actual = model(input_ids, position_ids, attention_mask=None).float()
    return (expected - actual).abs().max().item()


def _hf_shapes(hf_dir: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(validated HF config, tensor name -> shape) of an HF checkpoint dir, from its headers only."""
    from nemotune.converters.formats.checkpoint import read_safetensors_header

    hf, weight_map, _ = inspect_hf_checkpoint(hf_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(weight_map.values())):
        shapes.update({name: tuple(shape) for name, (_, shape) in read_safetensors_header(shard).items()})
    return hf, shapes


def _check_same_model(hf_dir: Path, hf_config: Mapping, hf_shapes: Mapping[str, tuple[int, ...]], ckpt: Path,
                      ckpt_hf: Mapping) -> None:
    """Refuse comparing two different models: name the first tensor whose shape differs, with both shapes."""
    ours = expected_hf_shapes(LlamaDims.from_hf(ckpt_hf))
    extra = {name: None for name in expected_hf_shapes(LlamaDims.from_hf(hf_config)) if name not in ours}
    for name, shape in {**ours, **extra}.items():
        found = hf_shapes.get(name)
        if shape is None or found is None or tuple(found) != tuple(shape):
            theirs = "absent" if found is None else str(list(found))
            mine = "absent" if shape is None else str(list(shape))
            raise ConversionError(
                f"{ckpt} is not a checkpoint of {hf_dir}: {name} is {mine} in {ckpt} but {theirs} in "
                f"{hf_dir}; pass the checkpoint converted from this model (nemotune convert hf-to-megatron "
                f"--hf {hf_dir} --out DIR)")


def _with_peft_adapter(hf_model, adapter, peft_dir, tmp: Path):
    from peft import PeftModel

    from nemotune.converters.formats.adapters import export_hf_peft

    if peft_dir is None:
        peft_dir = export_hf_peft(adapter, tmp / "peft")
    return PeftModel.from_pretrained(hf_model, str(peft_dir)).eval()


def _apply_adapter(model, adapter) -> None:
    from nemotune.converters.formats.adapters import load_adapter
    from nemotune.converters.formats.adapters import DEFAULT_VARIANT
    from nemotune.recipes.engine.config import LoraConfig
    from nemotune.recipes.engine.lora import apply_lora, load_adapter_state

    state, config = load_adapter(adapter)
    apply_lora(model, LoraConfig.of({"variant": DEFAULT_VARIANT, **config}))
    load_adapter_state(model, state)
