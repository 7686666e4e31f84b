"""The CUDA checks of `make gpu-check`: bf16 training on the GPU against the fp32 CPU reference, packed =
unpacked on the GPU path (Transformer Engine's THD `cu_seqlens` when TE imports), and a checkpoint resume.

They run where CUDA is (bench/gpu_check.py, `make gpu-check` on a GPU machine) and are skipped elsewhere.
`NEMOTUNE_GPU_CHECK_DEVICE=cpu` (what `make gpu-check DRY_RUN=1` sets) runs the same worker on the CPU, so the
whole path except CUDA is exercised on any machine.
"""
import json
import os

import pytest
import torch

from conftest import REPO, run_torchrun

DEVICE = os.environ.get("NEMOTUNE_GPU_CHECK_DEVICE", "cuda")
# bf16 against fp32 on the tiny model: loss ~6.9, bf16 rounding of activations and weights moves it by ~1e-2
BF16_RELATIVE_TOLERANCE = 0.01
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device: run `make gpu-check` on a GPU machine "
                              "(`make gpu-check DRY_RUN=1` runs this path on the CPU)"),
]


def _worker(assets, root, precision, env):
    out = root / "results.json"
    run_torchrun(REPO / "tests" / "dist" / "gpu_worker.py", out, assets["prep"], assets["mcore"], assets["base"],
                 root / "runs", precision, nproc=1, timeout=900, env=env)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def device_run(tiny_assets, tmp_path_factory):
    precision = "bf16" if DEVICE == "cuda" else "fp32"
    return _worker(tiny_assets, tmp_path_factory.mktemp("device"), precision, env={})


@pytest.fixture(scope="module")
def cpu_reference(tiny_assets, tmp_path_factory):
    return _worker(tiny_assets, tmp_path_factory.mktemp("cpu"), "fp32", env={"CUDA_VISIBLE_DEVICES": ""})


def test_the_worker_ran_on_the_requested_device(device_run):
    assert device_run["device"] == DEVICE


def test_step_losses_match_the_fp32_cpu_reference(device_run, cpu_reference):
    assert cpu_reference["device"] == "cpu"
    tolerance = BF16_RELATIVE_TOLERANCE if DEVICE == "cuda" else 1e-6
    assert list(device_run["steps"]) == list(cpu_reference["steps"]) == ["1", "2", "3", "4"]
    for step, reference in cpu_reference["steps"].items():
        assert abs(device_run["steps"][step] - reference) <= tolerance * reference, (step, device_run["steps"][step],
                                                                                     reference)


def test_packed_loss_equals_unpacked_on_the_device_path(device_run):
    packing = device_run["packing"]
    assert packing["documents"] >= 2
    tolerance = 1e-2 if DEVICE == "cuda" else 1e-6  # bf16: the two layouts round differently
    assert abs(packing["packed"] - packing["unpacked"]) <= tolerance * packing["unpacked"], packing


def test_resume_from_a_checkpoint_reproduces_the_steps_after_it(device_run):
    tolerance = 1e-3 if DEVICE == "cuda" else 1e-6  # cuBLAS may pick other kernels after a restart
    assert list(device_run["resumed"]) == ["3", "4"]
    for step, loss in device_run["resumed"].items():
        assert abs(loss - device_run["steps"][step]) <= tolerance * loss, (step, loss, device_run["steps"][step])
