"""Training and resume on mistaken or damaged input: refused in one line naming the file or key and the fix
(the battery rows), or continued correctly and said in one line (the tests below the rows).

One 4-step run (checkpoints at steps 2 and 4) is trained once; each case works on its own copy of it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from battery import BadInput, check, message_line
from battery import run as run_command
from conftest import REPO, run_module

pytestmark = pytest.mark.slow

TRAIN = ("nemotune.recipes.lora_sft", "experiment=tiny_lora", "model.hf_path={base}", "model.checkpoint={mcore}",
         "data.output_dir={prep}", "run.tensorboard=false", "trainer.train_split=sft",
         "trainer.validation_split=eval", "trainer.sft.val_check_interval=2", "trainer.sft.limit_val_batches=1",
         "trainer.save_top_k=-1", "trainer.sft.max_steps=4")
RUN = "run.output_dir={run}"

CASES = [
    BadInput("resume_with_another_global_batch", (*TRAIN, RUN, "trainer.global_batch_size=8"),
             ("trainer.global_batch_size=4", "changes the data order", "run.output_dir"), guard=("{run}",)),
    BadInput("resume_with_another_seed", (*TRAIN, RUN, "run.seed=7"), ("run.seed=1234", "step0000004"),
             guard=("{run}",)),
    BadInput("resume_on_another_split", (*TRAIN, RUN, "trainer.train_split=rl"), ("trainer.train_split=sft",),
             guard=("{run}",)),
    BadInput("resume_on_changed_prepared_data", (*TRAIN, RUN, "data.output_dir={changed_prep}"),
             ("train data (sha256 of the prepared split)",), guard=("{run}", "{changed_prep}")),
    BadInput("resume_from_a_corrupt_trainer_state", (*TRAIN, RUN),
             ("step0000004/trainer_state.json", "damaged", "run.resume_from=previous"), guard=("{run}",)),
    BadInput("resume_from_a_truncated_distcp", (*TRAIN, RUN),
             ("step0000004/dist/__0_0.distcp", "truncated", "run.resume_from=previous"), guard=("{run}",)),
    BadInput("resume_from_previous_without_one", (*TRAIN, RUN, "run.resume_from=previous"),
             ("run.resume_from=previous", "no previous one"), guard=("{run}",)),
    BadInput("resume_from_unknown_choice", (*TRAIN, RUN, "run.resume_from=oldest"),
             ("run.resume_from=oldest", "latest, previous"), guard=("{run}",)),
    BadInput("run_dir_locked_by_a_live_training", (*TRAIN, RUN),
             ("in use by another training", "pid {live_pid} on host {host}", "run.output_dir"), guard=("{run}",)),
    BadInput("run_dir_under_a_file", (*TRAIN, "run.output_dir={a_file}/run"),
             ("{a_file}/run", "not writable", "run.output_dir"), guard=("{a_file}",)),
    BadInput("base_checkpoint_of_another_model", (*TRAIN, RUN, "model.checkpoint={other_mcore}"),
             ("model.checkpoint={other_mcore}", "model.hf_path={base}", "tensor decoder.layers.mlp.linear_fc2.weight",
              "[2, 64, 128] in the checkpoint but [2, 64, 176]"), guard=("{run}", "{other_mcore}")),
]


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    """A finished 4-step run with complete checkpoints at steps 2 and 4, and a base of another shape."""
    from nemotune.converters.tiny_model import write_tiny_llama

    root = tmp_path_factory.mktemp("bad_training")
    values = {"base": tiny_assets["base"], "mcore": tiny_assets["mcore"], "prep": tiny_assets["prep"]}
    run_module(*[a.format(**values) for a in TRAIN], f"run.output_dir={root / 'trained'}")
    checkpoints = sorted(p.name for p in (root / "trained" / "checkpoints").iterdir())
    assert checkpoints == ["step0000002", "step0000004"], checkpoints
    write_tiny_llama(root / "other_base", ffn=128)
    run_module("nemotune.converters.convert", "hf-to-megatron", "--hf", root / "other_base", "--out",
               root / "other_mcore", "--no-progress")
    return {**values, "root": root, "trained": root / "trained", "other_mcore": root / "other_mcore"}


def copy_run(trained, name: str) -> Path:
    target = trained["root"] / "cases" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(trained["trained"], target)
    return target


def _prepare(case: BadInput, trained) -> dict:
    run = copy_run(trained, case.name)
    step4 = run / "checkpoints" / "step0000004"
    values = {**trained, "run": run, "host": socket.gethostname(), "live_pid": os.getpid()}
    if case.name == "resume_from_a_corrupt_trainer_state":
        (step4 / "trainer_state.json").write_text('{"step": 4, "consumed_sam')
    elif case.name == "resume_from_a_truncated_distcp":
        shard = step4 / "dist" / "__0_0.distcp"
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif case.name == "resume_from_previous_without_one":
        shutil.rmtree(run / "checkpoints" / "step0000002")
    elif case.name == "run_dir_locked_by_a_live_training":
        (run / ".nemotune-train.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None, "started": "now"}))
    elif case.name == "run_dir_under_a_file":
        values["a_file"] = trained["root"] / "cases" / "a_file"
        values["a_file"].write_text("not a directory\n")
    elif case.name == "resume_on_changed_prepared_data":
        changed = trained["root"] / "cases" / "changed_prep"
        shutil.rmtree(changed, ignore_errors=True)
        shutil.copytree(trained["prep"], changed)
        manifest = json.loads((changed / "manifest.json").read_text())
        for name in manifest["outputs"]:  # as if the sft split were prepared from other data
            if name.startswith("sft"):
                manifest["outputs"][name] = "0" * 64
        (changed / "manifest.json").write_text(json.dumps(manifest))
        values["changed_prep"] = changed
    return values


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_training_input(case, trained):
    values = _prepare(case, trained)
    fmt = lambda s: str(s).format(**values)  # noqa: E731
    check(dataclasses.replace(case, argv=[fmt(a) for a in case.argv], needles=[fmt(n) for n in case.needles],
                              guard=[Path(fmt(g)) for g in case.guard]))


# ---- continued correctly, said in one line ---------------------------------------------------------------

def _train(trained, run: Path, *extra, check_rc: bool = True) -> subprocess.CompletedProcess:
    args = [a.format(**trained) for a in TRAIN]
    return run_module(*args, f"run.output_dir={run}", *extra, check=check_rc)


def _lr_by_step(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/lr"] for row in rows if "train/lr" in row}


def _expected_lrs(max_steps: int) -> dict:
    """The lr each step of an uninterrupted `max_steps` run trains at (the recipe's own schedule)."""
    from types import SimpleNamespace

    from nemotune.recipes.engine.builders import build_scheduler
    from nemotune.recipes.engine.config import compose

    cfg = compose("lora_sft", ["experiment=tiny_lora", f"trainer.sft.max_steps={max_steps}"])
    optimizer = SimpleNamespace(param_groups=[{}])
    scheduler = build_scheduler(cfg, optimizer, max_steps)
    lrs = {}
    for step in range(1, max_steps + 1):
        lrs[step] = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
    return lrs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_raised_max_steps_follows_the_longer_schedule_after_removing_stale_leftovers(trained):
    run = copy_run(trained, "raised_max_steps")
    owner = {"host": socket.gethostname(), "pid": _dead_pid(), "slurm_job_id": None, "started": "then"}
    (run / ".nemotune-train.lock").write_text(json.dumps(owner))
    stale = run / "checkpoints" / ".tmp-step0000006"
    (stale / "dist").mkdir(parents=True)
    (stale / ".owner.json").write_text(json.dumps(owner))
    foreign = run / "checkpoints" / ".tmp-step0000009"  # no owner record: not recognisably ours, kept
    foreign.mkdir()
    result = _train(trained, run, "trainer.sft.max_steps=8")
    lines = result.stdout.splitlines()
    schedule = [l for l in lines if l.startswith("resume:")]
    assert len(schedule) == 1 and schedule[0].startswith(
        "resume: trainer.sft.max_steps 4 -> 8: the cosine schedule now ends at step 8"), result.stdout
    assert sum(l.startswith("removed the stale lock") and f"pid {owner['pid']}" in l for l in lines) == 1
    assert sum(l.startswith("removed 1 stale temporary checkpoint") and ".tmp-step0000006" in l for l in lines) == 1
    assert foreign.is_dir() and not (run / ".nemotune-train.lock").exists()
    lrs, expected = _lr_by_step(run), _expected_lrs(8)
    assert sorted(lrs) == list(range(1, 9))
    for step in range(5, 9):  # the defect: steps 5-8 trained at lr 0
        assert lrs[step] > 0 and lrs[step] == pytest.approx(expected[step], rel=1e-6), (step, lrs[step])
    state = json.loads((run / "checkpoints" / "step0000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["consumed_samples"] == 32 and state["config"]["trainer.sft.max_steps"] == 8


def test_damaged_latest_checkpoint_resumes_from_the_previous_one_when_asked(trained):
    run = copy_run(trained, "resume_previous")
    (run / "checkpoints" / "step0000004" / "trainer_state.json").write_text("{not json")
    result = _train(trained, run, "run.resume_from=previous")
    assert "resuming from step0000002, not step0000004" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained_steps = [row["step"] for row in rows if "train/loss" in row]
    assert trained_steps == [1, 2, 3, 4, 3, 4]  # the first run's four, then 3 and 4 again
    state = json.loads((run / "checkpoints" / "step0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["consumed_samples"] == 16


def test_second_training_in_the_same_run_dir_is_refused_while_the_first_runs(trained):
    run = trained["root"] / "cases" / "concurrent"
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", *[a.format(**trained) for a in TRAIN], f"run.output_dir={run}"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / ".nemotune-train.lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (run / ".nemotune-train.lock").exists(), "the first training never took the lock"
        second = run_command([*[a.format(**trained) for a in TRAIN], f"run.output_dir={run}"])
    finally:
        out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    line = message_line(second.stderr)
    assert f"pid {first.pid} on host {socket.gethostname()}" in line and "run.output_dir" in line, line
    assert first.returncode == 0, err[-3000:]
    assert not (run / ".nemotune-train.lock").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step0000002", "step0000004"]


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def test_read_only_checkpoints_dir_is_refused_before_the_first_step(trained):
    run = trained["root"] / "cases" / "read_only"
    shutil.rmtree(run, ignore_errors=True)
    checkpoints = run / "checkpoints"
    if not _mount_tmpfs(checkpoints, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root and mount rights)")
    try:
        assert not os.access(checkpoints, os.W_OK) or not _probe_writes(checkpoints)
        result = _train(trained, run, check_rc=False)
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = message_line(result.stderr)
    assert f"{checkpoints} is not writable" in line and "run.output_dir" in line, line
    assert not (run / "metrics.jsonl").exists() and "step " not in result.stdout  # no step was trained


def _probe_writes(path: Path) -> bool:
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


def test_disk_full_during_a_checkpoint_save_names_the_path_and_removes_the_temporary(trained):
    run = trained["root"] / "cases" / "disk_full"
    shutil.rmtree(run, ignore_errors=True)
    if not _mount_tmpfs(run, "size=96k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        result = _train(trained, run, "trainer.sft.max_steps=2", check_rc=False)
        left = sorted(p.name for p in (run / "checkpoints").iterdir())
        metrics = (run / "metrics.jsonl").read_text()
    finally:
        subprocess.run(["umount", str(run)], check=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = message_line(result.stderr)
    assert "no space left on device" in line and str(run / "checkpoints" / "step0000002") in line, line
    assert ".tmp-step0000002 was removed" in line
    assert left == []  # neither a temporary nor a checkpoint that looks complete
    assert '"step": 2' in metrics  # it failed at the save, after training
