"""launchers/: sbatch rendering (asserted line by line), torchrun argv, validation, PreemptionHandler, CLI."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nemotune.recipes.launch import main as launch_main
from nemotune.launchers.config import ClusterConfig, time_limit_seconds, validate_cluster
from nemotune.recipes.engine.preemption import PreemptionHandler
from nemotune.launchers.slurm import render_jobs, render_sbatch
from nemotune.launchers.torchrun import entry_argv, torchrun_argv

REPO = Path(__file__).resolve().parents[1]


def cluster(**kw):
    from dataclasses import asdict

    base = asdict(ClusterConfig(kind="slurm", output_dir="/lustre/runs/x/slurm", job_name="nemotune-x",
                                workdir="/lustre/nemotune", python="/opt/venv/bin/python"))
    base.update(kw)
    return base


def sbatch_lines(script):
    return [l[len("#SBATCH "):] for l in script.splitlines() if l.startswith("#SBATCH ")]


def line_starting(script, prefix):
    hits = [l for l in script.splitlines() if l.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory):
    """A minimal root config beside the real conf/cluster group (the full lora_sft tree needs every group);
    the cluster node is typed by ClusterConfig, which holds the defaults the group files leave out."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="launch_test_schema", node={"cluster": ClusterConfig})
    root = tmp_path_factory.mktemp("conf")
    shutil.copytree(REPO / "conf" / "cluster", root / "cluster")
    (root / "launch_test.yaml").write_text(
        "defaults:\n  - launch_test_schema\n  - cluster: local\n  - _self_\n"
        f"run: {{name: t, output_dir: {root}/run}}\n"
        "parallel: {tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1, context_parallel_size: 1}\n"
        "trainer: {sft: {max_steps: 20}}\n"
        "stages: []\n")
    return root


def test_single_node_gpu_script_line_by_line():
    script = render_sbatch(cluster(nodes=1, gpus_per_node=8, nproc_per_node=8, partition="batch",
                                   account="llm", time="02:00:00", exclusive=True,
                                   signal_seconds_before_timeout=300, env={"NCCL_DEBUG": "WARN"}),
                           ["experiment=nano8b_fiqa_lora", "cluster=slurm"])
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert sbatch_lines(script) == [
        "--job-name=nemotune-x", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--mem=0",  # exclusive: all of the node's memory
        "--partition=batch", "--account=llm", "--time=02:00:00",
        "--output=/lustre/runs/x/slurm/%x-%j.out", "--error=/lustre/runs/x/slurm/%x-%j.err",
        "--exclusive", "--signal=USR1@300", "--requeue", "--open-mode=append"]
    assert "set -euo pipefail" in lines
    assert "export NCCL_DEBUG=WARN" in lines and "export PYTHONUNBUFFERED=1" in lines
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "MASTER_PORT=29500" in lines
    assert "cd /lustre/nemotune" in lines
    # the node command is a quoted heredoc: Slurm variables expand per node, the agent ignores USR1
    i = lines.index("read -r -d '' NODE_CMD <<'NEMOTUNE_NODE' || true")
    assert lines[i + 1] == "trap '' USR1"
    assert lines[i + 2] == (
        "exec /opt/venv/bin/python -m torch.distributed.run --nproc_per_node=8 --nnodes=\"$SLURM_NNODES\" "
        "--node_rank=\"$SLURM_NODEID\" --rdzv_backend=c10d --rdzv_endpoint=\"$HEAD_NODE:$MASTER_PORT\" "
        "--rdzv_id=\"$SLURM_JOB_ID\" --tee=3 "
        "--log-dir=/lustre/runs/x/slurm/ranks/\"$SLURM_JOB_ID\"-node\"$SLURM_NODEID\" "
        "-m nemotune.recipes.lora_sft experiment=nano8b_fiqa_lora cluster=slurm")
    assert lines[i + 3] == "NEMOTUNE_NODE"
    # the node task gets every CPU of the exclusive node (srun's default is one) and labels its lines
    assert line_starting(script, "srun ") == (
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 '
        '--cpus-per-task="$SLURM_CPUS_ON_NODE" --label bash -c "$NODE_CMD" || status=$?')
    assert "--container" not in script
    # requeue after a pre-timeout checkpoint happens from the batch shell, once srun has returned
    j = lines.index('if [ -f "$NEMOTUNE_REQUEUE_FILE" ]; then')
    assert j > lines.index(line_starting(script, "srun "))
    assert '  scontrol requeue "$SLURM_JOB_ID"' in lines[j:]
    assert lines[-1] == 'exit "$status"'
    bash = shutil.which("bash")
    if bash:
        assert subprocess.run([bash, "-n"], input=script, text=True).returncode == 0


def test_four_node_container_script_line_by_line():
    c = cluster(nodes=4, gpus_per_node=8, nproc_per_node=8, container=True,
                container_image="/images/nemotune.sqsh", container_mounts=["/lustre:/lustre", "/data:/data:ro"],
                container_workdir="/workspace/nemotune", python=None, requeue=False,
                signal_seconds_before_timeout=0, sbatch_args=["--reservation=llm"], master_port=6000,
                time="1-00:00:00")
    script = render_sbatch(c, ["experiment=x", "trainer.optim.lr=5e-5", "run.name=a b"])
    sb = sbatch_lines(script)
    assert sb[:4] == ["--job-name=nemotune-x", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert "--time=1-00:00:00" in sb and "--reservation=llm" == sb[-1]
    assert "--cpus-per-task=8" in sb and not any(s.startswith(("--mem", "--exclusive")) for s in sb)  # one per rank
    assert not any(s.startswith(("--signal", "--requeue", "--open-mode", "--partition", "--account")) for s in sb)
    assert "MASTER_PORT=6000" in script.splitlines()
    exec_line = line_starting(script, "exec ")
    # inside a container the interpreter is the image's python; a space-containing override stays one arg
    assert exec_line.startswith("exec python -m torch.distributed.run --nproc_per_node=8 --nnodes=\"$SLURM_NNODES\"")
    assert exec_line.endswith("-m nemotune.recipes.lora_sft experiment=x trainer.optim.lr=5e-5 'run.name=a b'")
    assert line_starting(script, "srun ") == (
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 '
        '--cpus-per-task="$SLURM_CPUS_PER_TASK" --label --container-image=/images/nemotune.sqsh '
        "--container-mounts=/lustre:/lustre,/data:/data:ro,/lustre/runs/x/slurm:/lustre/runs/x/slurm "
        '--container-workdir=/workspace/nemotune bash -c "$NODE_CMD" || status=$?')


def test_cpu_job_has_no_gpu_line_and_stages_become_chained_jobs():
    cfg = {"cluster": cluster(nodes=2, gpus_per_node=0, nproc_per_node=2, cpus_per_task=2),
           "stages": [{"name": "stage1", "overrides": {}}, {"name": "stage2", "overrides": {}}]}
    jobs = render_jobs(cfg, ["experiment=two_stage"])
    assert [j.name for j in jobs] == ["nemotune-x-stage1", "nemotune-x-stage2"]
    for job in jobs:
        sb = sbatch_lines(job.script)
        assert f"--job-name={job.name}" in sb and "--cpus-per-task=2" in sb
        assert not any(s.startswith("--gpus") for s in sb)
        assert line_starting(job.script, "exec ").endswith(
            f"-m nemotune.recipes.two_stage experiment=two_stage run.stage={job.stage}")
    assert "runs after nemotune-x-stage1 succeeds" in jobs[1].script.splitlines()[1]


def test_torchrun_argv_local_and_multinode():
    single = torchrun_argv({"nodes": 1, "nproc_per_node": 2}, entry_argv(None, ["a=1"]), python="py")
    assert single == ["py", "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                      "-m", "nemotune.recipes.lora_sft", "a=1"]
    multi = torchrun_argv({"nodes": 2, "nproc_per_node": 1, "node_rank": 1, "rdzv_endpoint": "10.0.0.1:29400",
                           "job_name": "j", "rdzv_backend": "c10d"}, entry_argv("train.py", []), python="py")
    assert multi == ["py", "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2", "--node_rank=1",
                     "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=j", "train.py"]


def test_validate_cluster_reports_every_problem_with_key_and_fix():
    cfg = {"cluster": {**cluster(nodes=0, gpus_per_node=8, nproc_per_node=4, container=True, container_image=None,
                                 time="2h", signal_seconds_before_timeout=-1, master_port=70000,
                                 container_mounts=["nocolon"]), "bogus_key": 1},
           "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}}
    problems = validate_cluster(cfg)
    text = "\n".join(problems)
    for expected in ("cluster.bogus_key: unknown key", "cluster.nodes=0", "cluster.gpus_per_node=8: more GPUs",
                     "cluster.container_image: required when cluster.container=true",
                     "cluster.time=2h", "cluster.signal_seconds_before_timeout=-1", "cluster.master_port=70000",
                     "'nocolon' is not src:dst"):
        assert expected in text, (expected, text)
    assert len(problems) == 8
    assert validate_cluster({"cluster": cluster(nodes=2, gpus_per_node=8, nproc_per_node=8),
                             "parallel": {"tensor_model_parallel_size": 8,
                                          "pipeline_model_parallel_size": 2}}) == []


def test_validate_cluster_world_size_against_model_parallel():
    par = {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2}
    (too_many,) = validate_cluster({"cluster": cluster(nodes=3, gpus_per_node=4, nproc_per_node=4), "parallel": par})
    assert too_many.startswith("cluster.nodes x cluster.nproc_per_node = 12 ranks: more than TP x PP x CP x DP")
    assert "multiple of 8" in too_many
    (too_few,) = validate_cluster({"cluster": cluster(nodes=1, gpus_per_node=4, nproc_per_node=4), "parallel": par})
    assert "fewer than TP x PP x CP" in too_few
    (local,) = validate_cluster({"cluster": dict(cluster(kind="local", nodes=2), rdzv_endpoint=None)})
    assert local.startswith("cluster.rdzv_endpoint: required")


def test_time_limit_formats():
    assert [time_limit_seconds(t) for t in ("30", "02:00:00", "1-00:00:00", "1-2", "10:30")] == \
        [1800, 7200, 86400, 93600, 630]
    assert time_limit_seconds("2h") == -1


def test_preemption_handler_single_process():
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one recorded
        assert handler.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_requeue_touches_marker_under_nemotune_script(tmp_path, monkeypatch):
    handler = PreemptionHandler(install=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert handler.requeue() is False  # not under Slurm: nothing to do
    marker = tmp_path / "requeue-7"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("NEMOTUNE_REQUEUE_FILE", str(marker))
    monkeypatch.setenv("RANK", "1")
    assert handler.requeue() is False and not marker.exists()  # only global rank 0 acts
    monkeypatch.setenv("RANK", "0")
    assert handler.requeue() is True and marker.exists()


def _fail_sbatch(monkeypatch):
    calls = []
    real_run = subprocess.run

    def guarded(cmd, *a, **kw):
        if cmd and str(cmd[0]).endswith("sbatch"):
            calls.append(cmd)
            raise AssertionError(f"sbatch must not run: {cmd}")
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", guarded)
    return calls


@pytest.mark.parametrize("overrides, expected", [
    (["cluster.bogus=1"], "Key 'bogus' not in 'ClusterConfig'"),
    (["+cluster.bogus=1"], "cluster.bogus: unknown key"),
    (["cluster.gpus_per_node=8", "cluster.nproc_per_node=8", "cluster.nodes=3",
      "parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=4"],
     "more than TP x PP x CP x DP"),
    (["cluster=slurm_ngc"], "cluster.container_image: required when cluster.container=true"),
])
def test_cli_bad_input_fails_before_submitting(conf_dir, overrides, expected, monkeypatch, capsys):
    calls = _fail_sbatch(monkeypatch)
    argv = ["--config-dir", str(conf_dir), "--config-name", "launch_test", "cluster=slurm", *overrides]
    assert launch_main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "nothing was started or submitted" in err.lower()
    assert calls == []


def test_cli_dry_run_prints_script_and_submits_nothing(conf_dir, monkeypatch, capsys):
    calls = _fail_sbatch(monkeypatch)
    argv = ["--config-dir", str(conf_dir), "--config-name", "launch_test", "cluster=slurm", "cluster.nodes=4",
            "cluster.partition=batch", "--dry-run"]
    assert launch_main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=4" in out and "#SBATCH --partition=batch" in out and "#SBATCH --gpus-per-node=8" in out
    assert f"#SBATCH --output={conf_dir}/run/slurm/%x-%j.out" in out
    assert "cluster=slurm cluster.nodes=4 cluster.partition=batch" in out
    assert calls == [] and not (conf_dir / "run").exists()


def test_cli_local_dry_run(conf_dir, capsys):
    argv = ["--config-dir", str(conf_dir), "--config-name", "launch_test", "cluster.nproc_per_node=2", "--dry-run"]
    assert launch_main(argv) == 0
    assert capsys.readouterr().out.strip() == (
        f"{sys.executable} -m torch.distributed.run --nproc_per_node=2 --standalone -m nemotune.recipes.lora_sft "
        "cluster.nproc_per_node=2")


def fake_prepared(out: Path, splits=("train", "validation"), pack_size=1024, seed=1234) -> Path:
    """What launch checks before queueing: a manifest naming the splits and each split's packed file."""
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"splits": list(splits)}))
    for split in splits:
        (out / split).mkdir()
        (out / split / f"packed_{pack_size}_seed{seed}.npy").write_bytes(b"")
    return out


def test_real_conf_tree_dry_run_needs_prepared_data(tmp_path, monkeypatch, capsys):
    from nemotune.recipes.launch import compose

    cfg = compose("lora_sft", ["cluster=slurm", "cluster.nodes=2"])
    assert cfg.cluster.kind == "slurm" and cfg.cluster.nproc_per_node == 8
    calls = _fail_sbatch(monkeypatch)
    prep = tmp_path / "prep"
    argv = ["cluster=slurm", "cluster.nodes=2", "cluster.partition=p", "trainer.global_batch_size=16",
            f"data.output_dir={prep}", "--dry-run"]
    assert launch_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"nemotune launch: nothing was started or submitted: data.output_dir={prep}: no prepared data "
                   f"(no manifest.json); run `nemotune prep data.output_dir={prep}` first")
    fake_prepared(prep)
    assert launch_main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --exclusive" in out and "#SBATCH --mem=0" in out
    assert calls == []
    # the same job with a global batch that DP=16 does not divide: refused with the key and the fix
    assert launch_main([a for a in argv if not a.startswith("trainer.global_batch_size")]) == 2
    assert "trainer.global_batch_size=8: must be divisible by micro_batch_size x data-parallel size = 1 x 16" in \
        capsys.readouterr().err


def test_cli_ngc_container_example(conf_dir, monkeypatch, capsys):
    calls = _fail_sbatch(monkeypatch)
    argv = ["--config-dir", str(conf_dir), "--config-name", "launch_test", "cluster=slurm_ngc",
            "cluster.container_image=/images/nemotune.sqsh", "cluster.nodes=2", "--dry-run"]
    # the run dir of this config ({conf_dir}/run) lies outside the image's default mounts: refused by name
    assert launch_main(argv) == 2
    err = capsys.readouterr().err
    assert f"run.output_dir={conf_dir}/run: the container job cannot see" in err
    root = "/" + str(conf_dir).strip("/").split("/")[0]
    assert f"add the mount {root}:{root} to cluster.container_mounts" in err and calls == []
    argv.append(f"cluster.container_mounts=[/srv/nemotune:/workspace/nemotune,{root}:{root}]")
    assert launch_main(argv) == 0
    script = capsys.readouterr().out.split("\n", 1)[1]
    srun = line_starting(script, "srun ")
    assert "--container-image=/images/nemotune.sqsh" in srun and "--container-workdir=/workspace/nemotune" in srun
    assert f"/srv/nemotune:/workspace/nemotune,{root}:{root}," in srun
    assert f"{conf_dir}/run/slurm:{conf_dir}/run/slurm" in srun
    assert line_starting(script, "exec ").startswith("exec python -m torch.distributed.run --nproc_per_node=8")
    lines = script.splitlines()
    assert "export NCCL_IB_DISABLE=0" in lines and "export NCCL_DEBUG=WARN" in lines  # slurm.yaml env kept
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --exclusive" in lines and calls == []
