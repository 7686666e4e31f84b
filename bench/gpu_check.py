"""The GPU check: prepare offline wheels here, then run the CUDA tests and the Nano-8B-shape LoRA bench there.

A lent GPU machine has CUDA PyTorch on Python 3.12 but no internet and no megatron-core, Hydra or
`datasets`. So the check travels as wheels:

    make gpu-wheels            # here (network to the package index): .whl/ = the wheels such a machine lacks,
                               # for CPython 3.12 / manylinux x86_64, plus nemotune's own wheel
    make gpu-check             # there, from the repository root with .whl/ beside it: installs the wheels
                               # offline into a private folder, then runs, in under 8 minutes,
                               #   1. tests/test_gpu.py (bf16 steps vs the fp32 CPU reference, packed =
                               #      unpacked on the GPU path, checkpoint resume)
                               #   2. bench/gpu_lora.py --precisions bf16 (tokens/s/GPU, MFU, peak memory)
                               #   3. `nemotune plan`'s prediction for the bench's configuration
    make gpu-check DRY_RUN=1   # anywhere: the same steps with the worker on the CPU and the tiny bench,
                               # checking the wheel set instead of installing it

It says which attention path runs: Transformer Engine's spec when TE imports and CUDA is present, the local
spec with torch SDPA otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"
SITE = Path("/tmp/nemotune-gpu-site")
# Runtime dependencies a GPU machine of this workplace already has (its image's package list).
GPU_MACHINE_HAS = ["torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow", "tensorboard",
                   "rich", "tqdm", "matplotlib", "jinja2", "pyyaml", "pandas", "requests", "fsspec", "huggingface-hub",
                   "peft", "psutil", "pytest", "packaging", "xxhash", "aiohttp"]
# What it lacks, pinned so that the carried set is reproducible; megatron-core 0.19.x is the Python 3.12 line.
GPU_MACHINE_LACKS = [
    "megatron-core==0.19.2",
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "datasets==4.4.1",
    "dill==0.4.0",
    "multiprocess==0.70.18",
    "einops==0.8.2",  # megatron-core's MambaMixer (Nemotron-H)
]
# published as a source distribution only (pure Python): built into a wheel here
BUILT_HERE = ["antlr4-python3-runtime==4.9.3"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
WHEELS_LIMIT_BYTES = 60 * 2**20
TIME_BUDGET_SECONDS = 8 * 60


def say(message: str) -> None:
    print(f"gpu-check: {message}", flush=True)


def wheel_project(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("_", "-")


def build_wheels(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):
        stale.unlink()  # the folder is ours (ignored by git): one version of each wheel only
    platform_args = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    steps = [
        ["download", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platform_args,
         "-d", str(out), *GPU_MACHINE_LACKS],
        ["wheel", "-w", str(out), *BUILT_HERE, str(REPO)],
    ]
    for step in steps:
        result = subprocess.run([sys.executable, "-m", "pip", step[0], "-q", "--no-deps", *step[1:]])
        if result.returncode != 0:
            say(f"`pip {step[0]}` failed (exit {result.returncode}, its message is above); the package index "
                "must be reachable from this machine")
            return 1
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    for wheel in sorted(out.glob("*.whl")):
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    say(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {out} "
        f"(limit {WHEELS_LIMIT_BYTES / 2**20:.0f} MiB)")
    if total > WHEELS_LIMIT_BYTES:
        say("the wheels exceed the limit: drop what the GPU machine already has")
        return 1
    return 0


def missing_wheels(wheel_dir: Path) -> list[str]:
    have = {wheel_project(p) for p in wheel_dir.glob("*.whl")}
    wanted = [spec.split("==")[0].lower() for spec in GPU_MACHINE_LACKS + BUILT_HERE] + ["nemotune"]
    return [name for name in wanted if name not in have]


def install_wheels(wheel_dir: Path, *, dry_run: bool) -> dict:
    """Install the carried wheels offline into a private folder; returns the environment that sees them."""
    env = dict(os.environ)
    missing = missing_wheels(wheel_dir)
    if missing:
        raise SystemExit(f"gpu-check: {wheel_dir} lacks wheels for {missing}; run `make gpu-wheels` on a machine "
                         "that reaches the package index and carry .whl/ along")
    if dry_run:
        say(f"dry run: {len(list(wheel_dir.glob('*.whl')))} wheels present in {wheel_dir}; not installed "
            "(this interpreter already has the project)")
        return env
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, sorted(wheel_dir.glob("*.whl")))],
                   check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    say(f"installed the carried wheels into {SITE}")
    return env


def attention_path(env: dict) -> str:
    probe = ("import torch\ntry:\n import transformer_engine.pytorch\n te = True\nexcept Exception:\n te = False\n"
             "print('Transformer Engine spec' if te and torch.cuda.is_available() else "
             "'local spec with torch SDPA', torch.__version__, torch.cuda.is_available())")
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_checks(args) -> int:
    started = time.monotonic()
    env = install_wheels(Path(args.wheels), dry_run=args.dry_run)
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "4"), PYTHONWARNINGS="ignore")
    if args.dry_run:
        env["NEMOTUNE_GPU_CHECK_DEVICE"] = "cpu"
    say(f"attention: {attention_path(env)}")
    failures = 0
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                            "tests/test_gpu.py"], cwd=REPO, env=env)
    failures += tests.returncode != 0
    say(f"CUDA tests {'passed' if tests.returncode == 0 else 'FAILED'} ({time.monotonic() - started:.0f} s so far)")
    bench = [sys.executable, "bench/gpu_lora.py"]
    bench += ["--device", "cpu", "--tiny", "--precisions", "bf16", "--steps", "2", "--warmup", "1"] if args.dry_run \
        else ["--precisions", "bf16", "--steps", str(args.bench_steps)]
    result = subprocess.run(bench, cwd=REPO, env=env)
    failures += result.returncode != 0
    # the planner's prediction for the bench's own configuration (LoRA dim 8 / alpha 16 on all linear layers,
    # micro-batches of one pack, 4 packs per step), to set beside the measured peak memory and tokens/s
    shape = ["model=tiny", "data.pack_size=512", "--device", "cpu"] if args.dry_run else \
        ["model=nemotron_nano_8b", "data.pack_size=4096", "--gpu-type", "H200", "--gpu-memory", "141GiB"]
    plan = subprocess.run([sys.executable, "-m", "nemotune.recipes.plan", "peft.lora.dim=8", "peft.lora.alpha=16",
                           "peft.lora.target_modules=[all-linear]", "trainer.global_batch_size=4", *shape],
                          cwd=REPO, env=env)
    failures += plan.returncode != 0
    elapsed = time.monotonic() - started
    say(f"{'passed' if not failures else f'{failures} step(s) FAILED'} in {elapsed:.0f} s "
        f"(budget {TIME_BUDGET_SECONDS} s)")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="download the wheels a GPU machine lacks (run here)")
    wheels.add_argument("--out", default=str(WHEEL_DIR))
    run = sub.add_parser("run", help="install the wheels offline and run the CUDA tests and the bench (run there)")
    run.add_argument("--wheels", default=str(WHEEL_DIR))
    run.add_argument("--dry-run", action="store_true", help="everything but CUDA: CPU worker, tiny bench")
    run.add_argument("--bench-steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "wheels":
        return build_wheels(Path(args.out))
    return run_checks(args)


if __name__ == "__main__":
    sys.exit(main())
