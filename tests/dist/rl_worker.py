"""2-rank worker for the RL tests (one torchrun launch: imports cost more than the tiny steps).

argv: <out.json> <prepared dir> <converted base dir> <hf base dir> <run root> <dpo pairs.jsonl>
Writes, from rank 0:
  grpo.dp2        GRPO at TP=1 (2 data-parallel ranks) for LEARN_STEPS steps: per-step loss, reward, KL, ...
  grpo.tp2        the same config at TP=2 for PARITY_STEPS steps, stopped after 2 steps and resumed (a rerun
                  into the same run dir), so it checks the layout and the resume at once
  grpo.pp2        the same at PP=2 for PARITY_STEPS steps
  dpo.dp2, pp2    DPO on the toy pairs at TP=1 and PP=2: per-step preference accuracy, margin, loss
  dpo_split       DPO on pairs built from the rl split (its rows and the first step's metrics)
  three_stage     conf/experiment/tiny_three_stage.yaml, one step per stage: SFT -> SFT -> GRPO
  reference       max |log-prob difference| of the adapter-off model vs the base model alone (and of the
                  adapter-on model vs the base: it must differ, or the check could not fail)
  initial_reference  rl.reference=initial / base from the learned adapter, after the policy moved: the reference's
                  max |log-prob difference| to the starting policy, the base and the current policy
  kv_cache        per layout (TP=1, TP=2, PP=2): the learned policy's greedy and sampled completions with
                  megatron's KV cache and without (tokens, max |logit difference|, whether the cache was used)
"""
import json
import sys
from pathlib import Path

import torch

from checks import tiny_run

from nemotune.recipes.engine import distributed
from nemotune.recipes.rl import compose_rl, train_rl

OUT, PREP, BASE_MCORE, BASE_HF, ROOT, PAIRS = sys.argv[1:7]
ROOT = Path(ROOT)
LEARN_STEPS, PARITY_STEPS = 8, 3
COMMON = [*[o for o in tiny_run(PREP, BASE_MCORE, BASE_HF, steps=LEARN_STEPS)
            if not o.startswith(("trainer.train_split", "trainer.global_batch_size", "trainer.sft.val_check"))],
          "cluster.nproc_per_node=2", "trainer.global_batch_size=2", "trainer.sft.val_check_interval=100",
          "trainer.sft.limit_val_batches=1", "trainer.optim.scheduler=constant", "trainer.optim.warmup_steps=0",
          "trainer.optim.lr=1e-2"]
GRPO = ["rl.grpo.num_generations=4", "rl.grpo.max_new_tokens=6", "rl.grpo.kl_coef=0.02", "rl.grpo.temperature=0.1",
        "rl.grpo.rewards=[{name:'rl_rewards:aligned_tokens'}]"]
LAYOUTS = {"dp2": ["parallel=single"], "tp2": ["parallel=tp2"], "pp2": ["parallel=pp2"]}


def metrics(run_dir: Path) -> dict:
    """{step: row}, the last row of each step winning (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row
    return out


def grpo_overrides(layout: str, steps: int) -> list:
    return [*COMMON, *GRPO, *LAYOUTS[layout], f"trainer.sft.max_steps={steps}"]


def grpo(layout: str, steps: int, extra=()):
    return train_rl(compose_rl([*grpo_overrides(layout, steps), f"run.output_dir={ROOT / ('grpo_' + layout)}",
                                *extra]))


def reference_check(adapter_dir) -> dict:
    from nemotune.recipes.engine.builders import build_base_model, build_lora_model, init_from_config
    from nemotune.recipes.engine.config import hf_config_of
    from nemotune.recipes.engine.rl import adapter_disabled

    cfg = compose_rl([*COMMON, *GRPO, "parallel=single", f"peft.restore_from={adapter_dir}"])
    init_from_config(cfg)  # whole models on each rank (the previous run left a PP=2 layout)
    hf = hf_config_of(cfg)
    tokens = torch.randint(0, hf["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(tokens.shape)

    def logp(model):
        with torch.no_grad():
            return -model(tokens, positions, None, labels=labels, loss_mask=mask).float()

    policy, base = build_lora_model(cfg, hf), build_base_model(cfg, hf)
    with adapter_disabled([policy]):
        off = logp(policy)
    on = logp(policy)
    reference = logp(base)
    return {"adapter_off_vs_base": (off - reference).abs().max().item(),
            "adapter_on_vs_base": (on - reference).abs().max().item()}


def rl_generator(cfg):
    """An RL trainer without optimizer or data: its generation and log-prob passes only."""
    from nemotune.data_prep.tokenizer import load_tokenizer, model_tokenizer
    from nemotune.recipes.engine.builders import build_lora_model, init_from_config
    from nemotune.recipes.engine.config import hf_config_of
    from nemotune.recipes.engine.rl import _RLTrainer

    init_from_config(cfg)
    hf = hf_config_of(cfg)
    return _RLTrainer(tokenizer=load_tokenizer(*model_tokenizer(cfg.model)), cfg=cfg,
                      model=[build_lora_model(cfg, hf)], optimizer=None, scheduler=None,
                      train_samples=[None] * cfg.trainer.global_batch_size, val_samples=[], pad_id=0, seq_length=0,
                      hf_config=hf, run_dir=ROOT / "generator", checkpointer=None, log_metrics=False)


def initial_reference_check(adapter_dir) -> dict:
    """rl.reference=initial vs base for a policy started from an adapter, after the policy moved on (its LoRA
    weights perturbed): max |log-prob difference| of the reference vs the starting policy, vs the base (adapter
    off) and vs the current policy, and of the current policy before vs after a reference pass."""
    import numpy as np

    from nemotune.recipes.engine import batches
    from nemotune.recipes.engine.rl import adapter_disabled, adapter_parameters

    out = {}
    for reference in ("initial", "base"):
        trainer = rl_generator(compose_rl([*COMMON, *GRPO, "parallel=single", f"peft.restore_from={adapter_dir}",
                                           f"rl.reference={reference}"]))
        ids = torch.randint(5, trainer.hf_config["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
        batch = [trainer._collate([batches.Sample(ids.numpy(), np.ones(24, dtype=np.float32), [0])])]
        start = trainer._token_logps(batch, reference=False)[0]
        with torch.no_grad():
            for i, p in enumerate(adapter_parameters(trainer.model)):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        current = trainer._token_logps(batch, reference=False)[0]
        ref = trainer._token_logps(batch, reference=True)[0]
        with adapter_disabled(trainer.model):
            base = trainer._token_logps(batch, reference=False)[0]
        out[reference] = {"vs_start": (ref - start).abs().max().item(), "vs_base": (ref - base).abs().max().item(),
                          "vs_current": (ref - current).abs().max().item(),
                          "current_kept": (trainer._token_logps(batch, reference=False)[0] - current).abs().max().item()}
    return out


def kv_cache_check(layout: str, adapter_dir) -> dict:
    """Generation with the KV cache vs re-running the whole sequence, on the learned (nonzero) adapter, greedy
    and sampled (G = 3 rows that differ), no stop token so every row runs the full length."""
    from nemotune.recipes.engine.rl import sample_tokens, sampling_generator

    generator = rl_generator(compose_rl([*COMMON, *GRPO, *LAYOUTS[layout], f"peft.restore_from={adapter_dir}"]))
    hf = generator.hf_config
    generator.stop_ids = []
    widths, forward = [], generator._next_token_logits

    def counted(tokens, *args):  # how many positions each forward ran: the whole sequence, or one new token
        widths.append(tokens.shape[1])
        return forward(tokens, *args)

    generator._next_token_logits = counted
    prompt = torch.randint(5, hf["vocab_size"], (17,), generator=torch.Generator().manual_seed(3)).tolist()
    out = {}
    for mode, rows in (("greedy", 1), ("sampled", 3)):
        runs = {}
        for cache in (False, True):
            seen, noise = [], sampling_generator(0, 1, 0)

            def choose(logits):
                seen.append(logits.clone())
                return logits.argmax(-1) if mode == "greedy" else sample_tokens(logits, 0.95, noise)

            widths.clear()
            runs[cache] = (generator.generate(prompt, rows, 10, choose, kv_cache=cache)["completions"], seen,
                           list(widths))
        diffs = [(a - b).abs().max().item() for a, b in zip(runs[False][1], runs[True][1])]
        out[mode] = {"tokens": runs[False][0], "cached_tokens": runs[True][0], "widths": runs[False][2],
                     "cached_widths": runs[True][2], "max_logit_diff": max(diffs) if diffs else None,
                     "logit_steps": len(diffs)}
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, out)  # the logits are seen on the last pipeline stage only
    return next(part for part in every if part["greedy"]["logit_steps"])


def main():
    results = {"grpo": {}, "dpo": {}}
    learned = grpo("dp2", LEARN_STEPS)
    grpo("tp2", PARITY_STEPS, ["trainer.stop_after_steps=2"])  # stops at step 2 with a checkpoint ...
    grpo("tp2", PARITY_STEPS)  # ... and the rerun resumes from it
    grpo("pp2", PARITY_STEPS)
    for layout in ("dp2", "pp2"):
        train_rl(compose_rl([*COMMON, *LAYOUTS[layout], "rl.algorithm=dpo", f"rl.dpo.pairs={PAIRS}", "rl.dpo.beta=0.5",
                             "trainer.global_batch_size=4", "trainer.sft.max_epochs=2",
                             f"run.output_dir={ROOT / ('dpo_' + layout)}"]))
    # DPO pairs built from the rl split: the reference answer vs the starting policy's greedy answer
    split_run = ROOT / "dpo_split"
    train_rl(compose_rl([*COMMON, "parallel=single", "rl.algorithm=dpo", "rl.dpo.pairs_split=rl",
                         "rl.dpo.max_new_tokens=4", "trainer.global_batch_size=4", "trainer.sft.max_steps=1",
                         f"run.output_dir={split_run}"]))
    results["kv_cache"] = {layout: kv_cache_check(layout, learned.adapter_dir) for layout in LAYOUTS}
    results["initial_reference"] = initial_reference_check(learned.adapter_dir)
    results["reference"] = reference_check(learned.adapter_dir)
    # the seed recipe end to end (one step per stage): SFT -> SFT -> GRPO, each stage from the previous adapter
    from nemotune.recipes.rl import train_stage
    from nemotune.recipes.two_stage import run_stages

    three = compose_rl(["experiment=tiny_three_stage", *COMMON[:3], "run.tensorboard=false", "peft.lora.dim=8",
                        "cluster.nproc_per_node=2", "trainer.sft.max_steps=1", "trainer.sft.limit_val_batches=1",
                        f"run.output_dir={ROOT / 'three_stage'}"])
    stages = run_stages(three, train=train_stage)
    results["three_stage"] = {"adapters": [str(r.adapter_dir) for r in stages], "steps": [r.steps for r in stages],
                              "finished": [r.finished for r in stages]}
    if distributed.is_rank_zero():
        results["grpo_dp2_overrides"] = grpo_overrides("dp2", LEARN_STEPS)  # the SIGKILL test reruns it alone
        for layout in LAYOUTS:
            results["grpo"][layout] = metrics(ROOT / f"grpo_{layout}")
        results["dpo"] = {layout: metrics(ROOT / f"dpo_{layout}") for layout in ("dp2", "pp2")}
        results["dpo_split"] = {"pairs": [json.loads(line) for line in
                                          (split_run / "dpo_pairs_rl.jsonl").read_text().splitlines()],
                                "metrics": metrics(split_run)}
        # the logged step sequence of the stopped + rerun TP=2 run: [1, 2, 3] when the rerun resumed at step 2
        results["tp2_logged_steps"] = [json.loads(line)["step"] for line in
                                       (ROOT / "grpo_tp2" / "metrics.jsonl").read_text().splitlines()
                                       if "train/loss" in json.loads(line)]
        Path(OUT).write_text(json.dumps(results, indent=2))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
