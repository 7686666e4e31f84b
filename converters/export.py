"""`nemotune export`: a trained LoRA adapter -> HF PEFT (vLLM, NIM, transformers), NeMo .nemo LoRA, or merged HF.

    python -m nemotune.converters.export hf-peft --adapter RUN/checkpoints/last/adapter --out DIR [--base-model NAME]
    python -m nemotune.converters.export nemo    --adapter ADAPTER_DIR --out lora.nemo
    python -m nemotune.converters.export merge   --adapter ADAPTER_DIR --base HF_DIR --out DIR
"""

from __future__ import annotations

import argparse
import logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemotune export",
        description="Export a LoRA adapter saved by training (or an HF PEFT dir) for serving.",
        epilog="The adapter dir is <checkpoint>/adapter (adapter_weights.safetensors + adapter_config.json), "
        "already gathered to TP=1/PP=1 whatever the training parallelism.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p):
        p.add_argument("--adapter", required=True, help="adapter dir (nemotune consolidated or HF PEFT)")
        p.add_argument("--out", required=True, help="output path (must not exist unless --overwrite)")
        p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("hf-peft", help="HF PEFT dir: adapter_config.json + adapter_model.safetensors "
                       "(vLLM --lora-modules, NIM, peft.PeftModel.from_pretrained)")
    common(p)
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: from training)")
    p = sub.add_parser("nemo", help="NeMo 1.x LoRA .nemo (model_config.yaml peft section + model_weights.ckpt); "
                       "TensorRT-LLM / NIM read only its qkv adapter")
    common(p)
    p = sub.add_parser("merge", help="base HF checkpoint + adapter -> full HF checkpoint (W + alpha/r * B @ A)")
    common(p)
    p.add_argument("--base", required=True, help="base HF dir the adapter was trained on")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from nemotune.converters.convert import one_line_errors
    from nemotune.converters.formats import adapters as adapter_io

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def verb() -> int:
        if args.command == "hf-peft":
            out = adapter_io.export_hf_peft(args.adapter, args.out, base_model_name_or_path=args.base_model,
                                            overwrite=args.overwrite)
        elif args.command == "nemo":
            out = adapter_io.export_nemo_lora(args.adapter, args.out, overwrite=args.overwrite)
        else:
            out = adapter_io.merge_adapter(args.base, args.adapter, args.out, overwrite=args.overwrite,
                                           progress=not args.no_progress)
        print(f"wrote {out}")
        return 0

    return one_line_errors(verb)


if __name__ == "__main__":
    raise SystemExit(main())
