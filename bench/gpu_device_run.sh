#!/usr/bin/env bash
# Everything the GPU benchmarks need on the device machine, as one script (see bench/README.md).
# Run from the repo root with the wheels of bench/gpu_wheels.sh carried in .whl/:
#   bash bench/gpu_device_run.sh [PHASES]     PHASES: gpu_sd15.py --phases, plus "equivalence",
#                                             "adapters" and "training" (not run unless named)
# Figures go to stdout and, as JSON lines, to $OUT (or ./gpu-results) for the session to keep.
set -uo pipefail
phases="${1:-equivalence,single,eager,options,compiled}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [[ ",$phases," == *",equivalence,"* ]]; then
    # How far a job's images move when batched on this GPU (the tolerance bench/README states).
    timeout 240 python3 -u bench/batch_equivalence.py --sd-shaped --steps 20 --repeats 2 \
        --schedulers euler,dpmpp_2m 2>&1 | tee "$out/batch_equivalence.txt"
fi
sd15="$(tr ',' '\n' <<<"$phases" | grep -vxE 'equivalence|adapters|training' | paste -sd, -)"
if [[ -n "$sd15" ]]; then
    python3 -u bench/gpu_sd15.py --phases "$sd15" --json "$out/gpu_sd15.jsonl" 2>&1 \
        | grep --line-buffered -v Warning | tee "$out/gpu_sd15.txt"
fi
if [[ ",$phases," == *",adapters,"* ]]; then
    # A LoRA switch between batches and a step with the LoRA or the ControlNet, as ratios to the
    # plain loop, on the SD 1.5 shape (512x512, 30 steps, fp16) with a random rank-16 LoRA and
    # a full-size random ControlNet.
    model="$(mktemp -d)/sd15-adapters"
    { timeout 240 python3 -u bench/gpu_sd15.py --save "$model" &&
        timeout 240 python3 -u bench/adapters_cost.py --device cuda --model-dir "$model" \
            --runs 3 --n 4 --json "$out/adapters_cost.jsonl"; } 2>&1 \
        | grep --line-buffered -v Warning | tee "$out/adapters_cost.txt"
    rm -rf "$(dirname "$model")"
fi
if [[ ",$phases," == *",training,"* ]]; then
    # The fine-tuning recipe on the SD 1.5 shape at 512x512, rank 16: steps/s and peak memory in
    # fp16, bf16, with gradient checkpointing, and fp32 (bench/gpu_training.py).
    timeout 300 python3 -u bench/gpu_training.py --json "$out/gpu_training.jsonl" 2>&1 \
        | grep --line-buffered -v -e Warning -e "kept in float32" | tee "$out/gpu_training.txt"
fi
