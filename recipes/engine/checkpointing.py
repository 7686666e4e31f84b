"""Training checkpoints: adapters + optimizer through megatron-core dist_checkpointing, plus trainer state.

<run_dir>/checkpoints/step0000042/
  dist/                  adapter weights + optimizer state (dist_checkpointing: reloads under any TP/PP/DP)
  adapter/               the consolidated adapter (TP=1 layout, all layers) that `nemotune export` reads
  trainer_state.json     step, consumed_samples, epoch, val_loss, scheduler state, base-model reference
  rng/rank*.pt           each rank's RNG states
The frozen base is referenced by path + sha256, never copied. A checkpoint is written under a `.tmp-`
name and renamed when every rank has finished, so a crash mid-save never leaves one that looks complete.
Top-k checkpoints by val_loss are kept, plus the last.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from nemotune.recipes.engine import distributed

STATE_FILE = "trainer_state.json"
def sharding_metadata() -> dict:
    """The distributed optimizer's state in megatron's format that any TP / PP / DP can load."""
    # a fresh dict each time: megatron stores the current data-parallel group into it
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def sha256_of_path(path: str | Path) -> str:
    """Content hash of a file, or of every file under a directory (names and bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def adapter_sharded_state_dict(model_chunks) -> dict:
    sharded = {}
    for chunk in model_chunks:
        full = chunk.sharded_state_dict(metadata=sharding_metadata())
        for key, value in full.items():
            if "adapter_layer" in key:
                sharded[key] = value
    return sharded


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step*") if (p / STATE_FILE).is_file()), key=lambda p: p.name)


class Checkpointer:
    def __init__(self, root: Path, *, adapter_config: dict, base_reference: dict, save_top_k: int,
                 resume: bool):
        self.root = Path(root)
        self.adapter_config = adapter_config
        self.base_reference = base_reference
        self.save_top_k = save_top_k
        self.resume = resume

    # ---- save ------------------------------------------------------------------------------------
    def save(self, trainer) -> Path:
        from megatron.core import dist_checkpointing

        from nemotune.converters.formats.adapters import save_adapter
        from nemotune.recipes.engine import lora

        step = trainer.state.step
        final = self.root / f"step{step:07d}"
        tmp = self.root / f".tmp-step{step:07d}"
        if distributed.is_rank_zero():
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "dist").mkdir(parents=True)
            (tmp / "rng").mkdir()
        torch.distributed.barrier()
        sharded = adapter_sharded_state_dict(trainer.model)
        state = {"model": sharded,
                 "optimizer": trainer.optimizer.sharded_state_dict(sharded, metadata=sharding_metadata())}
        dist_checkpointing.save(state, str(tmp / "dist"))
        full_adapter = lora.gather_adapter(trainer.model)
        torch.save(_rng_states(), tmp / "rng" / f"rank{distributed.rank()}.pt")
        if distributed.is_rank_zero():
            save_adapter(tmp / "adapter", full_adapter, self.adapter_config)
            payload = {
                "step": step,
                "consumed_samples": trainer.state.consumed_samples,
                "epoch": trainer.state.epoch,
                "val_loss": trainer.state.last_val_loss,
                "best_val_loss": None if trainer.state.best_val_loss == float("inf")
                else trainer.state.best_val_loss,
                "stage": trainer.stage,
                "world_size": distributed.world_size(),
                "scheduler": trainer.scheduler.state_dict(),
                "base_model": self.base_reference,
                "data_order": {"seed": trainer.cfg.run.seed, "global_batch_size": trainer.global_batch_size,
                               "num_train_samples": len(trainer.train_samples)},
            }
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
        torch.distributed.barrier()
        if distributed.is_rank_zero():
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._keep_top_k()
        torch.distributed.barrier()
        return final

    def _keep_top_k(self) -> None:
        checkpoints = complete_checkpoints(self.root)
        if self.save_top_k < 0 or len(checkpoints) <= 1:
            return
        last = checkpoints[-1]
        scored = []
        for ckpt in checkpoints[:-1]:
            val = json.loads((ckpt / STATE_FILE).read_text()).get("val_loss")
            scored.append((float("inf") if val is None else val, ckpt))
        last_val = json.loads((last / STATE_FILE).read_text()).get("val_loss")
        keep = {last}
        ranked = sorted(scored + [(float("inf") if last_val is None else last_val, last)],
                        key=lambda item: item[0])
        keep.update(ckpt for _, ckpt in ranked[:self.save_top_k])
        for _, ckpt in scored:
            if ckpt not in keep:
                shutil.rmtree(ckpt, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        if not self.resume:
            return None
        checkpoints = complete_checkpoints(self.root)
        return checkpoints[-1] if checkpoints else None

    def load_latest(self, trainer) -> Optional[Path]:
        ckpt = self.latest()
        if ckpt is None:
            return None
        self.load(trainer, ckpt)
        return ckpt

    def load(self, trainer, ckpt: Path) -> None:
        from megatron.core import dist_checkpointing

        from nemotune.converters.formats.safe_pickle import check_checkpoint_files

        check_checkpoint_files(ckpt)  # megatron / torch unpickle its .metadata: refuse anything but data first
        payload = json.loads((ckpt / STATE_FILE).read_text())
        saved_base = payload.get("base_model", {})
        if saved_base.get("sha256") and self.base_reference.get("sha256") and \
                saved_base["sha256"] != self.base_reference["sha256"]:
            raise ValueError(f"{ckpt} was trained on base {saved_base.get('path')} (sha256 "
                             f"{saved_base['sha256'][:12]}), not on {self.base_reference.get('path')}")
        sharded = adapter_sharded_state_dict(trainer.model)
        template = {"model": sharded, "optimizer": trainer.optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=sharding_metadata())}
        state = dist_checkpointing.load(template, str(ckpt / "dist"))
        for chunk in trainer.model:
            chunk.load_state_dict(state["model"], strict=False)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.num_steps = 0  # megatron's load_state_dict steps forward by the saved count
        trainer.scheduler.load_state_dict(payload["scheduler"])
        rng_file = ckpt / "rng" / f"rank{distributed.rank()}.pt"
        if rng_file.is_file() and payload.get("world_size") == distributed.world_size():
            _set_rng_states(torch.load(rng_file, weights_only=True))
        trainer.state.step = payload["step"]
        trainer.state.consumed_samples = payload["consumed_samples"]
        trainer.state.epoch = payload["epoch"]
        trainer.state.last_val_loss = payload.get("val_loss")
        if payload.get("best_val_loss") is not None:
            trainer.state.best_val_loss = payload["best_val_loss"]


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    states.update({f"tracker/{name}": value for name, value in tracker.items()})
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith("tracker/")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
