# The gateway: FastAPI and a Redis client. No torch, no GPU; small and quick to scale.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/imagegen
# The gateway's dependencies (pyproject.toml) at the versions of requirements.lock, the last
# green run's, before the code: a code change reuses this layer.
COPY pyproject.toml requirements.lock README.md ./
COPY docker/requirements.py ./docker/
RUN python docker/requirements.py gateway > /tmp/requirements.txt \
    && pip install --constraint requirements.lock --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt
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
