"""LoRA training throughput on this CPU: our recipe vs transformers + peft, on the same work.

Same work on both sides:
  model     the tiny Llama (`python -m nemotune.converters.tiny_model`): HF weights for the peer, their
            `hf-to-megatron` conversion for ours; fp32 (our CPU default)
  LoRA      rank 8, alpha 16, dropout 0, all-linear (q, k, v, o, gate, up, down; our default `canonical`
            variant has one A/B per HF projection exactly like PEFT), B = 0 at the start
  data      the bundled FiQA sample prepared by `nemotune prep` (packed 1024); global batch 4 packs,
            micro-batch 1, so a step = 4 forward/backward passes of one pack + one optimizer step; the
            same global batches in the same order (nemotune.recipes.engine.batches.global_batch_indices)
  packing   PACKED FOR BOTH: each pack is one sequence with positions restarting at every document.
            Ours masks with its block-diagonal causal mask; transformers (>= 4.54) derives the same
            block-diagonal causal mask from the restarting position_ids when attention_mask is None.
            The step-1 losses (B = 0, same base weights) match, which shows both see the same masks,
            positions and targets.
  loss      answer-only: sum of token cross-entropies with the packs' label-aligned loss_mask over the
            global batch / their count (ours: megatron's calculate_per_token_loss; peer: the same sum by
            hand, accumulated over the micro-batches)
  optimizer Adam(W) lr 3e-3, betas (0.9, 0.98), eps 1e-8, weight decay 0.01, grad-clip 1.0, cosine
            schedule with warmup (ours: megatron's optimizer + OptimizerParamScheduler through
            SupervisedTrainer.train_step; peer: torch.optim.AdamW + clip_grad_norm_ in a plain loop)
Timing: `--steps` steps after `--warmup` steps, start-up (imports, model build, data load) excluded;
`--repeats` repeats, ours and the peer alternating (which goes first alternates) so that load from other
processes on the machine hits both alike; medians reported. Two clocks: wall (tokens/s) and the process's
CPU time (tokens/CPU-s: the work done, robust when other jobs share the cores). 1 torch thread by default
(`--threads`). Tokens = all tokens of the packs (real, unpadded). Ours steps through
`SupervisedTrainer.train_step`, the trainer's own step; its logged train/tokens_per_sec_per_gpu is printed
too.

Then ours on 2 processes (torchrun, gloo, 1 thread each): TP=2 vs DP=2, same global batch.

    python bench/train_cpu.py                       # builds the tiny inputs in --work, ~2-3 min
    python bench/train_cpu.py --no-dist --steps 2 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "TRAIN_CPU_RESULT "


# ---- inputs ----------------------------------------------------------------------------------------

def build_inputs(work: Path) -> dict:
    """The tiny HF model, its Megatron conversion and the prepared sample (reused when already there)."""
    hf, mcore, prep = work / "tiny_hf", work / "tiny_mcore", work / "prep"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    steps = []
    if not (hf / "config.json").is_file():
        steps.append(["nemotune.converters.tiny_model", "--out", str(hf)])
    if not mcore.is_dir():
        steps.append(["nemotune.converters.convert", "hf-to-megatron", "--hf", str(hf), "--out", str(mcore), "--no-progress"])
    if not (prep / "manifest.json").is_file():
        steps.append(["nemotune.data_prep", "data=fiqa_sample", "model=tiny", f"data.output_dir={prep}", "--quiet"])
    for args in steps:
        print(f"[inputs] python -m {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", *args], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return {"hf": hf, "mcore": mcore, "prep": prep}


# ---- ours: the recipe's own setup and SupervisedTrainer.train_step ----------------------------------

class Ours:
    name = "nemotune (megatron-core)"

    def __init__(self, inputs: dict, parallel: str, split: str, run_dir: Path):
        from nemotune.recipes.engine import builders
        from nemotune.recipes.engine.config import compose, hf_config_of, validate
        from nemotune.recipes.engine.trainer import SupervisedTrainer, step_plan

        cfg = compose("lora_sft", ["experiment=tiny_lora", f"parallel={parallel}", f"model.hf_path={inputs['hf']}",
                                   f"model.checkpoint={inputs['mcore']}", f"data.output_dir={inputs['prep']}",
                                   f"trainer.train_split={split}", f"trainer.validation_split={split}",
                                   f"cluster.nproc_per_node={os.environ.get('WORLD_SIZE', '1')}",
                                   "run.tensorboard=false", f"run.output_dir={run_dir}"])
        validate(cfg)
        self.cfg = cfg
        builders.init_from_config(cfg)
        hf = hf_config_of(cfg)
        tokenizer = builders.model_tokenizer(cfg, hf)
        self.pad_id = builders.pad_id_of(tokenizer)
        self.samples = builders.load_samples(cfg, split, tokenizer)
        model = builders.build_lora_model(cfg, hf)
        chunks, optimizer = builders.wrap_for_training(cfg, model)
        scheduler = builders.build_scheduler(cfg, optimizer, step_plan(cfg, len(self.samples)).max_steps)
        self.trainer = SupervisedTrainer(
            cfg=cfg, model=chunks, optimizer=optimizer, scheduler=scheduler, train_samples=self.samples,
            val_samples=self.samples, pad_id=self.pad_id, seq_length=builders.seq_length(cfg), hf_config=hf,
            run_dir=run_dir, checkpointer=None, log_metrics=False)
        for chunk in chunks:
            chunk.train()
        self.global_batch_size = cfg.trainer.global_batch_size
        self.logged = []  # the trainer's own train/tokens_per_sec_per_gpu of every timed step

    def step(self, indices) -> float:
        metrics = self.trainer.train_step(indices)
        self.logged.append(metrics["train/tokens_per_sec_per_gpu"])
        return metrics["train/loss"]


# ---- the peer: transformers + peft in a plain PyTorch loop ------------------------------------------

class TransformersPeft:
    name = "transformers + peft"

    def __init__(self, inputs: dict, ours_cfg, samples, pad_id: int, max_steps: int):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

        lora, optim = ours_cfg.peft.lora, ours_cfg.trainer.optim
        torch.manual_seed(ours_cfg.run.seed)
        base = AutoModelForCausalLM.from_pretrained(str(inputs["hf"]), dtype=torch.float32,
                                                    attn_implementation="sdpa")
        self.model = get_peft_model(base, LoraConfig(r=lora.dim, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(optim.warmup_steps, max_steps - 1),
                                                         max_steps + 1)
        self.clip = ours_cfg.trainer.sft.gradient_clip_val
        self.samples, self.pad_id = samples, pad_id
        self.micro_batch_size = ours_cfg.trainer.micro_batch_size

    def step(self, indices) -> float:
        import torch
        import torch.nn.functional as F

        from nemotune.recipes.engine import batches

        micro = [batches.collate([self.samples[i] for i in indices[k:k + self.micro_batch_size]], self.pad_id)
                 for k in range(0, len(indices), self.micro_batch_size)]
        answer_tokens = sum(float(mb["loss_weights"].sum()) for mb in micro)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for mb in micro:
            # attention_mask=None + restarting position_ids -> transformers builds the block-diagonal mask
            logits = self.model(input_ids=mb["tokens"], position_ids=mb["position_ids"], use_cache=False).logits
            per_token = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="none")
            loss = (per_token * mb["loss_weights"].flatten()).sum() / answer_tokens
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss_sum


# ---- timing ----------------------------------------------------------------------------------------

def batch_plan(num_samples: int, global_batch_size: int, steps: int, seed: int, offset: int = 0):
    from nemotune.recipes.engine import batches

    return [batches.global_batch_indices(num_samples, global_batch_size, (offset + s) * global_batch_size, seed)[0]
            for s in range(steps)]


def barrier():
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def timed(runner, plan, tokens_per_step) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of running `plan` once, whole job.

    CPU seconds are this process's (all its threads; summed over the ranks of a torchrun job): on a
    machine shared with other jobs they count the work done, not the time spent waiting for a core.
    """
    import torch

    barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for indices in plan:
        runner.step(indices)
    cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
    barrier()
    wall = time.perf_counter() - start
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(cpu)
    return sum(tokens_per_step) / wall, sum(tokens_per_step) / float(cpu)


def tokens_of(samples, plan) -> list:
    return [sum(len(samples[i].input_ids) for i in indices) for indices in plan]


def summarize(pairs: list) -> dict:
    walls, cpus = [w for w, _ in pairs], [c for _, c in pairs]
    return {"tokens_per_s": statistics.median(walls), "tokens_per_cpu_s": statistics.median(cpus),
            "all_tokens_per_s": walls, "all_tokens_per_cpu_s": cpus}


def compare_single(args, inputs) -> dict:
    """Ours vs transformers+peft, 1 process, alternating repeats."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_cpu_") as tmp:
        ours = Ours(inputs, "single", args.split, Path(tmp))
        total_steps = args.warmup + args.steps * args.repeats
        peer = TransformersPeft(inputs, ours.cfg, ours.samples, ours.pad_id, max(total_steps, 2))
        gbs, seed = ours.global_batch_size, ours.cfg.run.seed
        # warm-up on the first batches: the step-1 losses compare the two setups (B = 0: the base model's loss)
        warm = batch_plan(len(ours.samples), gbs, max(args.warmup, 1), seed)
        first = {"ours": ours.step(warm[0]), "peer": peer.step(warm[0])}
        for indices in warm[1:]:
            ours.step(indices)
            peer.step(indices)
        plan = batch_plan(len(ours.samples), gbs, args.steps, seed, offset=len(warm))
        tokens = tokens_of(ours.samples, plan)
        rates = {"ours": [], "peer": []}
        logged = []
        for r in range(args.repeats):
            order = (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours))
            for key, runner in order:
                mark = len(ours.logged)
                rates[key].append(timed(runner, plan, tokens))
                if key == "ours":
                    logged.append(statistics.median(ours.logged[mark:]))
            (ow, oc), (pw, pc) = rates["ours"][-1], rates["peer"][-1]
            print(f"  repeat {r + 1}/{args.repeats}: tokens/s ours {ow:7.0f} peer {pw:7.0f} ratio {ow / pw:.3f} | "
                  f"tokens/CPU-s ours {oc:7.0f} peer {pc:7.0f} ratio {oc / pc:.3f}", flush=True)
    result = {"ours": summarize(rates["ours"]), "peer": summarize(rates["peer"]),
              "ratio_wall": [o[0] / p[0] for o, p in zip(rates["ours"], rates["peer"])],
              "ratio_cpu": [o[1] / p[1] for o, p in zip(rates["ours"], rates["peer"])],
              "ours_logged_tokens_per_s_median": statistics.median(logged),
              "step1_loss": first, "tokens_per_step": statistics.mean(tokens), "threads": args.threads}
    result["ratio_wall_median"] = statistics.median(result["ratio_wall"])
    result["ratio_cpu_median"] = statistics.median(result["ratio_cpu"])
    return result


def profile_single(args, inputs) -> None:
    """torch.profiler over `--steps` steps of each side (after warm-up): the ops that dominate."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_cpu_") as tmp:
        ours = Ours(inputs, "single", args.split, Path(tmp))
        peer = TransformersPeft(inputs, ours.cfg, ours.samples, ours.pad_id, args.warmup + args.steps + 1)
        warm = batch_plan(len(ours.samples), ours.global_batch_size, max(args.warmup, 1), ours.cfg.run.seed)
        plan = batch_plan(len(ours.samples), ours.global_batch_size, args.steps, ours.cfg.run.seed, len(warm))
        for name, runner in (("ours", ours), ("transformers + peft", peer)):
            for indices in warm:
                runner.step(indices)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for indices in plan:
                    runner.step(indices)
            print(f"\n== {name}: {args.steps} steps, {args.threads} thread(s), ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))


def worker(args) -> None:
    """One rank of a torchrun job: ours at --parallel, rank 0 prints the result line."""
    import torch

    from nemotune.recipes.engine import distributed

    torch.set_num_threads(args.threads)
    inputs = {"hf": Path(args.hf), "mcore": Path(args.mcore), "prep": Path(args.prep)}
    with tempfile.TemporaryDirectory(prefix="bench_train_cpu_") as tmp:
        ours = Ours(inputs, args.parallel, args.split, Path(tmp))
        gbs, seed = ours.global_batch_size, ours.cfg.run.seed
        warm = batch_plan(len(ours.samples), gbs, max(args.warmup, 1), seed)
        for indices in warm:
            ours.step(indices)
        plan = batch_plan(len(ours.samples), gbs, args.steps, seed, offset=len(warm))
        tokens = tokens_of(ours.samples, plan)
        rates = [timed(ours, plan, tokens) for _ in range(args.repeats)]
    world = distributed.world_size()
    if distributed.is_rank_zero():
        print(RESULT_TAG + json.dumps({"parallel": args.parallel, "world": world, **summarize(rates)}), flush=True)
    distributed.destroy_distributed()


def run_two_process(args, inputs, parallel: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", "--max_restarts", "0", str(Path(__file__).resolve()),
           "--worker", "--parallel", parallel, "--hf", str(inputs["hf"]), "--mcore", str(inputs["mcore"]),
           "--prep", str(inputs["prep"]), "--split", args.split, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in result.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{parallel} run failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nemotune-bench-train-cpu"),
                        help="where the tiny inputs are built (reused across runs)")
    parser.add_argument("--hf", help="existing tiny HF model dir (else built in --work)")
    parser.add_argument("--mcore", help="its hf-to-megatron conversion")
    parser.add_argument("--prep", help="its prepared data (packed)")
    parser.add_argument("--split", default="train", help="prepared split to train on")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the 1-process comparison (1: robust on a shared machine)")
    parser.add_argument("--no-dist", action="store_true", help="skip the 2-process TP=2 / DP=2 runs")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler tables of both sides over --steps steps")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    command = "python bench/train_cpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.hf and args.mcore and args.prep:
        inputs = {"hf": Path(args.hf), "mcore": Path(args.mcore), "prep": Path(args.prep)}
    else:
        inputs = build_inputs(Path(args.work))
    if args.profile:
        profile_single(args, inputs)
        return 0
    print(f"[1 process, {args.threads} thread(s)] {args.repeats} repeats x {args.steps} steps after "
          f"{args.warmup} warm-up; global batch 4 packs of <= 1024 tokens", flush=True)
    results = {"command": command, "date": time.strftime("%Y-%m-%d"), "single": compare_single(args, inputs)}
    if not args.no_dist:
        for parallel in ("tp2", "dp2"):
            print(f"[2 processes, 1 thread each] ours {parallel} ...", flush=True)
            results[parallel] = run_two_process(args, inputs, parallel)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def print_report(results: dict) -> None:
    single = results["single"]
    print()
    print(f"step-1 loss (B = 0): ours {single['step1_loss']['ours']:.6f} | transformers+peft "
          f"{single['step1_loss']['peer']:.6f}")
    print(f"{'setup':<40} {'tokens/s':>10} {'tokens/CPU-s':>13}   (medians)")
    rows = [("ours, 1 process", single["ours"]), ("transformers + peft, 1 process", single["peer"])]
    rows += [(f"ours, 2 processes {p.upper()[:2]}=2", results[p]) for p in ("tp2", "dp2") if p in results]
    for name, r in rows:
        print(f"{name:<40} {r['tokens_per_s']:10,.0f} {r['tokens_per_cpu_s']:13,.0f}")
    print(f"{'(ours, trainer-logged tokens/s/GPU)':<40} {single['ours_logged_tokens_per_s_median']:10,.0f}")
    print(f"ratio ours / transformers+peft (target >= 1.0): wall {single['ratio_wall_median']:.3f} "
          f"[{', '.join(f'{r:.2f}' for r in single['ratio_wall'])}], CPU time {single['ratio_cpu_median']:.3f} "
          f"[{', '.join(f'{r:.2f}' for r in single['ratio_cpu'])}]")
    if "tp2" in results and "dp2" in results:
        print(f"ratio DP=2 / TP=2: wall {results['dp2']['tokens_per_s'] / results['tp2']['tokens_per_s']:.3f}, "
              f"CPU time {results['dp2']['tokens_per_cpu_s'] / results['tp2']['tokens_per_cpu_s']:.3f}")
    print(f"reproduce: {results['command']}")


if __name__ == "__main__":
    sys.exit(main())
