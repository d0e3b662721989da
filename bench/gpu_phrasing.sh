#!/usr/bin/env bash
# Refine shapes-64 on prompts as users write them, on the device machine (issue 19).
# Here first: `bash bench/gpu_wheels.sh` (diffusers and friends into .whl/). There, from the
# repo root with .whl carried:
#   bash bench/gpu_phrasing.sh            # BUDGET (s, default 160) for training + saving
# Writes the pipeline to /tmp/shapes-64-phrasing and, as ≤ 15 MiB tar parts, to $OUT/pack
# (restore here: `cat pack/shapes-64-phrasing.tar.* | tar -x`), the log to $OUT, and then,
# unless PHRASING_EVAL=0, the per-style held-out scores of the new model (GPU, 1 seed, ≤ 90 s).
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m builtin_model.train --profile phrasing --init-from builtin_model/shapes-64 \
    --device cuda --budget-s "${BUDGET:-160}" --no-eval --out /tmp/shapes-64-phrasing \
    --pack "$out/pack" 2>&1 | grep --line-buffered -v -i "torchvision\|warn" \
    | tee "$out/train-phrasing.log"
status=${PIPESTATUS[0]}
[[ $status -eq 0 ]] || { echo "training failed: $status"; exit "$status"; }
if [[ "${PHRASING_EVAL:-1}" != 0 ]]; then
    timeout 90 python3 bench/evaluate_phrasing.py --model-dir /tmp/shapes-64-phrasing \
        --device cuda --seeds 1 --batch 144 --json "$out/phrasing.json" 2>&1 \
        | grep --line-buffered -v -i "torchvision\|warn\|loading" | tee "$out/phrasing.txt"
fi
