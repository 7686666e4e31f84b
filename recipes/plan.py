"""`nemotune plan`: per-GPU memory by part and step time of a training config, before a job queues.

The config is composed exactly as `nemotune train` composes it (same Hydra overrides and experiments); nothing
is built or loaded except the model's config.json. The model of memory and time is
nemotune.recipes.engine.plan (its docstring lists every term and assumption).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

HELP_EPILOG = """examples:
  nemotune plan experiment=nano8b_fiqa_lora                          # the experiment's own layout (8 GPUs, DP=8)
  nemotune plan experiment=nano8b_fiqa_lora --gpus 8 --gpu-memory 80GiB   # rank every TP x PP x DP = 8 that fits
  nemotune plan model=nemotron_nano_8b parallel=tp2_sp --gpus 2 --recompute selective
  nemotune plan model=tiny data.pack_size=1024 --device cpu           # a CPU run: peak RSS of the process

Every other argument is a `nemotune train` override (key=value, experiment=<name>)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message otherwise)
        print(f"nemotune plan: {message}; see `nemotune plan --help`", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nemotune plan", description=__doc__, epilog=HELP_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, help="rank the layouts TP x PP x DP = N that fit (with --gpu-memory)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory per GPU: 80GiB, 80GB, 141GiB, ... (default 80GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node (default 8)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    p.add_argument("--gpu-type", default="H100", help="device for the peak FLOP/s: one of "
                   "nemotune.recipes.engine.flops.PEAK_BF16_TFLOPS (default H100)")
    p.add_argument("--recompute", default=None, choices=["none", "selective", "full"],
                   help="activation recompute (default: the config's trainer.recompute)")
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"],
                   help="gpu (bf16, CUDA runtime) or cpu (fp32, the process's RSS)")
    p.add_argument("--doc-tokens", type=int, help="tokens per document inside a sequence, for the attention FLOPs "
                   "(default: one document per sequence)")
    loss = p.add_mutually_exclusive_group()
    loss.add_argument("--chunked-loss", dest="chunked_loss", action="store_true", default=None,
                      help="the loss holds only --loss-chunk-tokens rows of logits at a time")
    loss.add_argument("--whole-logits", dest="chunked_loss", action="store_false",
                      help="the loss holds [tokens x vocab] logits")
    p.add_argument("--loss-chunk-tokens", type=int, default=None)
    p.add_argument("--json", help="also write the plan(s) here (JSON)")
    p.add_argument("overrides", nargs="*", help="nemotune train overrides")
    return p


def _compose(overrides: List[str]):
    from nemotune.recipes.engine.config import compose, experiment_names

    for override in overrides:  # Hydra skips an unknown option of the optional experiment group silently
        key, _, value = override.partition("=")
        if key == "experiment" and value not in experiment_names():
            raise ValueError(f"{override}: no such config conf/experiment/{value}.yaml; use one of "
                             f"{experiment_names()}")
    try:
        return compose("lora_sft", overrides)
    except Exception as err:  # noqa: BLE001 - Hydra / OmegaConf name the key; reduced to one line below
        text = str(err)
        for override in overrides:
            group, _, value = override.partition("=")
            if f"'{group}/{value}'" in text:
                import nemotune.conf

                root = Path(nemotune.conf.__file__).resolve().parent / group
                options = experiment_names() if group == "experiment" else sorted(p.stem for p in root.glob("*.yaml"))
                hint = " or point model.hf_path at a Hugging Face checkpoint" if group == "model" else ""
                raise ValueError(f"{override}: no such config conf/{group}/{value}.yaml; use one of {options}{hint}")
        raise ValueError(f"{type(err).__name__}: {text.splitlines()[0] if text else ''}") from None


def main(argv: Optional[List[str]] = None) -> int:
    from dataclasses import replace

    from nemotune.converters.formats.hf_config import ModelConfigError
    from nemotune.recipes.engine import flops, plan

    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        try:
            device_bytes = plan.parse_memory(args.gpu_memory)
        except ValueError as err:
            raise ValueError(f"--gpu-memory={args.gpu_memory}: {err}") from None
        if args.gpu_type not in flops.PEAK_BF16_TFLOPS:
            raise ValueError(f"--gpu-type={args.gpu_type}: unknown; use one of {sorted(flops.PEAK_BF16_TFLOPS)}")
        for flag, value, low in (("--gpus", args.gpus, 1), ("--doc-tokens", args.doc_tokens, 1),
                                 ("--loss-chunk-tokens", args.loss_chunk_tokens, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag}={value}: must be >= {low}")
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu={args.mfu}: a fraction in (0, 1], e.g. 0.4")
        cfg = _compose(args.overrides)
        extra = dict(mfu=args.mfu, document_tokens=args.doc_tokens)
        if args.recompute:  # else the config's trainer.recompute
            extra["recompute"] = args.recompute
        if args.chunked_loss is not None:
            extra["chunked_loss"] = args.chunked_loss
        if args.loss_chunk_tokens:
            extra["loss_chunk_tokens"] = args.loss_chunk_tokens
        if args.device == "gpu":
            extra["peak_tflops"] = flops.PEAK_BF16_TFLOPS[args.gpu_type]
        try:
            inp = plan.input_from_config(cfg, device=args.device, world=args.gpus, **extra)
        except ModelConfigError as err:
            key = "model.hf_path" if cfg.model.hf_path else "model.hf_config"
            raise ValueError(f"{key}: {err}") from None
        par = cfg.parallel
        model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
        world = args.gpus or int(cfg.cluster.nodes) * int(cfg.cluster.nproc_per_node)
        out = {"config": None, "ranking": None}
        problems = plan.check_layout(inp.hf, inp.layout, inp.micro_batch_size, inp.global_batch_size, inp.seq_length)
        if world % model_parallel:
            problems.insert(0, f"parallel: TP x PP x CP = {model_parallel} does not divide {world} GPU(s); "
                               f"change the layout or --gpus")
        if problems and not args.gpus:
            raise ValueError(problems[0])
        print(f"nemotune plan: model {cfg.model.name} ({inp.hf['num_hidden_layers']} layers, hidden "
              f"{inp.hf['hidden_size']}, vocab {inp.hf['vocab_size']:,}), {world} {args.device.upper()}(s)")
        if not problems:
            config_plan = plan.plan(inp)
            print(plan.format_plan(config_plan, device_bytes if args.device == "gpu" else None))
            out["config"] = _as_dict(config_plan)
        else:
            print(f"the config's own layout is not valid for {world} GPU(s): {problems[0]}")
        if args.gpus:
            fit, over, skipped = plan.rank_layouts(replace(inp, layout=replace(inp.layout, tp=1, pp=1, sp=False)),
                                                   args.gpus, device_bytes, gpus_per_node=args.gpus_per_node)
            print()
            print(plan.format_ranking(fit, over, args.gpus, device_bytes))
            for layout, why in skipped:
                print(f"  {str(layout):<26} skipped: {why}")
            out["ranking"] = [_as_dict(p) for p in fit + over]
        if args.json:
            import json
            import os
            import tempfile

            target = Path(args.json)
            fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=".plan.")
            with os.fdopen(fd, "w") as handle:
                json.dump(out, handle, indent=2)
            os.replace(tmp, target)
    except ValueError as err:
        print(f"nemotune plan: {err}", file=sys.stderr)
        return 2
    return 0


def _as_dict(p) -> dict:
    lay = p.input.layout
    return {"layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "cp": lay.cp, "sp": lay.sp,
                       "distributed_optimizer": lay.distributed_optimizer},
            "stage": p.stage, "parts_bytes": p.parts, "total_bytes": p.total_bytes,
            "trainable_parameters": p.trainable_parameters, "total_parameters": p.total_parameters,
            "step_flops": p.step_flops, "tokens_per_step": p.tokens_per_step, "step_time_s": p.step_time_s,
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu}


if __name__ == "__main__":
    sys.exit(main())
