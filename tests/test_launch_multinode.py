"""Two "nodes" on loopback: two torchrun agents (--nnodes 2, one rank each, c10d rendezvous on 127.0.0.1)
train the tiny model to the same losses as one node with two ranks. Both command lines come from
nemotune.launchers.torchrun, the builder the local and Slurm launchers use."""
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from nemotune.launchers.torchrun import entry_argv, torchrun_argv

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 3


def _overrides(run_dir: Path, assets: dict):
    return ["experiment=tiny_lora", f"model.hf_path={assets['base']}", f"model.checkpoint={assets['mcore']}",
            f"data.output_dir={assets['prep']}", "trainer.train_split=sft", "trainer.validation_split=eval",
            f"trainer.sft.max_steps={STEPS}", "trainer.sft.val_check_interval=100", "trainer.sft.limit_val_batches=1",
            "run.tensorboard=false", f"run.output_dir={run_dir}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def _losses(run_dir: Path):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["train/loss"] for l in lines if "train/loss" in l]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_loopback_nodes_match_one_node_two_ranks(tmp_path, tiny_assets):
    one_dir, two_dir = tmp_path / "one_node", tmp_path / "two_nodes"
    single = torchrun_argv({"nodes": 1, "nproc_per_node": 2}, entry_argv(None, _overrides(one_dir, tiny_assets)))
    proc = subprocess.run(single, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert "(2 micro-batches x 2 data-parallel)" in proc.stdout, proc.stdout[-3000:]

    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(
        torchrun_argv({"nodes": 2, "nproc_per_node": 1, "node_rank": rank, "rdzv_endpoint": endpoint,
                       "rdzv_backend": "c10d", "job_name": "loopback"}, entry_argv(None, _overrides(two_dir, tiny_assets))),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # node 0's agent runs global rank 0 (the only printer): one rank per node, two data-parallel replicas
    assert "(2 micro-batches x 2 data-parallel)" in outputs[0], outputs[0][-3000:]

    one, two = _losses(one_dir), _losses(two_dir)
    assert len(one) == STEPS and len(set(one)) == STEPS, one  # real, changing losses
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
