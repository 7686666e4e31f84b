"""Write a small random Llama checkpoint in the Hugging Face layout (tests, demos, benches).

The checkpoint is a real ``LlamaForCausalLM`` saved by ``transformers`` (sharded safetensors + index when
``max_shard_size`` is small), so every converter is exercised against the exact files users download.
The vocabulary defaults to 1024 to match the tiny tokenizer shipped in ``data_prep/assets/tiny_tokenizer``,
whose files are copied beside the weights when that tokenizer is available.

    python -m nemotune.converters.tiny_model --out /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

# Llama-3.1's rope scaling; megatron-core implements exactly these constants (factor is configurable).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_llama_config(
    *,
    tie_word_embeddings: bool = False,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 176,
    vocab: int = 1024,
    max_position_embeddings: int = 131072,
    rope_theta: float = 500000.0,
    rope_scaling: dict[str, Any] | None = LLAMA3_ROPE_SCALING,
    rms_norm_eps: float = 1e-5,
    head_dim: int | None = None,
):
    """A ``transformers.LlamaConfig`` for a small Llama (defaults: 2 layers, hidden 64, 4 heads / 2 groups)."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        torch_dtype="float32",
    )
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    return LlamaConfig(**kwargs)


def _tiny_tokenizer_dir() -> Path | None:
    try:
        from nemotune.data_prep.tokenizer import tiny_tokenizer_dir
    except ImportError:
        return None
    path = Path(tiny_tokenizer_dir())
    return path if path.is_dir() else None


def write_tiny_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_size: int | str = "50GB",
    copy_tokenizer: bool = True,
    init_std: float = 0.02,
    **config_kwargs: Any,
) -> Path:
    """Save a seeded random ``LlamaForCausalLM`` (fp32, safetensors) to ``out_dir`` and return the path.

    ``max_shard_size`` (bytes or "500MB") splits the weights into several shards + an index.
    Extra keyword arguments go to :func:`tiny_llama_config` (num_layers, hidden, heads, kv_heads, ffn, vocab,
    tie_word_embeddings, max_position_embeddings, rope_scaling, ...).
    Layer norm weights are randomised too (around 1), so a converter that drops or swaps them is caught.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    config = tiny_llama_config(**config_kwargs)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
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
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=176)
    parser.add_argument("--vocab", type=int, default=1024, help="1024 matches the tiny tokenizer")
    parser.add_argument("--max-position-embeddings", type=int, default=131072, help="131072 like Llama-3.1 (RoPE has no table, so this costs nothing)")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--no-rope-scaling", action="store_true", help="plain RoPE instead of llama3 scaling")
    parser.add_argument("--max-shard-size", default="50GB", help='e.g. "500MB" to get several shards')
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the tiny tokenizer files")
    args = parser.parse_args(argv)
    out = write_tiny_llama(
        args.out,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        copy_tokenizer=not args.no_tokenizer,
        num_layers=args.num_layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        ffn=args.ffn,
        vocab=args.vocab,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        rope_scaling=None if args.no_rope_scaling else LLAMA3_ROPE_SCALING,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
