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
def sharded_tiny_hf(tmp_path_factory):
    """The tiny HF Llama (seed 0) in 100 KB shards: it spans several shards and q/k/v of a layer land in
    different ones, as in a real multi-shard download. Read-only for the tests that share it."""
    from nemotune.converters.formats.checkpoint import INDEX_NAME
    from nemotune.converters.tiny_model import write_tiny_llama

    out = write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=0, max_shard_size="100KB")
    assert (out / INDEX_NAME).is_file() and len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.fixture(scope="session")
def sharded_tiny_mcore(sharded_tiny_hf, tmp_path_factory):
    """Its Megatron dist checkpoint, written by `nemotune convert hf-to-megatron` (in-process)."""
    from nemotune.converters.convert import main as convert_main

    out = tmp_path_factory.mktemp("meg") / "mcore"
    assert convert_main(["hf-to-megatron", "--hf", str(sharded_tiny_hf), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def prep_conf_dir(tmp_path_factory):
    """The config root the data_prep tests run `nemotune prep` with."""
    from test_data_prep_support import prep_config_dir

    return prep_config_dir(tmp_path_factory.mktemp("conf"))


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
