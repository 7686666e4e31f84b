"""SupervisedTrainer: NeMo-Aligner's SFT loop contract on megatron-core schedules.

Keeps `trainer.sft.{max_epochs, max_steps, val_check_interval, save_interval, limit_val_batches,
gradient_clip_val}`, validation at the interval and at the last step, top-k checkpoints by `val_loss`
plus the last, and resume with `step`, `consumed_samples`, `epoch`. One global batch per step through
megatron's `get_forward_backward_func` (so pipeline parallelism works with micro-batches); the loss is
the sum over answer tokens of the whole global batch divided by their count (`calculate_per_token_loss`),
so packing, DP and PP leave it unchanged.
"""

from __future__ import annotations

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


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    epoch: int = 0
    best_val_loss: float = math.inf
    last_val_loss: Optional[float] = None
    history: List[dict] = field(default_factory=list)


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
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SupervisedTrainer:
    def __init__(self, *, cfg, model: list, optimizer, scheduler, train_samples: Sequence[batches.Sample],
                 val_samples: Sequence[batches.Sample], pad_id: int, seq_length: int, hf_config: dict,
                 run_dir: Path, checkpointer: Checkpointer, stage: str = "sft", step_offset: int = 0,
                 preemption=None, use_packed_seq_params: bool = False, log_metrics: bool = True):
        from megatron.core import parallel_state

        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.train_samples, self.val_samples = train_samples, val_samples
        self.pad_id, self.seq_length, self.hf_config = pad_id, seq_length, hf_config
        self.run_dir, self.checkpointer, self.stage = Path(run_dir), checkpointer, stage
        self.preemption = preemption
        self.use_packed_seq_params = use_packed_seq_params
        self.state = TrainerState()
        tr, sft = cfg.trainer, cfg.trainer.sft
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.micro_batch_size, self.global_batch_size = tr.micro_batch_size, tr.global_batch_size
        self.num_microbatches = self.global_batch_size // (self.micro_batch_size * self.dp_size)
        self.steps_per_epoch = len(train_samples) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_samples)} training samples cannot fill one global batch of "
                             f"{self.global_batch_size}; lower trainer.global_batch_size")
        epoch_steps = sft.max_epochs * self.steps_per_epoch if sft.max_epochs > 0 else math.inf
        self.max_steps = int(min(sft.max_steps if sft.max_steps > 0 else math.inf, epoch_steps))
        vci = sft.val_check_interval
        self.val_interval = max(1, int(vci) if vci > 1 else int(round(vci * self.steps_per_epoch)))
        self.save_interval = sft.save_interval if sft.save_interval > 0 else self.val_interval
        self.pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self.seq_multiple = parallel_state.get_tensor_model_parallel_world_size() \
            if cfg.parallel.sequence_parallel else 1
        self.logger = MetricsLogger(self.run_dir, stage, step_offset, cfg.run.tensorboard) if log_metrics else None
        self.peak_flops = flops.device_peak_flops()

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
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        doc_lengths = [l for mb in micro_batches for row in mb["document_lengths"] for l in row]
        local = torch.tensor([sum(doc_lengths), flops.lora_step_flops(self.hf_config, doc_lengths)],
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
    def fit(self) -> TrainerState:
        resumed = self.checkpointer.load_latest(self)
        if resumed:
            distributed.print_rank_zero(f"[{self.stage}] resumed from {resumed} at step {self.state.step}, "
                                        f"consumed_samples {self.state.consumed_samples}")
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
                distributed.print_rank_zero(format_step_line(self.state.step, self.max_steps, metrics))
            last = self.state.step == self.max_steps
            if self.state.step % self.val_interval == 0 or last:
                self.state.last_val_loss = self.validate()
                self.state.best_val_loss = min(self.state.best_val_loss, self.state.last_val_loss)
                self.logger.log(self.state.step, {"val/loss": self.state.last_val_loss})
                distributed.print_rank_zero(f"[{self.stage}] step {self.state.step} val_loss "
                                            f"{self.state.last_val_loss:.6f}")
            preempted = self.preemption is not None and self.preemption.should_stop()
            stopping = preempted or (0 < stop_after <= steps_this_process)
            if self.state.step % self.save_interval == 0 or last or stopping:
                self.checkpointer.save(self)
            if stopping and not last:
                distributed.print_rank_zero(f"[{self.stage}] stopping at step {self.state.step} "
                                            f"({'preempted' if preempted else 'stop_after_steps'}); "
                                            "a resumable checkpoint is saved")
                if preempted:
                    self.preemption.requeue()
                break
        if self.logger is not None:
            self.logger.close()
        return self.state

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
