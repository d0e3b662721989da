# A GPU worker: CUDA PyTorch from the official image, diffusers on top, the built-in model inside.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /srv/imagegen
COPY docker/requirements-gateway.txt docker/requirements-worker.txt ./docker/
RUN pip install --requirement docker/requirements-worker.txt
COPY pyproject.toml README.md ./
COPY imagegen ./imagegen
COPY worker ./worker
COPY builtin_model ./builtin_model
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 imagegen \
    && mkdir -p /cache/huggingface \
    && chown imagegen /cache/huggingface

USER 10001
# The worker's liveness is its heartbeat in Redis; compose checks it with `imagegen check-worker`.
CMD ["imagegen", "worker"]
