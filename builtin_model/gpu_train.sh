#!/usr/bin/env bash
# Train what the built-in models learn, on one lent GPU, in one call of about eight minutes
# (the device time a session gets is 15 minutes, start included). From the repo root, with
# the wheels of bench/gpu_wheels.sh carried in .whl/ (diffusers, and pydantic for the
# schedulers' names):
#   bash builtin_model/gpu_train.sh
# Phase 0 (t=0): `phrasing` refine of shapes-64 (caption augmentation, grown vocabulary).
#          Beside it, from the shapes-64 as committed: the `outline` LoRA, the `silhouette`
#          ControlNet and the `shapes-64-fast` distillation (kept only if phase 0 fails).
# Phase 1 (after the refine): the same three from the refined model.
# Everything comes back under $OUT as at most 8 files (tar parts of 15 MiB), evaluated on a CPU
# afterwards by bench/evaluate_phrasing.py, bench/evaluate_adapters.py, bench/evaluate_fast.py.
#
# What ran for the shipped weights (2026-11-28, H200): this script (the distillation then failed
# for want of pydantic on the device, since fixed), then on the same machine the distillation
# from the refined model (`distill --teacher <refined> --pairs 16384 --teacher-batch 1024
# --batch 256 --lr 1e-4 --budget-s 160`), then a second `phrasing` run continuing the first
# (`--init-from <refined> --budget-s 140`): shapes-64 is that second model; `outline`,
# `silhouette` and shapes-64-fast were trained from the first (each card says so).
set -uo pipefail
out="$(realpath -m "${OUT:-gpu-train}")"
work=/tmp/train
mkdir -p "$out" "$work/a" "$work/b"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$SECONDS
base=builtin_model/shapes-64
# Seconds, from the script's start, by which every training must have saved.
PHASE0_S=${PHASE0_S:-170}
END_S=${END_S:-400}
# Batch sizes and teacher pairs (smaller for a dry run of the plumbing on a CPU).
A_BATCH=${A_BATCH:-128}
F_BATCH=${F_BATCH:-256}
PAIRS=${PAIRS:-16384}

adapters() {  # $1 model dir, $2 out dir, $3 budget seconds
    "$PY" -m builtin_model.train_adapters outline --model-dir "$1" --out "$2/outline" \
        --budget-s "$3" --max-steps 40000 --batch "$A_BATCH" --lr 1e-3 >"$2/outline.log" 2>&1 &
    "$PY" -m builtin_model.train_adapters silhouette --model-dir "$1" --out "$2/silhouette" \
        --budget-s "$3" --max-steps 40000 --batch "$A_BATCH" --lr 3e-4 >"$2/silhouette.log" 2>&1 &
    # Teacher pairs first (about a tenth of the time), then the student within the budget.
    "$PY" -m builtin_model.distill --teacher "$1" --out "$2/fast" --pairs "$PAIRS" \
        --teacher-batch 1024 --steps 100000 --batch "$F_BATCH" --lr 1e-4 \
        --budget-s "$(($3 - 45))" >"$2/fast.log" 2>&1 &
}

adapters "$base" "$work/a" "$((END_S - 15))"
# The phrasing recipe (issue 19) as committed on its branch, carried in .gpu/ (PHRASING_DIR).
phrasing_dir="${PHRASING_DIR:-$PWD}"
(cd "$phrasing_dir" && timeout "$((PHASE0_S + 25))" "$PY" -m builtin_model.train \
    --profile phrasing --init-from "$OLDPWD/$base" --device "${DEVICE:-cuda}" \
    --budget-s "$PHASE0_S" --no-eval --out "$work/refined") >"$work/refined.log" 2>&1
refined_rc=$?
echo "phrasing refine: rc $refined_rc at $((SECONDS - start)) s"
grep -v -i warn "$work/refined.log" | tail -n 8
if [[ $refined_rc -eq 0 && -f "$work/refined/unet/diffusion_pytorch_model.safetensors" ]]; then
    adapters "$work/refined" "$work/b" "$((END_S - (SECONDS - start)))"
    (cd "$phrasing_dir" && timeout 120 "$PY" bench/evaluate_phrasing.py \
        --model-dir "$work/refined" --device "${DEVICE:-cuda}" --seeds 1 --batch 144 \
        --json "$out/phrasing.json") >"$work/phrasing-eval.log" 2>&1 &
fi
wait
echo "all trainings ended at $((SECONDS - start)) s"
for f in "$work"/*.log "$work"/*/*.log; do echo "== $f"; grep -v Warning "$f" | tail -n 4; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true

# Pack: the refined model (no duplicate of what shapes-64 already holds), the adapters of the
# run that matches the model kept, the fast UNet (text encoder, tokenizer and VAE are the
# teacher's), and every log.
cd "$work" || exit 1
keep=a
[[ -d b/fast/unet && -d refined ]] && keep=b
rm -f refined/vae/diffusion_pytorch_model.safetensors
tar -cf "$out/logs.tar" ./*.log ./*/*.log ./*/*/train_state.json 2>/dev/null
tar -cf - refined 2>/dev/null | split -b 15m - "$out/refined.tar.part-"
for run in a b; do
    [[ -d $run/outline || -d $run/silhouette ]] && tar -cf "$out/adapters-$run.tar" "$run"/outline "$run"/silhouette
done
"$PY" - "$keep/fast" <<'EOF'
import sys, torch
from safetensors.torch import load_file, save_file
d = sys.argv[1] + "/unet/diffusion_pytorch_model.safetensors"
save_file({k: v.half().contiguous() for k, v in load_file(d).items()}, d + ".fp16")
EOF
tar -cf "$out/fast-$keep.tar" "$keep/fast/imagegen.json" "$keep/fast/train_state.json" \
    "$keep/fast/unet/config.json" "$keep/fast/unet/diffusion_pytorch_model.safetensors.fp16"
ls -la "$out"
echo "packed at $((SECONDS - start)) s"
