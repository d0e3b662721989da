#!/usr/bin/env bash
# Train what the built-in models learn, on one lent GPU, in one call of about eight and a half
# minutes (a session gets 15 minutes of device time, start included). From the repo root, with
# the wheels of bench/gpu_wheels.sh carried in .whl/:
#   bash builtin_model/gpu_train.sh
# Phase 0 (t=0 .. PHASE0_S): the `phrasing` refine of shapes-64 (continuing the shipped model)
#          and, beside it, the VAE decoder tune for thin structures (encoder frozen, so the two
#          are independent); fallbacks from the shipped model: `outline` and shapes-64-fast.
# Phase 1 (after the refine .. END_S): from the refined model, `outline` (rank 8 and rank 16),
#          `silhouette` and shapes-64-fast (step distillation); the phrasing evaluation of the
#          refined model with the tuned decoder runs beside them.
# Phase 2: quick GPU figures (fp32) for the adapters and the fast model; the shipped figures are
#          measured again on a CPU by bench/evaluate_{phrasing,adapters,fast}.py.
# Everything comes back under $OUT as at most 8 files (tar parts of 15 MiB).
#
# What ran for the shipped weights is recorded in each artifact's train_state.json (its
# command and hardware) and in the model card. This version (decoder tune, step distillation,
# rank-16 outline, GPU evaluations) has been dry-run on a CPU only (tiny sizes; see the
# variables below); the shipped shapes-64, `outline` and `silhouette` came from its previous
# version (git log of this file) on an H200, and the shipped VAE decoder from tune_decoder on a
# CPU (the model card), which phase 0 here continues.
set -uo pipefail
out="$(realpath -m "${OUT:-gpu-train}")"
work=/tmp/train
mkdir -p "$out" "$work/a" "$work/b" "$work/evals"
if [[ -z ${SKIP_WHEELS:-} ]]; then  # SKIP_WHEELS=1 where the venv has them (a dry run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$SECONDS
base=builtin_model/shapes-64
# Seconds, from the script's start, by which the refine and the trainings must have saved.
PHASE0_S=${PHASE0_S:-240}
END_S=${END_S:-440}
EVAL_S=${EVAL_S:-80}
# Batch sizes and teacher trajectories (smaller for a dry run of the plumbing on a CPU).
A_BATCH=${A_BATCH:-128}
F_BATCH=${F_BATCH:-256}
V_BATCH=${V_BATCH:-256}
TRAJ=${TRAJ:-24576}
TEACHER_BATCH=${TEACHER_BATCH:-1024}
# A dry run on a CPU: REFINE_ARGS="--max-steps-scale 0.001 --max-batch 8" EVAL_ARGS="--limit 2"
read -r -a refine_args <<<"${REFINE_ARGS:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"
left() { echo $(($1 - (SECONDS - start))); }

outline() {  # $1 model dir, $2 out dir, $3 budget seconds, $4 rank
    "$PY" -m builtin_model.train_adapters outline --model-dir "$1" --out "$2" --rank "$4" \
        --budget-s "$3" --max-steps 40000 --batch "$A_BATCH" --lr 1e-3 --device "$DEVICE" \
        >"$2.log" 2>&1 &
}
silhouette() {  # $1 model dir, $2 out dir, $3 budget seconds
    "$PY" -m builtin_model.train_adapters silhouette --model-dir "$1" --out "$2" \
        --budget-s "$3" --max-steps 40000 --batch "$A_BATCH" --lr 3e-4 --device "$DEVICE" \
        >"$2.log" 2>&1 &
}
fast() {  # $1 teacher dir, $2 out dir, $3 budget seconds (trajectories first, then the student)
    "$PY" -m builtin_model.distill --teacher "$1" --out "$2" --trajectories "$TRAJ" \
        --teacher-batch "$TEACHER_BATCH" --steps 100000 --batch "$F_BATCH" --lr 1e-4 \
        --budget-s "$3" --device "$DEVICE" >"$2.log" 2>&1 &
}

# ---- phase 0 ----
"$PY" -m builtin_model.tune_decoder --model-dir "$base" --out "$work/vae" --batch "$V_BATCH" \
    --lr 5e-4 --steps 100000 --budget-s "$PHASE0_S" --device "$DEVICE" >"$work/vae.log" 2>&1 &
decoder_pid=$!
outline "$base" "$work/a/outline" "$(left $((END_S - 10)))" 8
fast "$base" "$work/a/fast" "$(left $((END_S - 60)))"
timeout "$((PHASE0_S + 25))" "$PY" -m builtin_model.train --profile phrasing --init-from "$base" \
    --device "$DEVICE" --budget-s "$PHASE0_S" --no-eval --out "$work/refined" "${refine_args[@]}" \
    >"$work/refined.log" 2>&1
refined_rc=$?
echo "phrasing refine: rc $refined_rc at $((SECONDS - start)) s"
grep -v -i warn "$work/refined.log" | tail -n 4

# ---- phase 1 ----
if [[ $refined_rc -eq 0 && -f "$work/refined/unet/diffusion_pytorch_model.safetensors" ]]; then
    outline "$work/refined" "$work/b/outline" "$(left "$END_S")" 8
    outline "$work/refined" "$work/b/outline16" "$(left "$END_S")" 16
    silhouette "$work/refined" "$work/b/silhouette" "$(left "$END_S")"
    fast "$work/refined" "$work/b/fast" "$(left $((END_S - 20)))"
    wait "$decoder_pid"
    echo "decoder tune: rc $? at $((SECONDS - start)) s"
    grep -E "round trip|budget" "$work/vae.log"
    [[ -f $work/vae/diffusion_pytorch_model.safetensors ]] && cp "$work"/vae/* "$work/refined/vae/"
    timeout 150 "$PY" bench/evaluate_phrasing.py --model-dir "$work/refined" --device "$DEVICE" \
        --seeds 3 --batch 144 "${eval_args[@]}" --json "$work/evals/phrasing.json" >"$work/phrasing-eval.log" 2>&1 &
fi
wait
echo "all trainings ended at $((SECONDS - start)) s"
for f in "$work"/*.log "$work"/*/*.log; do echo "== $f"; grep -v -i warn "$f" | tail -n 3; done

# ---- phase 2: quick figures on the GPU ----
model=$work/refined
[[ -d $model/unet ]] || model=$base
run=a
[[ -d $work/b/outline ]] && run=b
for v in outline outline16; do
    [[ -d $work/$run/$v ]] || continue
    m=$work/eval-$v
    cp -r "$model" "$m" && rm -rf "$m/loras" "$m/controlnets" && mkdir -p "$m/loras" "$m/controlnets"
    [[ -f $work/vae/diffusion_pytorch_model.safetensors ]] && cp "$work"/vae/* "$m/vae/"
    cp -r "$work/$run/$v" "$m/loras/outline"
    if [[ -d $work/$run/silhouette ]]; then
        cp -r "$work/$run/silhouette" "$m/controlnets/silhouette"
    else
        cp -r "$base/controlnets/silhouette" "$m/controlnets/silhouette"
    fi
    only=()
    [[ $v == outline16 ]] && only=(--only outline)
    timeout "$EVAL_S" "$PY" bench/evaluate_adapters.py --model-dir "$m" --device "$DEVICE" \
        --seeds 1 "${only[@]}" "${eval_args[@]}" --json "$work/evals/adapters-$v.json" >"$work/evals/adapters-$v.log" 2>&1 &
done
if [[ $model != "$base" ]]; then  # the shipped silhouette on the refined model, for comparison
    m=$work/eval-shipped-silhouette
    cp -r "$work/eval-outline" "$m" 2>/dev/null && rm -rf "$m/controlnets/silhouette" \
        && cp -r "$base/controlnets/silhouette" "$m/controlnets/silhouette" \
        && timeout "$EVAL_S" "$PY" bench/evaluate_adapters.py --model-dir "$m" --device "$DEVICE" \
            --seeds 1 --only silhouette "${eval_args[@]}" \
            --json "$work/evals/adapters-shipped-silhouette.json" \
            >"$work/evals/adapters-shipped-silhouette.log" 2>&1 &
fi
run=a teacher=$base
[[ -d $work/b/fast/unet ]] && run=b teacher=$model
if [[ -d $work/$run/fast/unet ]]; then
    [[ -f $work/vae/diffusion_pytorch_model.safetensors ]] && cp "$work"/vae/* "$work/$run/fast/vae/"
    timeout "$EVAL_S" "$PY" bench/evaluate_fast.py --fast-dir "$work/$run/fast" \
        --base-dir "$teacher" --device "$DEVICE" --rescore-base --runs 3 \
        >"$work/evals/fast.log" 2>&1 &
fi
wait
echo "evaluations ended at $((SECONDS - start)) s"
"$PY" - "$work/evals" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    for key in ("outline", "silhouette"):
        if key in d:
            print(f.name, key, json.dumps(d[key], separators=(",", ":"))[:600])
    if "styles" in d or "results" in d:
        print(f.name, json.dumps(d, separators=(",", ":"))[:1500])
EOF
grep -v -i warn "$work/evals/fast.log" 2>/dev/null | tail -n 12
grep -v -i warn "$work/phrasing-eval.log" 2>/dev/null | tail -n 12
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true

# ---- pack: at most 8 files ----
cd "$work" || exit 1
rm -f refined/vae/diffusion_pytorch_model.safetensors  # the tuned one travels in vae.tar
tar -cf "$out/logs.tar" ./*.log ./*/*.log ./*/*/train_state.json evals 2>/dev/null
tar -cf - refined 2>/dev/null | split -b 15m - "$out/refined.tar.part-"
tar -cf "$out/adapters-vae.tar" vae b/outline b/outline16 b/silhouette 2>/dev/null
tar -cf "$out/fallback-outline.tar" a/outline 2>/dev/null
for r in a b; do
    [[ -f $r/fast/unet/diffusion_pytorch_model.safetensors ]] || continue
    "$PY" - "$r/fast" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
d = sys.argv[1] + "/unet/diffusion_pytorch_model.safetensors"
save_file({k: v.half().contiguous() for k, v in load_file(d).items()}, d + ".fp16")
EOF
    tar -cf "$out/fast-$r.tar" "$r/fast/imagegen.json" "$r/fast/train_state.json" \
        "$r/fast/unet/config.json" "$r/fast/unet/diffusion_pytorch_model.safetensors.fp16"
done
ls -la "$out"
echo "packed at $((SECONDS - start)) s"
