"""Write a small random Llama checkpoint in the Hugging Face layout (tests, demos, benches).

The checkpoint is a real ``LlamaForCausalLM`` saved by ``transformers`` (sharded safetensors + index when
``max_shard_size`` is small), so every converter is exercised against the exact files users download;
``--family`` (:data:`TINY_FAMILIES`) writes another supported family with its own transformers class.
The vocabulary defaults to 1024 to match the tiny tokenizer shipped in ``data_prep/assets/tiny_tokenizer``,
whose files are copied beside the weights when that tokenizer is available.

    python -m nemotune.converters.tiny_model --out /tmp/tiny-llama
    python -m nemotune.converters.tiny_model --family nemotron --out /tmp/tiny-nemotron
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

# keyword arguments of tiny_llama_config / write_tiny_llama -> the HF config field they set
_SHORT_NAMES = {"num_layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "ffn": "intermediate_size", "vocab": "vocab_size"}


def tiny_hf_config() -> dict[str, Any]:
    """The tiny model's HF config: `hf_config` of conf/model/tiny.yaml, its one definition (2 layers, hidden
    64, 4 heads / 2 query groups, vocab 1024 like the tiny tokenizer, Llama-3.1's RoPE and its llama3 scaling)."""
    import yaml

    import nemotune.conf

    path = Path(nemotune.conf.__file__).resolve().parent / "model" / "tiny.yaml"
    return yaml.safe_load(path.read_text())["hf_config"]


def tiny_llama_config(**overrides: Any):
    """A ``transformers.LlamaConfig`` of the tiny model, with fields changed by ``overrides`` (HF names or
    num_layers, hidden, heads, kv_heads, ffn, vocab; ``rope_scaling=None`` for plain RoPE)."""
    from transformers import LlamaConfig

    values = tiny_hf_config()
    changed = {_SHORT_NAMES.get(key, key): value for key, value in overrides.items()}
    if {"hidden_size", "num_attention_heads"} & set(changed) and changed.get("head_dim") is None:
        changed["head_dim"] = changed.get("hidden_size", values["hidden_size"]) // changed.get(
            "num_attention_heads", values["num_attention_heads"])
    values.update(changed)
    for key in ("architectures", "model_type"):  # set by the model class
        values.pop(key, None)
    if values.get("rope_scaling") is None:
        values.pop("rope_scaling", None)
    return LlamaConfig(**values, bos_token_id=None, eos_token_id=None, pad_token_id=None, torch_dtype="float32")


# The tiny model of each supported family: the tiny Llama's sizes, changed where the family differs, so every
# special case of the family's conversion is exercised (head_dim != hidden / heads, q/k/v bias, q/k norm,
# LayerNorm1P, the gate-less squared-ReLU MLP, partial RoPE, tied embeddings).
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama32": {"tie_word_embeddings": True},                      # Llama 3.2: tied embeddings
    "nano4b": {"head_dim": 32},                                    # Nemotron-Nano-4B: head_dim != hidden / heads
    "mistral": {"architectures": ["MistralForCausalLM"], "head_dim": 32, "rope_scaling": None,
                "rope_theta": 1000000.0, "sliding_window": None},  # Mistral-NeMo: head_dim 128 != 5120 / 32
    # vocab 1032: transformers loads the tiny tokenizer as a Qwen2Tokenizer beside a qwen2 config, which adds
    # <|endoftext|> (1025 ids); real Qwen2.5 embeddings are padded past their tokenizer too (152064 > 151665)
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "head_dim": None, "rope_scaling": None,
              "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 1032},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "rope_scaling": None, "rope_theta": 1000000.0},
    "nemotron": {"architectures": ["NemotronForCausalLM"], "rope_scaling": None, "rope_theta": 10000.0,
                 "partial_rotary_factor": 0.5},
}


def tiny_family_config(family: str, **overrides: Any):
    """The transformers config (its family's own class) of the tiny model of ``family`` (:data:`TINY_FAMILIES`)."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    values = {**TINY_FAMILIES[family], **{_SHORT_NAMES.get(k, k): v for k, v in overrides.items()}}
    architecture = values.pop("architectures", ["LlamaForCausalLM"])[0]
    if architecture == "LlamaForCausalLM":
        return tiny_llama_config(**values)
    base = {k: v for k, v in tiny_hf_config().items() if k not in ("architectures", "model_type")}
    base.update(values)
    rope = {"rope_type": "default", "rope_theta": base.pop("rope_theta")}
    if base.pop("rope_scaling", None):
        raise ValueError("the tiny non-Llama families use plain RoPE")
    if "partial_rotary_factor" in base:
        rope["partial_rotary_factor"] = base.pop("partial_rotary_factor")
    if architecture == "NemotronForCausalLM":  # its config names the epsilon norm_eps and uses relu2
        base["norm_eps"] = base.pop("rms_norm_eps")
    if base.get("head_dim") is None:
        base.pop("head_dim", None)
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    return config_class(**base, rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        torch_dtype="float32")


def _tiny_tokenizer_dir() -> Path | None:
    from nemotune.data_prep.tokenizer import tiny_tokenizer_dir

    path = Path(tiny_tokenizer_dir())
    return path if path.is_dir() else None


def write_tiny_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_size: int | str = "50GB",
    copy_tokenizer: bool = True,
    init_std: float = 0.02,
    family: str = "llama",
    **config_kwargs: Any,
) -> Path:
    """Save a seeded random ``LlamaForCausalLM`` (fp32, safetensors) to ``out_dir`` and return the path;
    ``family`` (:data:`TINY_FAMILIES`) writes the tiny model of another family with its transformers class.

    ``max_shard_size`` (bytes or "500MB") splits the weights into several shards + an index.
    Extra keyword arguments change the tiny model's config (:func:`tiny_llama_config`: num_layers, hidden,
    heads, kv_heads, ffn, vocab, tie_word_embeddings, max_position_embeddings, rope_scaling, ...).
    Layer norm weights (around 1) and every bias are randomised too, so a converter that drops or swaps them
    is caught.
    """
    import torch
    import transformers

    out = Path(out_dir)
    config = tiny_family_config(family, **config_kwargs)
    config.initializer_range = init_std
    model_class = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_class(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    del model
    tok_dir = _tiny_tokenizer_dir() if copy_tokenizer else None
    if tok_dir is not None:
        for item in tok_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemotune.converters.tiny_model",
        description="Write a seeded random Llama checkpoint (HF layout, safetensors) for tests and benches.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="llama", choices=sorted(TINY_FAMILIES),
                        help="the model family (its transformers class); default llama")
    tiny = tiny_hf_config()
    for flag, name in (("--num-layers", "num_layers"), ("--hidden", "hidden"), ("--heads", "heads"),
                       ("--kv-heads", "kv_heads"), ("--ffn", "ffn"), ("--vocab", "vocab"),
                       ("--max-position-embeddings", "max_position_embeddings")):
        parser.add_argument(flag, type=int, default=None,
                            help=f"default {tiny[_SHORT_NAMES.get(name, name)]} (conf/model/tiny.yaml)")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--no-rope-scaling", action="store_true", help="plain RoPE instead of llama3 scaling")
    parser.add_argument("--max-shard-size", default="50GB", help='e.g. "500MB" to get several shards')
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the tiny tokenizer files")
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, name) for name in ("num_layers", "hidden", "heads", "kv_heads", "ffn", "vocab",
                                                         "max_position_embeddings") if getattr(args, name) is not None}
    if args.tie_word_embeddings:
        overrides["tie_word_embeddings"] = True
    if args.no_rope_scaling:
        overrides["rope_scaling"] = None
    out = write_tiny_llama(args.out, seed=args.seed, max_shard_size=args.max_shard_size, family=args.family,
                           copy_tokenizer=not args.no_tokenizer, **overrides)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
