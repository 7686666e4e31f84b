"""SupervisedTrainer: NeMo-Aligner's SFT loop contract on megatron-core schedules.

Keeps `trainer.sft.{max_epochs, max_steps, val_check_interval, save_interval, limit_val_batches,
gradient_clip_val}`, validation at the interval and at the last step, top-k checkpoints by `val_loss`
plus the last, and resume with `step`, `consumed_samples`, `epoch`. One global batch per step through
megatron's `get_forward_backward_func` (so pipeline parallelism works with micro-batches); the loss is
the sum over answer tokens of the whole global batch divided by their count (`calculate_per_token_loss`),
so packing, DP and PP leave it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from nemotune.recipes.engine import batches, distributed, flops
from nemotune.recipes.engine.checkpointing import Checkpointer
from nemotune.recipes.engine.megatron_cpu import on_gpu


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    epoch: int = 0
    best_val_loss: float = math.inf
    last_val_loss: Optional[float] = None
    history: List[dict] = field(default_factory=list)


@dataclass(frozen=True)
class StepPlan:
    """How many steps, and every how many steps to validate and save: a function of the config and the
    number of training samples only."""
    steps_per_epoch: int
    max_steps: int
    val_interval: int
    save_interval: int


def plan_steps(num_train_samples: int, global_batch_size: int, max_epochs: int, max_steps: int,
               val_check_interval: float, save_interval: int) -> StepPlan:
    """`trainer.sft` (NeMo-Aligner's meaning) -> StepPlan. max_steps <= 0 means "the epochs decide";
    val_check_interval > 1 counts steps, <= 1 is a fraction of an epoch; save_interval <= 0 follows it."""
    steps_per_epoch = num_train_samples // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_train_samples} training samples cannot fill one global batch of "
                         f"{global_batch_size}; lower trainer.global_batch_size")
    epoch_steps = max_epochs * steps_per_epoch if max_epochs > 0 else math.inf
    horizon = int(min(max_steps if max_steps > 0 else math.inf, epoch_steps))
    vci = val_check_interval
    val_interval = max(1, int(vci) if vci > 1 else int(round(vci * steps_per_epoch)))
    return StepPlan(steps_per_epoch, horizon, val_interval, save_interval if save_interval > 0 else val_interval)


def step_plan(cfg, num_train_samples: int) -> StepPlan:
    sft = cfg.trainer.sft
    return plan_steps(num_train_samples, cfg.trainer.global_batch_size, sft.max_epochs, sft.max_steps,
                      sft.val_check_interval, sft.save_interval)


@dataclass(frozen=True)
class Progress:
    """What to do after a step: validate, save, stop (and why it stops)."""
    validate: bool
    save: bool
    stop: bool
    reason: str = ""  # "max_steps" | "preempted" | "stop_after_steps" | ""


def check_progress(*, step: int, max_steps: int, val_interval: int, save_interval: int,
                   steps_this_process: int = 0, stop_after_steps: int = -1, preempted: bool = False) -> Progress:
    """The decision after `step` (1-based, just trained), as NeMo-Aligner's `check_progress`: validate at
    every `val_interval` and at the last step; save at every `save_interval`, at the last step and before
    an interruption (preemption, `stop_after_steps`); stop at `max_steps` or on an interruption."""
    last = step >= max_steps
    interrupted = preempted or 0 < stop_after_steps <= steps_this_process
    reason = "max_steps" if last else "preempted" if preempted else "stop_after_steps" if interrupted else ""
    return Progress(validate=step % val_interval == 0 or last,
                    save=step % save_interval == 0 or last or interrupted,
                    stop=last or interrupted, reason=reason)


# the config keys that shape the LR schedule: on resume a change is followed (the schedule is rebuilt from the
# config, megatron's override_opt_param_scheduler) and stated in one line
SCHEDULE_KEYS = ("trainer.sft.max_steps", "trainer.sft.max_epochs", "trainer.optim.lr", "trainer.optim.min_lr",
                 "trainer.optim.warmup_steps", "trainer.optim.scheduler")
# the ones that fix which samples each step sees: a change would skip or repeat data, so resume refuses it
DATA_ORDER_KEYS = ("run.seed", "trainer.global_batch_size", "trainer.train_split", "data.packing",
                   "train data (sha256 of the prepared split)", "train samples")


class ResumeRefused(ValueError):
    """A checkpoint this config cannot continue without skipping or repeating data."""


def resume_changes(saved: dict, current: dict, *, ckpt: str, stage: str, max_steps: int, step: int) -> list[str]:
    """The schedule changes since `saved` (one line to print, or none); raises ResumeRefused for a change of
    the data order. `saved` / `current` map the keys of SCHEDULE_KEYS and DATA_ORDER_KEYS to values (a
    key absent from `saved`, e.g. a checkpoint of an older version, is not compared)."""
    for key in DATA_ORDER_KEYS:
        if key in saved and saved[key] is not None and current.get(key) != saved[key]:
            raise ResumeRefused(
                f"{ckpt}: this run was trained with {key}={_short(saved[key])} and the config now says "
                f"{_short(current.get(key))}, which changes the data order (samples would be skipped or repeated); "
                f"resume with {key}={_short(saved[key])}, or start a new run with another run.output_dir")
    changed = [f"{key} {_short(saved[key])} -> {_short(current.get(key))}" for key in SCHEDULE_KEYS
               if key in saved and current.get(key) != saved[key]]
    if not changed:
        return []
    prefix = f"resume ({stage}): " if stage != "sft" else "resume: "
    if step >= max_steps:
        return [prefix + ", ".join(changed) + f": the run is already at step {step} of {max_steps}; nothing to train"]
    return [prefix + ", ".join(changed) + f": the {current.get('trainer.optim.scheduler')} schedule now ends at "
            f"step {max_steps} (lr {current.get('trainer.optim.lr'):g}, warmup "
            f"{current.get('trainer.optim.warmup_steps')}, min_lr {current.get('trainer.optim.min_lr'):g}), "
            f"continuing from step {step}"]


def _short(value):
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


class MetricsLogger:
    """Rank 0: one fixed-format line per step, and the same dict to metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, stage: str, step_offset: int, tensorboard: bool):
        self.enabled = distributed.is_rank_zero()
        self.stage, self.step_offset = stage, step_offset
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.writer = SummaryWriter(str(run_dir / "tensorboard"))
                except Exception:  # tensorboard is optional at run time
                    self.writer = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "global_step": step + self.step_offset, "stage": self.stage, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, step + self.step_offset)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def format_step_line(step: int, max_steps: int, m: dict) -> str:
    mfu = m.get("train/mfu")
    return ("step {:>6d}/{:<6d} | loss {:.6f} | lr {:.3e} | grad_norm {:.4f} | {:8.1f} ms/step | "
            "{:9.1f} tokens/s/GPU | MFU {} | mem {:.2f} GiB").format(
        step, max_steps, m["train/loss"], m["train/lr"], m["train/grad_norm"], m["train/step_time"] * 1e3,
        m["train/tokens_per_sec_per_gpu"], "n/a" if mfu is None else f"{100 * mfu:5.2f}%",
        m["train/peak_mem_gib"])


def _peak_memory_gib() -> float:
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SupervisedTrainer:
    def __init__(self, *, cfg, model: list, optimizer, scheduler, train_samples: Sequence[batches.Sample],
                 val_samples: Sequence[batches.Sample], pad_id: int, seq_length: int, hf_config: dict,
                 run_dir: Path, checkpointer: Checkpointer, stage: str = "sft", step_offset: int = 0,
                 preemption=None, use_packed_seq_params: bool = False, log_metrics: bool = True,
                 data_fingerprint: Optional[str] = None):
        from megatron.core import parallel_state

        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.train_samples, self.val_samples = train_samples, val_samples
        self.pad_id, self.seq_length, self.hf_config = pad_id, seq_length, hf_config
        self.run_dir, self.checkpointer, self.stage = Path(run_dir), checkpointer, stage
        self.preemption = preemption
        self.data_fingerprint = data_fingerprint
        self.use_packed_seq_params = use_packed_seq_params
        self.state = TrainerState()
        tr = cfg.trainer
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.micro_batch_size, self.global_batch_size = tr.micro_batch_size, tr.global_batch_size
        self.num_microbatches = self.global_batch_size // (self.micro_batch_size * self.dp_size)
        self.plan = step_plan(cfg, len(train_samples))
        self.steps_per_epoch, self.max_steps = self.plan.steps_per_epoch, self.plan.max_steps
        self.val_interval, self.save_interval = self.plan.val_interval, self.plan.save_interval
        self.resume_notes: List[str] = []
        self._restored, self.resumed_from = False, None
        self.pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self.seq_multiple = parallel_state.get_tensor_model_parallel_world_size() \
            if cfg.parallel.sequence_parallel else 1
        self.logger = MetricsLogger(self.run_dir, stage, step_offset, cfg.run.tensorboard) if log_metrics else None
        self.peak_flops = flops.device_peak_flops()

    # ---- state: what a checkpoint holds of the trainer ---------------------------------------------
    def schedule_and_data_order(self) -> dict:
        """The config values a resume compares (trainer.SCHEDULE_KEYS and DATA_ORDER_KEYS)."""
        cfg = self.cfg
        return {"trainer.sft.max_steps": cfg.trainer.sft.max_steps, "trainer.sft.max_epochs": cfg.trainer.sft.max_epochs,
                "trainer.optim.lr": cfg.trainer.optim.lr, "trainer.optim.min_lr": cfg.trainer.optim.min_lr,
                "trainer.optim.warmup_steps": cfg.trainer.optim.warmup_steps,
                "trainer.optim.scheduler": cfg.trainer.optim.scheduler, "run.seed": cfg.run.seed,
                "trainer.global_batch_size": self.global_batch_size, "trainer.train_split": cfg.trainer.train_split,
                "data.packing": bool(cfg.data.packing), "train samples": len(self.train_samples),
                "train data (sha256 of the prepared split)": self.data_fingerprint}

    def state_dict(self) -> dict:
        """Progress, schedule and the config values that resume checks (JSON-serialisable)."""
        state = self.state
        return {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "epoch": state.epoch,
            "val_loss": state.last_val_loss,
            "best_val_loss": None if state.best_val_loss == math.inf else state.best_val_loss,
            "stage": self.stage,
            "peft_scheme": self.cfg.peft.peft_scheme,
            "world_size": distributed.world_size(),
            "max_steps": self.max_steps,
            "scheduler": self.scheduler.state_dict(),
            "config": self.schedule_and_data_order(),
            "data_order": {"seed": self.cfg.run.seed, "global_batch_size": self.global_batch_size,
                           "num_train_samples": len(self.train_samples)},
        }

    def load_state_dict(self, payload: dict, *, source: str = "checkpoint") -> None:
        """Restore progress from `state_dict()`'s output. The LR schedule follows this trainer's config (only
        its step count comes from the checkpoint); a changed schedule is noted in `resume_notes`, a changed
        data order raises ResumeRefused."""
        saved = dict(payload.get("config") or {})
        order = payload.get("data_order") or {}
        saved.setdefault("run.seed", order.get("seed"))
        saved.setdefault("trainer.global_batch_size", order.get("global_batch_size"))
        saved.setdefault("train samples", order.get("num_train_samples"))
        self.resume_notes = resume_changes(saved, self.schedule_and_data_order(), ckpt=source, stage=self.stage,
                                           max_steps=self.max_steps, step=payload["step"])
        self.scheduler.num_steps = 0  # megatron's load_state_dict steps forward by the saved count
        self.scheduler.load_state_dict(payload["scheduler"])
        state = self.state
        state.step = payload["step"]
        state.consumed_samples = payload["consumed_samples"]
        state.epoch = payload["epoch"]
        state.last_val_loss = payload.get("val_loss")
        if payload.get("best_val_loss") is not None:
            state.best_val_loss = payload["best_val_loss"]

    @property
    def full_parameter(self) -> bool:
        """Full-parameter SFT (peft.peft_scheme=none): every weight trains and is checkpointed."""
        return self.cfg.peft.peft_scheme == "none"

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict:
        """The trainable weights (LoRA: the adapters; full SFT: the whole model, keys under `model.`) and the
        optimizer state in megatron's dist_checkpointing form (any TP/PP/DP reloads it)."""
        from nemotune.recipes.engine.checkpointing import (adapter_sharded_state_dict, model_sharded_state_dict,
                                                           optimizer_state_to_load_into, sharding_metadata)

        sharded = model_sharded_state_dict(self.model) if self.full_parameter else \
            adapter_sharded_state_dict(self.model)
        with optimizer_state_to_load_into(self.optimizer) if is_loading else contextlib.nullcontext():
            optimizer = self.optimizer.sharded_state_dict(sharded, is_loading=is_loading, metadata=sharding_metadata())
        return {"model": sharded, "optimizer": optimizer}

    def consolidated_adapter(self) -> dict:
        """The whole adapter in the TP=1 layout (collective: every rank calls it). LoRA only."""
        from nemotune.recipes.engine import lora

        return lora.gather_adapter(self.model)

    def load_sharded_state_dict(self, state: dict) -> None:
        from nemotune.recipes.engine.checkpointing import MODEL_PREFIX, torch_adam_step_tolerated, unwrap

        if self.full_parameter:
            weights = {key[len(MODEL_PREFIX):]: value for key, value in state["model"].items()}
            for chunk in self.model:
                missing, _ = unwrap(chunk).load_state_dict(weights, strict=False)
                missing = [k for k in missing if not k.endswith("_extra_state")]
                if missing:
                    raise ValueError(f"the checkpoint lacks {len(missing)} of this model's weights, e.g. {missing[:3]}")
        else:
            for chunk in self.model:
                chunk.load_state_dict(state["model"], strict=False)
        with torch_adam_step_tolerated(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        # the optimizer's saved param groups carry the lr of the saved schedule: apply this config's schedule
        self.scheduler.step(increment=0)

    # ---- batches ---------------------------------------------------------------------------------
    def _micro_batches(self, samples: Sequence[batches.Sample], indices: np.ndarray) -> List[dict]:
        mine = batches.data_parallel_slice(indices, self.dp_rank, self.dp_size)
        pad_to = self.seq_length if self.pipeline else 0  # p2p needs one shape for every micro-batch
        return [batches.collate([samples[i] for i in mine[k:k + self.micro_batch_size]], self.pad_id,
                                pad_to_multiple=self.seq_multiple, pad_to=pad_to)
                for k in range(0, len(mine), self.micro_batch_size)]

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = distributed.device()
        tokens = batch["tokens"].to(device)
        position_ids = batch["position_ids"].to(device)
        labels = batch["labels"].to(device)
        weights = batch["loss_weights"].to(device)
        if self.use_packed_seq_params:  # TE THD: cu_seqlens separate the documents and restart RoPE
            per_token_loss = model(tokens, position_ids, None, labels=labels, loss_mask=weights,
                                   packed_seq_params=batches.packed_seq_params(batch, device))
        else:
            attention_mask = batches.DocumentMask(batch["document_lengths"], tokens.shape[1])
            if self.cfg.trainer.recompute != "none":  # recompute saves its inputs for backward: tensors only
                from nemotune.recipes.engine.model import spans_tensor

                attention_mask = spans_tensor(attention_mask).to(device)
            with RotaryPositions(model, position_ids):
                per_token_loss = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=weights)
        return per_token_loss, partial(_answer_token_loss, weights)

    def _run_schedule(self, micro_batches: List[dict], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq = micro_batches[0]["tokens"].shape[1]
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=self.model,
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=self.micro_batch_size,
            forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64)
        for out in outputs:
            total += out["loss_sum_and_tokens"].detach().to("cpu", torch.float64)
        # every rank of the last stage holds its DP shard (TP ranks hold copies: the ratio is unchanged)
        total = total.to(distributed.device())
        torch.distributed.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item() / self._loss_copies())

    def _loss_copies(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size() * \
            parallel_state.get_context_parallel_world_size()

    # ---- steps -----------------------------------------------------------------------------------
    def train_step(self, indices: np.ndarray) -> dict:
        start = time.perf_counter()
        micro_batches = self._micro_batches(self.train_samples, indices)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, loss_tokens = self._run_schedule(micro_batches, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        if on_gpu():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        doc_lengths = [l for mb in micro_batches for row in mb["document_lengths"] for l in row]
        step_flops = flops.lora_step_flops(self.hf_config, doc_lengths)
        if self.full_parameter:  # + the weight gradients LoRA's frozen base skips: 6N per token in all
            step_flops += flops.dense_forward_flops_per_token(self.hf_config) * sum(doc_lengths)
        local = torch.tensor([sum(doc_lengths), step_flops],
                             dtype=torch.float64, device=distributed.device())
        # each DP replica's tokens once: reduce over the data-parallel group only
        from megatron.core import parallel_state

        torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
        real_tokens, step_flops = local.tolist()
        world = distributed.world_size()
        achieved = step_flops / elapsed / world
        return {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/step_time": elapsed,
            "train/tokens_per_sec_per_gpu": real_tokens / elapsed / world,
            "train/tflops_per_gpu": achieved / 1e12,
            "train/mfu": achieved / self.peak_flops if self.peak_flops else None,
            "train/peak_mem_gib": _peak_memory_gib(),
            "train/loss_tokens": loss_tokens,
        }

    @torch.no_grad()
    def validate(self) -> float:
        for chunk in self.model:
            chunk.eval()
        per_batch = self.micro_batch_size * self.dp_size * self.num_microbatches
        n_batches = max(1, len(self.val_samples) // per_batch)
        limit = self.cfg.trainer.sft.limit_val_batches
        n_batches = min(n_batches, int(limit) if limit > 1 else max(1, int(n_batches * limit)))
        total_loss = total_tokens = 0.0
        for b in range(n_batches):
            indices = np.arange(b * per_batch, min((b + 1) * per_batch, len(self.val_samples)))
            loss, tokens = self._run_schedule(self._micro_batches(self.val_samples, indices), True)
            total_loss += loss * tokens
            total_tokens += tokens
        for chunk in self.model:
            chunk.train()
        self.last_val_tokens = int(total_tokens)
        return total_loss / max(total_tokens, 1)

    # ---- the loop --------------------------------------------------------------------------------
    def restore(self) -> Optional[Path]:
        """Resume from the run dir's checkpoint (once): refuses before anything is written, states a
        followed schedule change in one line."""
        if self._restored:
            return self.resumed_from
        self._restored = True
        self.resumed_from = self.checkpointer.load_latest(self)
        if self.resumed_from:
            for note in self.resume_notes:
                distributed.print_rank_zero(note)
            distributed.print_rank_zero(f"[{self.stage}] resumed from {self.resumed_from} at step {self.state.step}, "
                                        f"consumed_samples {self.state.consumed_samples}")
        return self.resumed_from

    def fit(self) -> TrainerState:
        self.restore()
        for chunk in self.model:
            chunk.train()
        stop_after = self.cfg.trainer.stop_after_steps
        steps_this_process = 0
        while self.state.step < self.max_steps:
            indices, epoch = batches.global_batch_indices(
                len(self.train_samples), self.global_batch_size, self.state.consumed_samples,
                self.cfg.run.seed)
            metrics = self.train_step(indices)
            self.state.step += 1
            self.state.consumed_samples += self.global_batch_size
            self.state.epoch = self.state.consumed_samples / (self.steps_per_epoch * self.global_batch_size)
            metrics.update({"train/consumed_samples": self.state.consumed_samples,
                            "train/epoch": self.state.epoch})
            steps_this_process += 1
            self.logger.log(self.state.step, metrics)
            if self.state.step % self.cfg.trainer.log_every_n_steps == 0:
                distributed.print_rank_zero(self.step_line(metrics))
            preempted = self.preemption is not None and self.preemption.should_stop()  # collective
            progress = check_progress(step=self.state.step, max_steps=self.max_steps,
                                      val_interval=self.val_interval, save_interval=self.save_interval,
                                      steps_this_process=steps_this_process, stop_after_steps=stop_after,
                                      preempted=preempted)
            if progress.validate:
                self.state.last_val_loss = self.validate()
                self.state.best_val_loss = min(self.state.best_val_loss, self.state.last_val_loss)
                self.logger.log(self.state.step, {"val/loss": self.state.last_val_loss})
                distributed.print_rank_zero(f"[{self.stage}] step {self.state.step} val_loss "
                                            f"{self.state.last_val_loss:.6f}")
            if progress.save:
                self.checkpointer.save(self)
            if progress.stop:
                if progress.reason != "max_steps":
                    distributed.print_rank_zero(f"[{self.stage}] stopping at step {self.state.step} "
                                                f"({progress.reason}); a resumable checkpoint is saved")
                    if preempted:
                        self.preemption.requeue()
                break
        if self.logger is not None:
            self.logger.close()
        return self.state

    def step_line(self, metrics: dict) -> str:
        """The console line of a step (trainers of other objectives print their own metrics)."""
        return format_step_line(self.state.step, self.max_steps, metrics)

    @property
    def finished(self) -> bool:
        return self.state.step >= self.max_steps


def _answer_token_loss(weights: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of answer-token losses and their count; megatron divides by the global-batch token count."""
    weights = weights.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * weights.float()).sum()
    tokens = weights.sum().to(torch.int)
    return loss_sum, tokens, {"loss_sum_and_tokens": torch.stack([loss_sum.detach(), weights.sum().float()])}


class RotaryPositions:
    """Make RoPE follow `position_ids` (restarting at each packed document) instead of 0..S-1.

    megatron's local path computes rotary frequencies for positions 0..S-1 of the whole sequence; packed
    documents must each start at position 0 so a packed example sees exactly what it sees alone.
    """

    def __init__(self, model, position_ids: torch.Tensor):
        self.rotary = getattr(_unwrap(model), "rotary_pos_emb", None)
        self.position_ids = position_ids

    def __enter__(self):
        if self.rotary is None or self.position_ids.shape[0] != 1:
            self.rotary = None
            return self
        original = self.rotary.forward
        position_ids = self.position_ids[0]

        def forward(max_seq_len, *args, **kwargs):
            table = original(int(position_ids.max().item()) + 1, *args, **kwargs)
            return table[position_ids]

        self.rotary.forward = forward
        return self

    def __exit__(self, *exc):
        if self.rotary is not None:
            del self.rotary.forward  # back to the class's forward
        return False


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
