"""A real Slurm (Debian slurm-wlm + munge, one node on localhost) runs the real training job.

The module fixture installs the packages when they are absent (root + apt-get), starts munged, slurmctld
and slurmd, and stops what it started; elsewhere the tests skip with the reason. Each job is what a user
submits: `nemotune launch experiment=tiny_lora cluster=slurm ...` composes conf/lora_sft.yaml, renders
the sbatch script and submits it; the job's srun task starts torchrun with 2 CPU ranks (data parallel 2)
running `nemotune.recipes.lora_sft` on the tiny model (tests/conftest.py `tiny_assets`).

1. an uninterrupted job: COMPLETED, its metrics, final checkpoint (adapter + trainer state) and logs;
2. the pre-timeout signal (`scancel --signal=USR1`, what `#SBATCH --signal=USR1@<s>` sends): the ranks
   checkpoint at the step they are on, the job requeues itself, resumes from that checkpoint and ends
   with the same per-step losses as job 1 (same config, so job 1 is the uninterrupted reference).
"""
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemotune.recipes.launch import main as launch_main
from nemotune.recipes.engine.config import LoraConfig

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
STEPS = 10
GLOBAL_BATCH = 4  # experiment=tiny_lora
JOB_NAME = "nemotune-slurm_ci"  # conf/cluster/slurm.yaml: nemotune-${run.name}
SUBMITTED: list = []  # job ids, cancelled at teardown if still running


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
        _cancel_unfinished()
        cluster.down()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _cancel_unfinished() -> None:
    """A failed test leaves its job running: cancel it so no training outlives the daemons."""
    def gone_or_finished(job_id):
        try:
            return _finished(job_id)
        except subprocess.CalledProcessError:
            return True

    running = [j for j in SUBMITTED if not gone_or_finished(j)]
    for job_id in running:
        subprocess.run(["scancel", job_id], capture_output=True)
    deadline = time.monotonic() + 30
    while running and time.monotonic() < deadline:
        running = [j for j in running if not gone_or_finished(j)]
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(assets: dict, run_dir: Path) -> str:
    """`nemotune launch` with the real config tree; returns the job id it printed."""
    argv = ["experiment=tiny_lora", "run.name=slurm_ci", f"run.output_dir={run_dir}", "run.tensorboard=false",
            f"model.hf_path={assets['base']}", f"model.checkpoint={assets['mcore']}",
            f"data.output_dir={assets['prep']}", "trainer.train_split=sft", "trainer.validation_split=eval",
            f"trainer.sft.max_steps={STEPS}", f"trainer.sft.val_check_interval={STEPS}",
            "trainer.sft.limit_val_batches=1",
            # one CPU node: 2 ranks (DP=2) in one task, no GPUs, the whole 2-core node
            *_cpu_cluster(ranks=2)]
    return _launch(argv)[-1]


def _cpu_cluster(ranks: int) -> list:
    """cluster=slurm overrides for the one CPU node: `ranks` processes in one task, no GPUs."""
    return ["cluster=slurm", "cluster.gpus_per_node=0", f"cluster.nproc_per_node={ranks}",
            f"cluster.cpus_per_task={ranks}", "cluster.exclusive=false", "cluster.time=00:10:00",
            f"cluster.master_port={_free_port()}", "+cluster.env.OMP_NUM_THREADS=1",
            "+cluster.env.PYTHONWARNINGS=ignore"]


def _launch(argv: list) -> list:
    """`nemotune launch argv`; the ids of the jobs it submitted (recorded for the teardown's cancel)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = launch_main(argv)
    assert code == 0, err.getvalue()
    jobs = [l.split(" as job ")[1].split()[0] for l in out.getvalue().splitlines() if l.startswith("Submitted ")]
    SUBMITTED.extend(jobs)
    return jobs


def _job(job_id: str) -> dict:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def _log(run_dir: Path, job_id: str, stream: str = "out") -> str:
    path = run_dir / "slurm" / f"{JOB_NAME}-{job_id}.{stream}"
    return path.read_text() if path.exists() else ""


def _wait(predicate, timeout: float, what: str, job_id: str, run_dir: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}; job {_job(job_id)}\n{_log(run_dir, job_id)[-4000:]}\n"
                f"{_log(run_dir, job_id, 'err')[-4000:]}")


def _finished(job_id):
    return _job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _rows(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _train_rows(run_dir: Path) -> list:
    return [r for r in _rows(run_dir) if "train/loss" in r]


def _assert_completed(job_id: str, run_dir: Path, restarts: int) -> None:
    job = _job(job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), \
        f"{job}\n{_log(run_dir, job_id)[-4000:]}\n{_log(run_dir, job_id, 'err')[-4000:]}"


def _trainer_state(run_dir: Path, step: int) -> dict:
    ckpt = run_dir / "checkpoints" / f"step{step:07d}"
    return json.loads((ckpt / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def completed_job(slurm, tiny_assets, tmp_path_factory):
    """One uninterrupted job (also the reference for the preempted one): (job id, run dir)."""
    run_dir = tmp_path_factory.mktemp("slurm_job") / "run"
    job_id = _submit(tiny_assets, run_dir)
    _wait(lambda: _finished(job_id), 150, "the job to finish", job_id, run_dir)
    return job_id, run_dir


def test_submitted_job_trains_on_two_ranks(completed_job, tiny_assets):
    job_id, run_dir = completed_job
    _assert_completed(job_id, run_dir, restarts=0)
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once
    assert [r["train/consumed_samples"] for r in rows] == [GLOBAL_BATCH * s for s in range(1, STEPS + 1)]
    losses = [r["train/loss"] for r in rows]
    assert all(math.isfinite(l) and 5.0 < l < 8.0 for l in losses), losses  # ~ln(1024) for the tiny model
    assert losses[-1] < losses[0], losses
    val = [r for r in _rows(run_dir) if "val/loss" in r]
    assert [r["step"] for r in val] == [STEPS] and math.isfinite(val[0]["val/loss"])

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step{STEPS:07d}"]
    state = _trainer_state(run_dir, STEPS)
    assert (state["step"], state["consumed_samples"], state["world_size"]) == (STEPS, STEPS * GLOBAL_BATCH, 2)
    assert state["val_loss"] == pytest.approx(val[0]["val/loss"])
    adapter = run_dir / "checkpoints" / f"step{STEPS:07d}" / "adapter"
    config = json.loads((adapter / "nemotune_adapter.json").read_text())
    assert (config["dim"], config["alpha"], config["variant"], config["base_checkpoint"]) == \
        (8, 16, LoraConfig().variant, str(tiny_assets["mcore"]))
    weights = load_file(adapter / "adapter_model.safetensors")  # PEFT's file: adapter/ is an HF PEFT adapter
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    # LoRA B starts at zero: trained adapters have moved away from it
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "linear_out" in k or "lora_B" in k), list(weights)

    log = _log(run_dir, job_id)
    assert f"[nemotune] job {job_id} (restart 0): 1 node(s)" in log
    assert "2 micro-batches x 2 data-parallel" in log and f"step {STEPS:>6d}/{STEPS:<6d}" in log
    assert "resumed from" not in log and "requeueing" not in log
    scripts = list((run_dir / "slurm").glob(f"{JOB_NAME}-*.sbatch"))
    assert len(scripts) == 1
    script = scripts[0].read_text()
    assert "#SBATCH --signal=USR1@300" in script and "-m nemotune.recipes.lora_sft" in script


def test_pre_timeout_signal_checkpoints_requeues_and_resumes(slurm, tiny_assets, completed_job, tmp_path):
    run_dir = tmp_path / "run"
    job_id = _submit(tiny_assets, run_dir)
    _wait(lambda: len(_train_rows(run_dir)) >= 2, 150, "2 training steps", job_id, run_dir)
    # what `#SBATCH --signal=USR1@<s>` does before the time limit: USR1 to every process of the job's steps
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    _wait(lambda: _job(job_id).get("Restarts") == "1", 90, "the requeue", job_id, run_dir)
    # Slurm holds a requeued job ~120 s (BeginTime); release it now, after its old credential's second
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True)
    _wait(lambda: _finished(job_id), 150, "the resumed job to finish", job_id, run_dir)
    _assert_completed(job_id, run_dir, restarts=1)

    log = _log(run_dir, job_id)
    assert f"[nemotune] job {job_id} (restart 0)" in log and f"[nemotune] job {job_id} (restart 1)" in log
    stops = re.findall(r"\[sft\] stopping at step (\d+) \(preempted\)", log)
    assert len(stops) == 1, log[-4000:]
    stop = int(stops[0])
    assert 2 <= stop < STEPS, f"the signal landed at step {stop}, not mid-run"
    assert f"requeueing job {job_id}" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stop:07d}'} at step {stop}, " \
           f"consumed_samples {stop * GLOBAL_BATCH}" in log
    # the checkpoint written at the stop step is still there next to the final one
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step{stop:07d}", f"step{STEPS:07d}"]
    assert _trainer_state(run_dir, stop)["consumed_samples"] == stop * GLOBAL_BATCH
    state = _trainer_state(run_dir, STEPS)
    assert (state["step"], state["consumed_samples"]) == (STEPS, STEPS * GLOBAL_BATCH)

    rows = _train_rows(run_dir)
    last = {r["step"]: r for r in rows}  # a resumed run re-logs steps after its checkpoint: the last wins
    assert sorted(last) == list(range(1, STEPS + 1)) and [r["step"] for r in rows[:stop]] == list(range(1, stop + 1))
    assert [last[s]["train/consumed_samples"] for s in sorted(last)] == [GLOBAL_BATCH * s for s in range(1, STEPS + 1)]
    # resuming is exact: the same losses as the uninterrupted job with the same config
    reference = {r["step"]: r["train/loss"] for r in _train_rows(completed_job[1])}
    assert [last[s]["train/loss"] for s in sorted(last)] == \
        pytest.approx([reference[s] for s in sorted(reference)], abs=1e-5)


def test_three_stage_seed_recipe_runs_as_three_dependent_jobs(slurm, tiny_assets, tmp_path):
    """`nemotune launch --config-name rl experiment=tiny_three_stage cluster=slurm`: one job per stage, each
    waiting (afterok) for the one before; stage 2 starts from stage 1's adapter, stage 3 (GRPO on the rl split)
    from stage 2's, and all three complete."""
    run_dir = tmp_path / "three"
    argv = ["--config-name", "rl", "experiment=tiny_three_stage", "cluster.module=nemotune.recipes.rl",
            f"run.output_dir={run_dir}", "run.tensorboard=false", f"model.hf_path={tiny_assets['base']}",
            f"model.checkpoint={tiny_assets['mcore']}", f"data.output_dir={tiny_assets['prep']}",
            "peft.lora.dim=8", "trainer.sft.max_steps=1", "trainer.sft.limit_val_batches=1",
            *_cpu_cluster(ranks=1)]
    jobs = _launch(argv)
    assert len(jobs) == 3, jobs
    assert _job(jobs[2])["Dependency"].startswith(f"afterok:{jobs[1]}") or _finished(jobs[1])
    _wait(lambda: all(_finished(j) for j in jobs), 420, "the three stage jobs to finish", jobs[-1], run_dir)
    logs = {j: "".join(p.read_text() for p in (run_dir / "slurm").glob(f"*-{j}.out")) for j in jobs}
    for job_id in jobs:
        job = _job(job_id)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{logs[job_id][-3000:]}"
    for stage, previous in (("stage2", "stage1"), ("stage3", "stage2")):
        state = json.loads((sorted((run_dir / stage / "checkpoints").glob("step*"))[-1] / "trainer_state.json")
                           .read_text())
        assert state["step"] == 1
        assert f"starts from {run_dir / previous / 'checkpoints'}" in "".join(logs.values()), stage
    rewards = [r for r in _rows(run_dir / "stage3") if "rl/reward_mean" in r or "train/reward_mean" in r]
    assert rewards, _rows(run_dir / "stage3")
