"""bench/gpu_check.py without a GPU: the carried wheel set covers every runtime dependency, and a missing
wheel is named before anything runs. (The CUDA tests themselves are tests/test_gpu.py.)"""
import importlib.util
import re
import subprocess
import sys
import tomllib

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_every_runtime_dependency_is_on_the_gpu_machine_or_carried():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    carried = {_name(spec) for spec in gpu_check.GPU_MACHINE_LACKS + gpu_check.BUILT_HERE}
    present = set(gpu_check.GPU_MACHINE_HAS)
    uncovered = [_name(d) for d in dependencies if _name(d) not in carried | present]
    assert not uncovered, f"add these to GPU_MACHINE_LACKS (or GPU_MACHINE_HAS if the image has them): {uncovered}"
    assert "megatron-core" in carried and "megatron-core" not in present


def test_missing_wheels_are_named(tmp_path):
    (tmp_path / "hydra_core-1.3.2-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "nemotune-0.1.0-py3-none-any.whl").write_bytes(b"")
    missing = gpu_check.missing_wheels(tmp_path)
    assert "megatron-core" in missing and "antlr4-python3-runtime" in missing
    assert "hydra-core" not in missing and "nemotune" not in missing


def test_check_without_wheels_stops_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "run", "--dry-run",
                             "--wheels", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"gpu-check: {tmp_path} lacks wheels for ['megatron-core', 'hydra-core', 'omegaconf', 'datasets', 'dill', "
        "'multiprocess', 'einops', 'antlr4-python3-runtime', 'nemotune']; run `make gpu-wheels` on a machine that reaches the "
        "package index and carry .whl/ along"]
