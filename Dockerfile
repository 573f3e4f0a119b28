# ProxyGML training image: CUDA 13.0 base + the pinned requirements.txt, installed exactly as .ci/run does.
#
# Base choice: torch==2.14.1 from requirements.txt is a CUDA 13.0 build (+cu130) whose CUDA libraries (cuBLAS,
# cuDNN, NCCL, ...) come as pip wheels, so the base only needs the CUDA 13.0 runtime layer: nvidia/cuda
# *-base-* (cudart, the forward-compatibility driver libraries, NVIDIA_* variables for the container toolkit).
# A pytorch/pytorch base would bring a second, conda-installed torch that CI never tests.
#
# Any apt-based base works as CUDA_IMAGE (python3 comes from its archive): a Debian bookworm base runs the image
# on machines without a GPU (Python 3.11 there, 3.12 on Ubuntu 24.04; requirements.txt's wheels exist for both).
#
#   docker build -t proxygml .
#   launch/build_image.sh --debian        # podman, a Debian base made locally; lends the build pip's sources
#   python -m trainer.weights fetch bninception --out weights/bninception.pth    # once, on a connected machine
#   docker run --gpus all --ipc=host -v /data/cub200:/data:ro -v "$PWD/weights":/weights:ro -v "$PWD/runs":/runs \
#     proxygml --config cub200 data.root=/data model.weights_file=/weights/bninception.pth run.output_dir=/runs
# More (multi-node, Apptainer, SLURM) in docs/multi-gpu-and-clusters.md and docs/clusters.md.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The base's Python 3 (Ubuntu 24.04: 3.12, Debian bookworm: 3.11) in a venv; g++ and the Python headers for the kernels Triton (torch.compile) and DeepSpeed
# build at run time. Ubuntu rotates patch versions out of its archive, so apt packages are not pinned; the
# Python packages are, by requirements.txt.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/proxygml
# The same two installs as .ci/run: the pinned requirements, then the project itself without dependencies.
COPY requirements.txt ./
# A package index behind a TLS-inspecting proxy or a private mirror: pip's own variables as build arguments
# (--build-arg PIP_CERT=... PIP_INDEX_URL=...); unset unless given, and used by the install steps alone.
ARG PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY collectives ./collectives
COPY registry ./registry
COPY loss ./loss
COPY data_shards ./data_shards
COPY trainer ./trainer
COPY launch ./launch
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && python -c "import torch, webdataset, omegaconf, mlflow, faiss, timm, deepspeed, trainer; print('torch', torch.__version__)"

# Non-root user; /runs and /data are the mount points for the run directory and the shards.
# (Ubuntu 24.04 images ship a user "ubuntu" with uid 1000: it makes way.)
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --shell /bin/bash proxygml \
 && mkdir -p /runs /data \
 && chown proxygml:proxygml /runs
USER 1000:1000
# HOME for the user; MLflow's git probe stays quiet (no git in the image: the run records no commit)
ENV HOME=/home/proxygml \
    GIT_PYTHON_REFRESH=quiet
# Relative paths (the demo's shards, MLflow's default sqlite:///mlflow.db) land in the mounted run directory.
WORKDIR /runs

# Every argument goes to `python -m trainer`; the entry point runs it under torchrun, one process per GPU.
# Multi-node: --entrypoint /opt/proxygml/launch/multi_node.sh (see the README).
ENTRYPOINT ["/opt/proxygml/launch/single_node.sh"]
CMD ["--config", "demo"]
