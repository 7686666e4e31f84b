"""Two "nodes" on loopback: two torchrun agents (--nnodes 2, one rank each, c10d rendezvous on 127.0.0.1)
train the tiny model to the same losses as one node with two ranks. Both command lines come from
launchers.torchrun, the builder the local and Slurm launchers use."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.torchrun import entry_argv, torchrun_argv

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "recipes" / "lora_sft.py").exists(), reason="recipes/lora_sft.py not written yet"),
    pytest.mark.skipif(not (REPO / "conf" / "data" / "fiqa_sample.yaml").exists(),
                       reason="conf/data/fiqa_sample.yaml (used by experiment=tiny_lora) not written yet"),
]
STEPS = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    proc = subprocess.run([sys.executable, "-m", "data_prep", "data=fiqa_sample", "model=tiny",
                           f"data.output_dir={out}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def _overrides(run_dir: Path, prepared: Path):
    return ["experiment=tiny_lora", f"data.output_dir={prepared}", f"trainer.sft.max_steps={STEPS}",
            "trainer.sft.val_check_interval=100", "run.tensorboard=false", f"run.output_dir={run_dir}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def _losses(run_dir: Path):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["train/loss"] for l in lines if "train/loss" in l]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_loopback_nodes_match_one_node_two_ranks(tmp_path, prepared):
    one_dir, two_dir = tmp_path / "one_node", tmp_path / "two_nodes"
    single = torchrun_argv({"nodes": 1, "nproc_per_node": 2}, entry_argv(None, _overrides(one_dir, prepared)))
    proc = subprocess.run(single, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(
        torchrun_argv({"nodes": 2, "nproc_per_node": 1, "node_rank": rank, "rdzv_endpoint": endpoint,
                       "rdzv_backend": "c10d", "job_name": "loopback"}, entry_argv(None, _overrides(two_dir, prepared))),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    one, two = _losses(one_dir), _losses(two_dir)
    assert len(one) == STEPS and len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
