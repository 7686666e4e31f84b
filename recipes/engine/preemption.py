"""Pre-timeout / preemption handling for training processes.

Slurm sends SIGUSR1 `cluster.signal_seconds_before_timeout` seconds before the time limit (and SIGTERM on
preemption or scancel). The trainer polls `should_stop()` after every step; when it returns True on all
ranks (collectively, so no rank is left waiting in a collective), it saves a checkpoint, calls
`requeue()` and exits 0. The requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterable, Optional

REQUEUE_FILE_ENV = "NEMOTUNE_REQUEUE_FILE"


class PreemptionHandler:
    """Records the signals it is given; `should_stop()` turns them into one collective decision."""

    def __init__(self, signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM), *, install: bool = True):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous = {}
        if install:
            self.install()

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Puts back the handlers that were installed before this one."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        # async-signal context: only record; the training loop acts at the next step boundary
        if self.received is None:
            self.received = signum

    @property
    def signalled(self) -> bool:
        """Whether THIS process received a signal (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was signalled (one all_reduce(MAX) of one int when
        torch.distributed is initialized; local flag otherwise)."""
        flag = int(self.signalled)
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            return bool(flag)
        if not (dist.is_available() and dist.is_initialized()):
            return bool(flag)
        device = "cpu"
        if dist.get_backend() == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        tensor = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def requeue(self) -> bool:
        """Asks Slurm to requeue this job (call after the checkpoint is saved; any rank may call it, global
        rank 0 acts). Under a nemotune sbatch script it touches $NEMOTUNE_REQUEUE_FILE and the batch
        script runs `scontrol requeue` once all ranks have exited; otherwise it runs `scontrol requeue
        $SLURM_JOB_ID` itself. Returns whether a requeue was requested."""
        if int(os.environ.get("RANK", "0")) != 0:
            return False
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            return False
        marker = os.environ.get(REQUEUE_FILE_ENV)
        if marker:
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text(f"{self.received or ''}\n")
            return True
        if shutil.which("scontrol") is None:
            return False
        return subprocess.run(["scontrol", "requeue", job_id], capture_output=True).returncode == 0
