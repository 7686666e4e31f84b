# syntax=docker/dockerfile:1.7
# nemotune on the NGC PyTorch container (multi-node training through Slurm + pyxis/enroot).
#
#   docker build -t <registry>/nemotune:0.1.0 .
#   docker push <registry>/nemotune:0.1.0
#   enroot import -o /lustre/images/nemotune.sqsh docker://<registry>#nemotune:0.1.0
#   nemotune launch experiment=<name> cluster=slurm_ngc cluster.container_image=/lustre/images/nemotune.sqsh
#
# 25.06: Ubuntu 24.04, Python 3.12, PyTorch 2.8.0a0 (nv25.6), CUDA 12.9, Transformer Engine, triton,
# NCCL -- inside our bounds (Python >= 3.10, torch >= 2.4; megatron-core >= 0.16.1 installs from PyPI).
ARG NGC_TAG=25.06
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/nemotune-src

# Never let pip replace the image's CUDA builds (torch, Transformer Engine, flash-attn, triton, apex, NVIDIA
# libraries, and numpy they are compiled against): their installed versions become constraints.
RUN python -m pip list --format=freeze \
    | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine[-_a-z0-9]*|flash[-_]attn|apex|nvidia[-_a-z0-9]*|cupy[-_a-z0-9]*|numpy)==' \
    > /etc/nemotune-image-constraints.txt

COPY pyproject.toml README.md ./
COPY recipes recipes
COPY converters converters
COPY data_prep data_prep
COPY launchers launchers
COPY conf conf

# The package without dependency resolution, then its dependencies except torch / triton / TE (the
# image's own; the `gpu` extra = transformer-engine[pytorch] is satisfied by the image's TE, which pip
# would otherwise try to rebuild from source), resolved under the constraints above.
RUN python -m pip install --no-deps . \
 && python - <<'EOF' > /tmp/nemotune-deps.txt
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["eval"]
skip = re.compile(r"^(torch|triton|transformer[-_]engine)\b", re.I)
print("\n".join(d for d in deps if not skip.match(d)))
EOF
RUN python -m pip install -c /etc/nemotune-image-constraints.txt -r /tmp/nemotune-deps.txt \
 && python -c "import torch, megatron.core, transformer_engine.pytorch, nemotune.recipes, nemotune.launchers, nemotune.converters, nemotune.data_prep; \
print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

# Nemotron-H (hybrid Mamba-2) runs megatron-core's MambaMixer on mamba_ssm's Triton kernels and causal_conv1d's
# CUDA conv (the `mamba` extra); built here against the image's torch / CUDA (no build isolation, so pip cannot
# swap torch). Without them nemotune falls back to its reference PyTorch kernels (recipes/engine/mamba_cpu.py).
RUN python -m pip install --no-build-isolation -c /etc/nemotune-image-constraints.txt \
        "causal-conv1d>=1.4" "mamba-ssm>=2.2" \
 && python -c "import causal_conv1d, mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)"

# No network at run time: models, tokenizers and datasets come from mounted paths / the HF cache.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/root/.cache/huggingface \
    CUDA_DEVICE_MAX_CONNECTIONS=1

CMD ["nemotune", "--help"]
