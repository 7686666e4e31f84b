"""A real Slurm (Debian slurm-wlm + munge, one node on localhost): submit the rendered job, and preempt it.

The session fixture installs the packages when they are absent (root + apt-get), starts munged,
slurmctld and slurmd, and stops what it started. Elsewhere the tests skip with the reason.

The payload is tests/slurm/payload.py (a tiny gloo data-parallel trainer with the trainer's preemption
protocol); PAYLOAD below is the one line to drop to run the real `recipes.lora_sft` instead.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import main as launch_main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAYLOAD = [f"cluster.module={HERE / 'slurm' / 'payload.py'}"]  # [] = the real recipes.lora_sft


def _load_local_cluster():
    spec = importlib.util.spec_from_file_location("nemotune_local_slurm", HERE / "slurm" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slurm():
    local = _load_local_cluster()
    cluster = local.LocalSlurm()
    try:
        cluster.up()
    except local.SlurmUnavailable as err:
        pytest.skip(f"no Slurm: {err}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    print(f"\n[slurm] timings {cluster.timings}")
    try:
        yield cluster
    finally:
        cluster.down()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurmconf")
    shutil.copytree(REPO / "conf" / "cluster", root / "cluster")
    (root / "launch_test.yaml").write_text(
        "defaults:\n  - cluster: local\n  - _self_\n"
        f"run: {{name: ci, output_dir: {root}/run}}\n"
        "parallel: {tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1, context_parallel_size: 1}\n"
        "trainer: {sft: {max_steps: 20}}\n")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(conf_dir, run_dir: Path, steps: int, capsys) -> str:
    argv = ["--config-dir", str(conf_dir), "--config-name", "launch_test", "cluster=slurm",
            "cluster.gpus_per_node=0", "cluster.nproc_per_node=2", "cluster.cpus_per_task=2",
            "cluster.exclusive=false", "cluster.time=00:10:00", f"cluster.master_port={_free_port()}",
            "+cluster.env.OMP_NUM_THREADS=1", f"run.output_dir={run_dir}", f"trainer.sft.max_steps={steps}",
            *PAYLOAD]
    assert launch_main(argv) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("Submitted ")][-1]
    return line.split(" as job ")[1].split()[0]


def _job(job_id: str) -> dict:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def _wait(predicate, timeout: float, what: str, job_id: str, run_dir: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*-*.*")) if p.suffix in (".out", ".err"))
    pytest.fail(f"timed out waiting for {what}; job {_job(job_id)}\n{logs}")


def _metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _finished(job_id):
    return _job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def test_submitted_job_trains_on_two_ranks(slurm, conf_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    job_id = _submit(conf_dir, run_dir, steps=8, capsys=capsys)
    _wait(lambda: _finished(job_id), 120, "the job to finish", job_id, run_dir)
    job = _job(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(8))
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] / 10
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text()) == {"world": 2, "steps": 8}
    log = (run_dir / "slurm" / f"nemotune-ci-{job_id}.out").read_text()
    assert f"[nemotune] job {job_id} (restart 0): 1 node(s)" in log and "world 2" in log
    assert len(list((run_dir / "slurm").glob("nemotune-ci-*.sbatch"))) == 1
    test_submitted_job_trains_on_two_ranks.losses = [m["train/loss"] for m in metrics]


def test_pre_timeout_signal_checkpoints_requeues_and_resumes(slurm, conf_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    job_id = _submit(conf_dir, run_dir, steps=30, capsys=capsys)
    _wait(lambda: len(_metrics(run_dir)) >= 3, 90, "3 training steps", job_id, run_dir)
    # what `#SBATCH --signal=USR1@<s>` does at the time limit: USR1 to every process of the job's steps
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    _wait(lambda: _job(job_id).get("Restarts") == "1", 60, "the requeue", job_id, run_dir)
    # Slurm holds a requeued job ~120 s (BeginTime); release it now, after its old credential's second
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True)
    _wait(lambda: _finished(job_id), 120, "the resumed job to finish", job_id, run_dir)
    job = _job(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job

    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    assert steps == list(range(30)), steps  # every step exactly once across the two runs
    first_run = [m for m in metrics if m["restart"] == 0]
    assert 3 <= len(first_run) < 30 and all(m["restart"] == 1 for m in metrics[len(first_run):])
    log = (run_dir / "slurm" / f"nemotune-ci-{job_id}.out").read_text()
    stop_step = first_run[-1]["step"]
    assert f"[payload] signal 10 -> checkpoint at step {stop_step}" in log
    assert f"requeueing job {job_id}" in log
    assert f"[payload] resumed from step {stop_step} (restart 1)" in log and "[payload] done" in log
    # resuming is exact: the same losses as an uninterrupted run over the steps both ran
    reference = getattr(test_submitted_job_trains_on_two_ranks, "losses", None)
    if reference:
        assert [m["train/loss"] for m in metrics[:len(reference)]] == pytest.approx(reference, rel=1e-6)
