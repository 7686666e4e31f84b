"""`nemotune export`: a trained model for serving -- a LoRA adapter (HF PEFT, NeMo .nemo LoRA, merged HF) or a
fully fine-tuned model (HF dir, full .nemo). Every output carries the training tokenizer and its chat template.

    python -m nemotune.converters.export hf-peft --adapter RUN/checkpoints/stepN/adapter --out DIR [--base-model NAME]
    python -m nemotune.converters.export nemo    --adapter ADAPTER_DIR --out lora.nemo
    python -m nemotune.converters.export merge   --adapter ADAPTER_DIR --base HF_DIR --out DIR
    python -m nemotune.converters.export hf      --checkpoint RUN/checkpoints/stepN --out DIR
    python -m nemotune.converters.export nemo    --checkpoint RUN/checkpoints/stepN --out model.nemo
"""

from __future__ import annotations

import argparse
import logging

TOKENIZER_HELP = ("dir of the training tokenizer's files (default: the adapter dir's own, else its checkpoint's "
                  "hf/; for --checkpoint, the checkpoint's); its chat template goes into the output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemotune export",
        description="Export a trained model for serving: a LoRA adapter (--adapter) or a fully fine-tuned model "
        "(--checkpoint). Outputs carry the training tokenizer files and chat_template.jinja.",
        epilog="--adapter: <checkpoint>/adapter of a LoRA run (itself an HF PEFT adapter, gathered to TP=1/PP=1 "
        "whatever the training parallelism), the checkpoint dir holding it, or any HF PEFT dir. --checkpoint: a "
        "full-SFT training checkpoint (<run>/checkpoints/stepN), a Megatron checkpoint dir (nemotune convert "
        "hf-to-megatron) or a .nemo.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def out_args(p):
        p.add_argument("--out", required=True, help="output path (must not exist unless --overwrite)")
        p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
        p.add_argument("--overwrite", action="store_true", help="replace an earlier output of nemotune export")

    p = sub.add_parser("hf-peft", help="adapter -> HF PEFT dir: adapter_config.json + adapter_model.safetensors "
                       "+ tokenizer (vLLM --lora-modules, NIM, peft.PeftModel.from_pretrained)")
    p.add_argument("--adapter", required=True, help="adapter dir (training checkpoint's adapter/ or HF PEFT)")
    out_args(p)
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: from training)")
    p = sub.add_parser("nemo", help="--adapter: NeMo 1.x LoRA .nemo (model_config.yaml peft section + "
                       "model_weights.ckpt; TensorRT-LLM / NIM read only its qkv adapter); --checkpoint: a full "
                       ".nemo of the fine-tuned model (model_config.yaml, model_weights/, hf/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter dir: writes a LoRA .nemo")
    source.add_argument("--checkpoint", help="full-model checkpoint: writes a full .nemo")
    out_args(p)
    p = sub.add_parser("merge", help="base HF checkpoint + adapter -> full HF checkpoint (W + alpha/r * B @ A)")
    p.add_argument("--adapter", required=True, help="adapter dir (training checkpoint's adapter/ or HF PEFT)")
    p.add_argument("--base", required=True, help="base HF dir the adapter was trained on")
    out_args(p)
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("hf", help="full-model checkpoint -> HF dir: sharded safetensors + config.json + "
                       "generation_config.json + tokenizer files + chat_template.jinja (transformers, vLLM)")
    p.add_argument("--checkpoint", required=True, help="full-SFT step dir, Megatron checkpoint dir or .nemo")
    out_args(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from nemotune.converters.convert import one_line_errors
    from nemotune.converters.formats import adapters as adapter_io

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def verb() -> int:
        from nemotune.converters import checkpoint

        if args.command == "hf-peft":
            out = adapter_io.export_hf_peft(args.adapter, args.out, base_model_name_or_path=args.base_model,
                                            tokenizer=args.tokenizer, overwrite=args.overwrite)
        elif args.command == "nemo" and args.checkpoint:
            out = checkpoint.export_nemo(args.checkpoint, args.out, tokenizer=args.tokenizer,
                                         overwrite=args.overwrite)
        elif args.command == "nemo":
            out = adapter_io.export_nemo_lora(args.adapter, args.out, tokenizer=args.tokenizer,
                                              overwrite=args.overwrite)
        elif args.command == "hf":
            out = checkpoint.export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer,
                                       max_shard_size=args.max_shard_size, dtype=args.dtype,
                                       overwrite=args.overwrite, progress=not args.no_progress)
        else:
            out = adapter_io.merge_adapter(args.base, args.adapter, args.out, tokenizer=args.tokenizer,
                                           overwrite=args.overwrite, progress=not args.no_progress)
        print(f"wrote {out}")
        return 0

    return one_line_errors(verb)


if __name__ == "__main__":
    raise SystemExit(main())
