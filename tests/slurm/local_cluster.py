"""A real one-node Slurm cluster on localhost, for CI.

Installs Debian's ``slurm-wlm`` + ``munge`` when absent (root + apt-get only), writes a one-node
``slurm.conf`` under a state directory in /tmp, and starts ``munged``, ``slurmctld`` and ``slurmd``.
Only the daemons this module started are stopped again.

Used by the pytest session fixture in tests/test_slurm_cluster.py, and runnable by hand:

    python tests/slurm/local_cluster.py up      # install if needed, start, print `export SLURM_CONF=...`
    python tests/slurm/local_cluster.py down    # stop the daemons started by `up`
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = Path(os.environ.get("NEMOTUNE_SLURM_DIR", "/tmp/nemotune-slurm"))
PACKAGES = ("slurm-wlm", "munge")
SLURM_BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "slurmctld", "slurmd", "sinfo")
MUNGE_SOCKET_DIR = Path("/run/munge")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be (no root or no apt-get): the caller skips."""


def _missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES + ("munged",) if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def install_if_missing(timings: dict[str, float]) -> None:
    """apt-get install slurm-wlm + munge (noninteractive, one `apt-get update`) when any binary is absent."""
    missing = _missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} are absent and installing them needs root "
                               f"(running as uid {os.geteuid()})")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are absent and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    timings["apt_install_s"] = time.monotonic() - start
    still_missing = _missing_binaries()
    if still_missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but {still_missing} are still missing")


def render_slurm_conf(state_dir: Path, hostname: str, cpus: int = 2) -> str:
    """One node (this host on 127.0.0.1), one partition, root everywhere, no cgroups, no accounting."""
    return "\n".join([
        "ClusterName=nemotune-ci",
        f"SlurmctldHost={hostname}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CryptoType=crypto/munge",
        "MpiDefault=none",
        # No cgroups: a container or CI VM rarely gives slurmd a writable cgroup tree.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "ReturnToService=2",
        # Short waits keep the requeue/resume test fast: SIGTERM->SIGKILL grace, and how long finished
        # jobs stay visible to squeue/scontrol.
        "KillWait=5",
        "MinJobAge=600",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",
        f"StateSaveLocation={state_dir}/ctld",
        f"SlurmdSpoolDir={state_dir}/spool",
        f"SlurmctldPidFile={state_dir}/slurmctld.pid",
        f"SlurmdPidFile={state_dir}/slurmd.pid",
        f"SlurmctldLogFile={state_dir}/slurmctld.log",
        f"SlurmdLogFile={state_dir}/slurmd.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def _munge_works() -> bool:
    if shutil.which("munge") is None:
        return False
    proc = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
    return proc.returncode == 0


def _start_munged() -> int | None:
    """Starts munged unless one already answers; returns the pid it started, else None."""
    if _munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"], check=True)
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    user = "munge"
    try:
        import pwd
        pw = pwd.getpwnam(user)
        for p in (MUNGE_SOCKET_DIR, Path("/var/lib/munge"), Path("/var/log/munge"), key.parent):
            if p.exists():
                os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chown(key, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o400)
        cmd = ["runuser", "-u", user, "--", _sbin("munged")]
    except KeyError:
        cmd = [_sbin("munged"), "--force"]
    subprocess.run(cmd, check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _munge_works():
            return _read_pid(MUNGE_SOCKET_DIR / "munged.pid")
        time.sleep(0.1)
    raise RuntimeError("munged started but `munge -n | unmunge` still fails")


@dataclass
class LocalSlurm:
    state_dir: Path = STATE_DIR
    conf: Path = field(init=False)
    started_pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conf = self.state_dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=dict(os.environ, **self.env), capture_output=True, text=True,
                              check=check)

    def node_state(self) -> str:
        proc = self._run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def up(self) -> "LocalSlurm":
        install_if_missing(self.timings)
        start = time.monotonic()
        hostname = socket.gethostname().split(".")[0]
        for sub in ("ctld", "spool"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(render_slurm_conf(self.state_dir, hostname, cpus=2))

        munged = _start_munged()
        if munged:
            self.started_pids["munged"] = munged
        for daemon, args in (("slurmctld", ["-c"]), ("slurmd", [])):
            pidfile = self.state_dir / f"{daemon}.pid"
            if _read_pid(pidfile):
                continue  # ours from an earlier `up`, still running
            proc = self._run(_sbin(daemon), "-f", str(self.conf), *args, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{daemon} failed to start ({proc.returncode}): {proc.stderr}\n"
                                   f"log: {self._tail(daemon)}")
            deadline = time.monotonic() + 10
            while not (pid := _read_pid(pidfile)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not pid:
                raise RuntimeError(f"{daemon} wrote no pid file {pidfile}; log: {self._tail(daemon)}")
            self.started_pids[daemon] = pid

        deadline = time.monotonic() + 30
        while (state := self.node_state()) not in ("idle", "mixed", "allocated"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node never became idle (state {state!r}); logs:\n"
                                   f"{self._tail('slurmctld')}\n{self._tail('slurmd')}")
            if state.startswith("down") or state.startswith("drain"):
                self._run("scontrol", "update", f"nodename={hostname}", "state=resume", check=False)
            time.sleep(0.2)
        self.timings["daemon_start_s"] = time.monotonic() - start
        return self

    def _tail(self, daemon: str, n: int = 3000) -> str:
        log = self.state_dir / f"{daemon}.log"
        return log.read_text()[-n:] if log.exists() else f"(no {log})"

    def down(self) -> None:
        """Stops only what `up` started (slurmd first, munged last)."""
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = self.started_pids.pop(daemon, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    cluster = LocalSlurm()
    pids_file = cluster.state_dir / "started.pids"
    if argv[:1] == ["up"]:
        cluster.up()
        pids_file.write_text("\n".join(f"{k} {v}" for k, v in cluster.started_pids.items()))
        print(f"export SLURM_CONF={cluster.conf}  # timings: {cluster.timings}")
        return 0
    if argv[:1] == ["down"]:
        if pids_file.exists():
            for line in pids_file.read_text().splitlines():
                name, pid = line.split()
                cluster.started_pids[name] = int(pid)
            pids_file.unlink()
        cluster.down()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
