import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemotune.converters import tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_HF = tiny_model.tiny_hf_config()  # conf/model/tiny.yaml, the tiny model's one definition


@pytest.fixture
def tiny_hf_config():
    return tiny_model.tiny_hf_config()


@pytest.fixture
def shared_fiqa():
    path = SHARED_DATA / "fiqa" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"real FiQA rows not available ({path} is absent: ../shared/data lies beside the checkout)")
    return path


def run_torchrun(script: Path, *args, nproc: int = 2, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Launch a multi-rank gloo job on this machine (rendezvous on localhost:0) and return its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "--max_restarts", "0",
           str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {script.name} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def run_module(module: str, *args, timeout: int = 600, env=None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh process (keeps process groups out of the pytest process)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The demo's inputs, built once: the tiny HF base, its Megatron conversion, and the bundled sample
    prepared with the two-stage seed split (sft / rl / eval)."""
    root = tmp_path_factory.mktemp("tiny_assets")
    from nemotune.converters.tiny_model import write_tiny_llama

    write_tiny_llama(root / "tiny_base")
    run_module("nemotune.converters.convert", "hf-to-megatron", "--hf", root / "tiny_base", "--out", root / "tiny_mcore",
               "--no-progress")
    run_module("nemotune.data_prep", "data=fiqa_sample", "model=tiny", "data.resplit=true", f"data.output_dir={root / 'prep'}",
               "--quiet")
    return {"root": root, "base": root / "tiny_base", "mcore": root / "tiny_mcore", "prep": root / "prep"}
