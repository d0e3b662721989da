#!/usr/bin/env bash
# Wheels the GPU machine lacks, for bench/gpu_device_run.sh there (carry .whl/): every package
# the gateway and the worker need at run time at this venv's versions (the lock's), less what
# the device image holds; bench/gpu_wheels.py computes the list. The device's python3 is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
mapfile -t pins < <("$python" bench/gpu_wheels.py)
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "${pins[@]}"
ls .whl
