# The README's two commands: `make demo` and `make test`. Both create .venv and install everything on a
# fresh machine. torch==2.13.0 is installed first (the CPU build on CPU machines) only when no torch is
# importable, so pip never pulls the CUDA build through the package's `torch>=` lower bound.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nemotune-installed

.PHONY: setup demo test bench-cpu gpu-wheels gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) -m nemotune.recipes.demo

test: setup
	$(PY) -m pytest -q tests

# the CPU benchmarks of bench/RESULTS.md (a few minutes); bench/gpu_lora.py needs a GPU
bench-cpu: setup
	$(PY) bench/train_cpu.py
	$(PY) bench/packing.py
	$(PY) bench/prep.py

# The GPU check (bench/gpu_check.py): `make gpu-wheels` here downloads, for CPython 3.12 / manylinux x86_64,
# the wheels a bare GPU machine lacks into .whl/ (ignored); `make gpu-check` there installs them offline and
# runs the CUDA tests and the LoRA bench with the machine's own python3 (no .venv). DRY_RUN=1: on the CPU.
gpu-wheels: setup
	$(PY) bench/gpu_check.py wheels

gpu-check:
	$(if $(DRY_RUN),$(PY),$(PYTHON)) bench/gpu_check.py run $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf $(VENV) work
