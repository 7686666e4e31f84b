"""`nemotune convert`: checkpoint conversion between HF Llama, Megatron dist checkpoints and NeMo .nemo.

    python -m nemotune.converters.convert hf-to-megatron --hf DIR --out DIR
    python -m nemotune.converters.convert hf-to-nemo     --hf DIR --out FILE.nemo
    python -m nemotune.converters.convert megatron-to-hf --ckpt DIR --out DIR
    python -m nemotune.converters.convert nemo-to-hf     --nemo FILE.nemo --out DIR
    python -m nemotune.converters.convert verify         --hf DIR --ckpt DIR_OR_NEMO [--tolerance 1e-5] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EPILOG = """examples:
  python -m nemotune.converters.convert hf-to-megatron --hf ckpts/Llama-3.1-Nemotron-Nano-8B-v1 --out ckpts/nano-mcore
  python -m nemotune.converters.convert verify --hf ckpts/Llama-3.1-Nemotron-Nano-8B-v1 --ckpt ckpts/nano-mcore
Outputs are written to a temporary sibling and renamed into place only when complete."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemotune convert", description="Convert Llama checkpoints between Hugging Face (safetensors), "
        "Megatron-core dist checkpoints (loadable under any TP/PP) and NeMo 1.x .nemo, and verify them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, *, dtype=True):
        p.add_argument("--out", required=True, help="output path (must not exist unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if dtype:
            p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                           help="parameter dtype (default: the source checkpoint's)")

    p = sub.add_parser("hf-to-megatron", help="HF dir -> Megatron dist checkpoint dir")
    p.add_argument("--hf", required=True, help="HF LlamaForCausalLM dir (config.json + *.safetensors)")
    common(p)
    p = sub.add_parser("hf-to-nemo", help="HF dir -> NeMo 1.x .nemo tarball")
    p.add_argument("--hf", required=True, help="HF LlamaForCausalLM dir (config.json + *.safetensors)")
    common(p)
    for name, arg, what in (("megatron-to-hf", "--ckpt", "Megatron checkpoint dir written by hf-to-megatron"),
                            ("nemo-to-hf", "--nemo", ".nemo file (ours or NeMo's mcore GPT)")):
        p = sub.add_parser(name, help=f"{what} -> HF dir")
        p.add_argument(arg, required=True, dest="source", help=what)
        p.add_argument("--hf-files", default=None,
                       help="dir to copy config/tokenizer files from when the checkpoint carries none")
        p.add_argument("--max-shard-size", default="5GB", help='safetensors shard size, e.g. "5GB", "500MB"')
        common(p)
    p = sub.add_parser("verify", help="compare logits of transformers (HF) and our Megatron model (ckpt)")
    p.add_argument("--hf", required=True, help="HF dir")
    p.add_argument("--ckpt", required=True, help="Megatron checkpoint dir or .nemo")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |logit diff| allowed (fp32), default 1e-5")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", default=None,
                   help="also check a LoRA adapter: Megatron + this adapter vs transformers + its HF PEFT export")
    p.add_argument("--peft", default=None, help="the HF PEFT dir to check (default: exported from --adapter)")
    return parser


def one_line_errors(verb: Callable[[], int]) -> int:
    """Run a converter verb: its exit code, or one `error: ...` line on stderr and exit 2 for refused input."""
    from nemotune.converters.formats.checkpoint import ConversionError

    try:
        return verb()
    except (ConversionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from nemotune.converters import checkpoint

    args = build_parser().parse_args(argv)

    def verb() -> int:
        if _nemotron_h(args):  # NemotronHForCausalLM: the hybrid Mamba-Transformer path
            return _nemotron_h_verb(args)
        if args.command == "verify":
            diff = checkpoint.verify(args.hf, args.ckpt, tolerance=args.tolerance, batch_size=args.batch_size,
                                     seq_len=args.seq_len, seed=args.seed, adapter=args.adapter,
                                     peft_dir=args.peft)
            ok = diff <= args.tolerance
            print(f"max |logit diff| = {diff:.3e} ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:.1e})")
            return 0 if ok else 1
        progress = not args.no_progress
        if args.command == "hf-to-megatron":
            out = checkpoint.hf_to_megatron(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                            progress=progress)
        elif args.command == "hf-to-nemo":
            out = checkpoint.hf_to_nemo(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                        progress=progress)
        else:
            out = checkpoint.megatron_to_hf(args.source, args.out, max_shard_size=args.max_shard_size,
                                            dtype=args.dtype, hf_dir=args.hf_files, overwrite=args.overwrite,
                                            progress=progress)
        print(f"wrote {out}")
        return 0

    return one_line_errors(verb)


def _nemotron_h(args) -> bool:
    from nemotune.converters import nemotron_h

    source = getattr(args, "hf", None) if args.command != "verify" else args.ckpt
    source = source or getattr(args, "source", None)
    return source is not None and nemotron_h.config_of(source) is not None


def _nemotron_h_verb(args) -> int:
    from nemotune.converters import nemotron_h
    from nemotune.converters.formats.checkpoint import ConversionError

    if args.command == "verify":
        diff = nemotron_h.verify(args.hf, args.ckpt, batch_size=args.batch_size, seq_len=args.seq_len,
                                 seed=args.seed, adapter=args.adapter, peft_dir=args.peft)
        ok = diff <= args.tolerance
        print(f"max |logit diff| = {diff:.3e} ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:.1e})")
        return 0 if ok else 1
    if args.command == "hf-to-megatron":
        out = nemotron_h.hf_to_megatron(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                        progress=not args.no_progress)
    elif args.command == "megatron-to-hf":
        out = nemotron_h.megatron_to_hf(args.source, args.out, max_shard_size=args.max_shard_size,
                                        dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    else:
        raise ConversionError(f"{args.command}: not available for Nemotron-H (NemotronHForCausalLM); use "
                              "hf-to-megatron / megatron-to-hf / verify")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
