# A GPU worker: CUDA PyTorch from the official image, diffusers on top, the built-in model inside.
#
# torch 2.13.0, the version the test suite runs (Makefile TORCH_SPEC): transformers 5 turns
# itself off below torch 2.6, and the worker calls torch.compiler.set_stance (2.6+).
# tests/test_image_requirements.py resolves this torch with every pin below and the ranges in
# pyproject.toml. The tag follows the official pattern <torch>-cuda<X.Y>-cudnn9-<flavour>;
# CUDA 12.8 runs on drivers >= 570 (Hopper, Ada, Ampere, Blackwell). Pick another CUDA build
# of the same torch with --build-arg BASE_IMAGE=... (this repository cannot pull images, so
# check `docker pull` of the tag once on a new host).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

# IMAGEGEN_COMPILE=true: Triton builds its kernel launchers with a C compiler at run time, and
# the -runtime images carry none (the -devel tag would, at several GB more).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/imagegen
# The worker's dependencies (pyproject.toml) at the versions of requirements.lock, the last
# green run's. The base image's torch is held as a constraint too: a pin that wanted another
# torch fails the build instead of replacing the CUDA build with a wheel from PyPI.
COPY pyproject.toml requirements.lock README.md ./
COPY docker/requirements.py ./docker/
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch.txt \
    && python docker/requirements.py gateway worker > /tmp/requirements.txt \
    && pip install --constraint /tmp/torch.txt --constraint requirements.lock \
        --requirement /tmp/requirements.txt \
    && rm /tmp/torch.txt /tmp/requirements.txt
COPY imagegen ./imagegen
COPY worker ./worker
COPY builtin_model ./builtin_model
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 imagegen \
    && mkdir -p /cache/huggingface /cache/inductor \
    && chown imagegen /cache/huggingface /cache/inductor

USER 10001
# The worker's liveness is its heartbeat in Redis; compose checks it with `imagegen check-worker`.
CMD ["imagegen", "worker"]
