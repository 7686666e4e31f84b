"""RL after SFT on megatron-core: GRPO on the prepared `rl` split, or DPO on preference pairs, with the LoRA policy.

    nemotune rl experiment=<name> key=value ...            (or: python -m nemotune.recipes.rl ...)
    nemotune rl --validate-only ...                        data and config checks, no weights loaded
    torchrun --nproc_per_node 2 -m nemotune.recipes.rl parallel=tp2 ...

validate config, rewards and data -> init distributed -> tokenizer -> prompts (GRPO: the split's chat
messages through the chat template) or pairs (DPO: JSONL through the chat template, answer-only masks) ->
model (+ base weights) -> LoRA (peft.restore_from: the SFT adapter to start from) -> DDP + optimizer + LR
schedule -> GRPOTrainer / DPOTrainer .fit() (the SupervisedTrainer's loop, checkpoints and resume) ->
the consolidated adapter that `nemotune export` reads, as after SFT.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

HELP = """usage: nemotune rl [experiment=<name>] [key=value ...] [--validate-only]

RL after SFT with the LoRA policy on megatron-core (conf/rl.yaml: the SFT groups plus `rl`).
  rl.algorithm=grpo   prompts from trainer.train_split (default rl) of data.output_dir; G = rl.grpo.num_generations
                      completions per prompt sampled from the current policy (rl.grpo.temperature, top_p,
                      max_new_tokens); rewards rl.grpo.rewards=[{name: rouge_l, weight: 1.0}, ...] from
                      rouge_l, semantic, length_match, think_format or 'package.module:function';
                      group-normalised advantages, PPO-clipped token loss (rl.grpo.clip_eps), KL to the
                      reference (rl.grpo.kl_coef), rl.grpo.steps_per_rollout updates per rollout.
  rl.algorithm=dpo    pairs from rl.dpo.pairs (JSONL: prompt or messages, chosen, rejected), rl.dpo.beta,
                      rl.dpo.label_smoothing, log-ratios to the reference.
  rl.reference        initial (default): the policy RL starts from (the peft.restore_from adapter, or the base
                      without one); base: the adapter switched off (the KL then also pulls towards the base).
Start from an SFT adapter with peft.restore_from=<SFT run dir, checkpoint or adapter>. trainer.global_batch_size
counts prompts (GRPO) or pairs (DPO) per step; trainer.sft.max_steps / max_epochs, optim, checkpoints and
resume are as in `nemotune train`.
  --validate-only  check the config, the rewards and the data (prompts / pairs) without loading weights
  --cfg            print the composed config and exit
  -h, --help       this help
"""
VERB = "nemotune rl"


def compose_rl(overrides: List[str]) -> DictConfig:
    from nemotune.recipes.engine.config import ConfigError, RLRunConfig, check_overrides, compose

    problems = check_overrides(overrides, schema=RLRunConfig, verb=VERB)
    if problems:
        raise ConfigError(problems)
    return compose("rl", overrides)


def check(cfg: DictConfig, overrides: List[str]) -> None:
    """Every config, reward and data problem at once (ConfigError), before any process group or weights."""
    from nemotune.recipes.engine.config import ConfigError, rl_data_problems, rl_problems, validate

    from nemotune.recipes.engine.config import apply_overrides

    problems: List[str] = []
    stages = [(None, cfg)] if not cfg.stages else \
        [(stage.name, apply_overrides(cfg, dict(stage.overrides))) for stage in cfg.stages]
    for name, stage_cfg in stages:
        found: List[str] = []
        try:
            validate(stage_cfg)
        except ConfigError as err:
            found += err.problems
        found += rl_problems(stage_cfg)
        problems += [p if name is None else f"stages[{name}]: {p}" for p in found if p not in problems]
    problems += rl_data_problems(cfg, overrides)
    if problems:
        raise ConfigError(problems)


def train_rl(cfg: DictConfig, *, run_dir: Optional[Path] = None, stage: str = "rl", step_offset: int = 0):
    """The RL story, top to bottom (see the module docstring); returns lora_sft.TrainResult."""
    import torch

    from nemotune.data_prep import formats
    from nemotune.recipes.engine import distributed
    from nemotune.recipes.engine.builders import (adapter_config, build_lora_model, build_scheduler,
                                                  data_fingerprint, init_from_config, load_samples,
                                                  model_tokenizer, pad_id_of, wrap_for_training)
    from nemotune.recipes.engine.checkpointing import Checkpointer, complete_checkpoints
    from nemotune.recipes.engine.config import hf_config_of
    from nemotune.recipes.engine.preemption import PreemptionHandler
    from nemotune.recipes.engine.rewards import Rewards
    from nemotune.recipes.engine.rl import DPOTrainer, GRPOTrainer, load_pairs, load_prompts
    from nemotune.recipes.engine.trainer import step_plan
    from nemotune.recipes.lora_sft import TrainResult, base_reference, prepare_run_dir

    run_dir = Path(run_dir or cfg.run.output_dir)
    algorithm = cfg.rl.algorithm
    # 1. distributed (nccl on GPU, gloo on CPU) and megatron's parallel state; the run dir is ours alone
    init_from_config(cfg)
    lock = prepare_run_dir(cfg, run_dir)
    try:
        # 2. tokenizer; validation examples (answer-token loss, as SFT) and the prompts or pairs
        hf = hf_config_of(cfg)
        tokenizer = model_tokenizer(cfg, hf)
        val_samples = load_samples(cfg, cfg.trainer.validation_split, tokenizer)
        pairs_file = Path(cfg.rl.dpo.pairs) if cfg.rl.dpo.pairs else None
        if algorithm == "grpo":
            train_items = load_prompts(formats.messages_path(cfg.data.output_dir, cfg.trainer.train_split), tokenizer,
                                       cfg.rl.grpo.thinking)
        elif pairs_file is not None:
            train_items = load_pairs(str(pairs_file), tokenizer)
        else:  # pairs of a split: its prompts now, their pairs once the starting policy has answered them
            train_items = load_prompts(formats.messages_path(cfg.data.output_dir, cfg.rl.dpo.pairs_split), tokenizer)
            pairs_file = run_dir / f"dpo_pairs_{cfg.rl.dpo.pairs_split}.jsonl"
        step_plan(cfg, len(train_items))  # enough prompts or pairs for one global batch, before any weights load
        # 3. model: base weights frozen, LoRA adapters trainable (from the SFT adapter with peft.restore_from)
        model = build_lora_model(cfg, hf)
        # 4. DDP, optimizer
        model_chunks, optimizer = wrap_for_training(cfg, model)
        checkpointer = Checkpointer(run_dir / "checkpoints", adapter_config=adapter_config(cfg, hf),
                                    base_reference=base_reference(cfg, run_dir), save_top_k=cfg.trainer.save_top_k,
                                    resume=cfg.run.resume_if_exists, resume_from=cfg.run.resume_from,
                                    hf_config=hf, hf_path=cfg.model.hf_path, tokenizer=tokenizer)
        common = dict(cfg=cfg, model=model_chunks, optimizer=optimizer, val_samples=val_samples,
                      pad_id=pad_id_of(tokenizer), hf_config=hf, run_dir=run_dir, checkpointer=checkpointer,
                      stage=stage, step_offset=step_offset, tokenizer=tokenizer)
        if algorithm == "dpo" and not cfg.rl.dpo.pairs:
            train_items = split_pairs(cfg, common, train_items, pairs_file, tokenizer)
        # pipeline micro-batches share one shape: the longest prompt + completion, pair or validation example
        longest = max(len(p.ids) for p in train_items) + cfg.rl.grpo.max_new_tokens if algorithm == "grpo" else \
            max(len(s.input_ids) for pair in train_items for s in pair)
        seq_len = max([longest] + [len(s.input_ids) for s in val_samples])
        plan = step_plan(cfg, len(train_items))
        fingerprint = data_fingerprint(cfg, cfg.trainer.train_split) if algorithm == "grpo" else \
            _file_sha256(pairs_file)
        common.update(scheduler=build_scheduler(cfg, optimizer, plan.max_steps), train_samples=train_items,
                      seq_length=seq_len, preemption=PreemptionHandler(), data_fingerprint=fingerprint)
        if algorithm == "grpo":
            trainer = GRPOTrainer(prompts=train_items, grpo=cfg.rl.grpo,
                                  rewards=Rewards(OmegaConf.to_container(cfg.rl.grpo.rewards, resolve=True)), **common)
        else:
            trainer = DPOTrainer(dpo=cfg.rl.dpo, **common)
        trainer.restore()  # a refused resume stops here, before anything in the run dir changes
        if distributed.is_rank_zero():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        what = "prompts" if algorithm == "grpo" else "pairs"
        distributed.print_rank_zero(
            f"[{stage}] {algorithm}: {len(train_items)} {what} / {len(val_samples)} validation samples, "
            f"{trainer.max_steps} steps of {cfg.trainer.global_batch_size} {what}"
            + (f" x {cfg.rl.grpo.num_generations} completions" if algorithm == "grpo" else "")
            + f", run dir {run_dir}")
        # 5. train
        state = trainer.fit()
        torch.distributed.barrier()
    finally:
        if lock is not None:
            lock.release()
    done = complete_checkpoints(run_dir / "checkpoints")
    last = done[-1] if done else None
    return TrainResult(run_dir=run_dir, checkpoint=last, adapter_dir=(last / "adapter") if last else None,
                       steps=state.step, finished=trainer.finished, last_val_loss=state.last_val_loss)


def split_pairs(cfg: DictConfig, common: dict, prompts: list, pairs_file: Path, tokenizer) -> list:
    """DPO pairs of rl.dpo.pairs_split: chosen = the reference answer, rejected = the starting policy's greedy answer.
    Generated once into the run dir (rank 0 writes it atomically) and read back by every rank; a rerun or a
    resume reuses the file, so the pairs and their order never change within a run."""
    import torch

    from nemotune.recipes.engine import distributed
    from nemotune.recipes.engine.rl import DPOTrainer, load_pairs, write_split_pairs

    if not pairs_file.is_file():
        answerer = DPOTrainer(dpo=cfg.rl.dpo, scheduler=None, train_samples=prompts, seq_length=0, log_metrics=False,
                              **common)
        answers = answerer.greedy_answers(prompts, cfg.rl.dpo.max_new_tokens)
        if distributed.is_rank_zero():
            written, left_out = write_split_pairs(pairs_file, prompts, answers)
            distributed.print_rank_zero(f"rl.dpo.pairs_split={cfg.rl.dpo.pairs_split}: {written} pairs (reference vs "
                                        f"the model's greedy answer) in {pairs_file}; {left_out} left out (empty or "
                                        f"equal answers)")
        torch.distributed.barrier()
    return load_pairs(str(pairs_file), tokenizer)


def train_stage(cfg: DictConfig, *, run_dir: Optional[Path] = None, stage: Optional[str] = None,
                step_offset: int = 0):
    """One stage of a multi-stage experiment, or the one run (no run_dir / stage): supervised (rl.algorithm=sft,
    `nemotune train`'s loop) or RL."""
    if cfg.rl.algorithm == "sft":
        from nemotune.recipes.lora_sft import train

        return train(cfg, run_dir=run_dir, stage=stage or "sft", step_offset=step_offset)
    return train_rl(cfg, run_dir=run_dir, stage=stage or "rl", step_offset=step_offset)


def _file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    from nemotune.recipes.engine.config import hydra_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    validate_only = "--validate-only" in argv
    parsed = hydra_cli([a for a in argv if a != "--validate-only"], HELP)
    if parsed is None:
        return 0
    print_cfg, overrides = parsed
    from nemotune.recipes.lora_sft import run_reporting, train_stages_or_one

    def run() -> int:
        cfg = compose_rl(overrides)
        if print_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        check(cfg, overrides)
        if validate_only:
            print(f"{VERB}: configuration, rewards and data are valid ({cfg.rl.algorithm}, "
                  f"data {cfg.data.output_dir}, split {cfg.trainer.train_split}); no weights were loaded")
            return 0
        return train_stages_or_one(cfg, train_stage)

    return run_reporting(VERB, run)


if __name__ == "__main__":
    sys.exit(main())
