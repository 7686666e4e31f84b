"""A training run dir's guard rails, all on global rank 0 before the first step:

- writability: the run dir and its checkpoints dir take a probe file, so a read-only path fails at once,
  not after an hour of steps;
- one training at a time: `<run dir>/.nemotune-train.lock` holds host, pid (and Slurm job); a second
  training refuses naming them; a lock whose process is gone (this host, dead pid; or the same Slurm job,
  requeued) is stale and replaced, with one line saying so;
- leftovers: `.tmp-step*` dirs of an interrupted checkpoint save whose recorded writer is dead are removed,
  with one line saying so;
- the base checkpoint's sha256, cached by (path, size, mtime) of every file so a requeue does not read
  the whole base again; the first hash shows progress.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

from nemotune.converters.formats.outputs import pid_alive

LOCK_NAME = ".nemotune-train.lock"
OWNER_NAME = ".owner.json"  # inside a .tmp-step* dir: who is writing it
TMP_PATTERN = ".tmp-step*"
BASE_HASH_CACHE = "base_sha256.json"


class RunDirError(ValueError):
    """A run dir that cannot be used as asked; the message names the path and the fix."""


def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def owner_is_gone(owner: dict) -> Optional[str]:
    """Why the recorded owner no longer runs (a phrase), or None when it may still run."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job and owner.get("pid") != os.getpid():
        return f"an earlier run of Slurm job {job}"
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return f"pid {pid} on {owner.get('host')} is not running"
    return None


def check_writable(path: Path, key: str) -> None:
    """Create `path` if needed and write + remove a probe file in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nemotune-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise RunDirError(f"{path} is not writable ({reason}); training would fail at its first checkpoint: "
                          f"make it writable or set {key} to a writable directory") from None


class RunLock:
    """`<run dir>/.nemotune-train.lock`, created exclusively; released (removed) by its owner."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self, say=print) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                gone = owner_is_gone(owner) if owner is not None else None
                if gone is None:
                    who = "an unreadable lock" if owner is None else \
                        f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started')})"
                    raise RunDirError(
                        f"{self.path.parent} is in use by another training: {who}, lock {self.path}; wait for "
                        f"it to finish or set run.output_dir to another directory (if that process is gone, "
                        f"delete {self.path})") from None
                self.path.unlink(missing_ok=True)
                say(f"removed the stale lock {self.path} ({gone})")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner_record(), f)
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the run-dir lock; delete it if no training runs there")

    def _read(self) -> Optional[dict]:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            owner = self._read()
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False


def remove_stale_temporaries(checkpoints: Path, say=print) -> list[Path]:
    """Remove `.tmp-step*` dirs left by an interrupted save whose recorded writer is gone (ours only:
    the name pattern and an owner record of this project)."""
    removed, reasons = [], []
    for tmp in sorted(Path(checkpoints).glob(TMP_PATTERN)) if Path(checkpoints).is_dir() else []:
        try:
            owner = json.loads((tmp / OWNER_NAME).read_text())
        except (OSError, ValueError):
            continue  # not recognisably ours: left alone
        gone = owner_is_gone(owner) if isinstance(owner, dict) else None
        if gone is None:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
        reasons.append(gone)
    if removed:
        names = ", ".join(p.name for p in removed)
        say(f"removed {len(removed)} stale temporary checkpoint(s) of an interrupted save in {checkpoints}: "
            f"{names} ({'; '.join(sorted(set(reasons)))})")
    return removed


def _file_signature(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns]
            for f in files]


def sha256_of_path(path: str | Path, *, progress: bool = False) -> str:
    """Content hash of a file, or of every file under a directory (names and bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc=f"sha256 of the base {path.name}", leave=False)
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
    if bar is not None:
        bar.close()
    return digest.hexdigest()


def cached_sha256(path: str | Path, cache_file: Path, *, progress: bool = True) -> str:
    """`sha256_of_path(path)`, reused from `cache_file` while every file keeps its size and mtime."""
    path = Path(path).resolve()
    signature = _file_signature(path)
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("path") == str(path) and cached.get("files") == signature:
            return cached["sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = sha256_of_path(path, progress=progress)
    try:
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "sha256": digest, "files": signature}))
        tmp.replace(cache_file)
    except OSError:
        pass  # a cache only
    return digest
