# The gateway: FastAPI + RQ client. No torch, no GPU; small and quick to scale.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/imagegen
COPY docker/requirements-gateway.txt ./docker/
RUN pip install --requirement docker/requirements-gateway.txt
COPY pyproject.toml README.md ./
COPY imagegen ./imagegen
COPY app ./app
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 imagegen

USER 10001
ENV IMAGEGEN_HOST=0.0.0.0 \
    IMAGEGEN_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["imagegen", "api"]
