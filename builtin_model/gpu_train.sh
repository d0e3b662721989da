#!/usr/bin/env bash
# Train what the built-in models still need, on one lent GPU, in one call of about eight minutes
# (a session gets 15 minutes of device time, start included). From the repo root, with the
# wheels of bench/gpu_wheels.sh carried in .whl/:
#   bash builtin_model/gpu_train.sh
# Phase 0 (t=0 .. END_S), side by side on the one GPU, all from the shipped shapes-64:
#   - the `outline` LoRA at rank 8 and rank 16 (its ≥ 90 % hollow target is the one still open);
#   - the VAE decoder tune, continuing the shipped one (the round trip's hollow ceiling: a LoRA
#     cannot draw hollower than the decoder decodes);
#   - the text encoder's phrasing refine (builtin_model.refine_text), continuing the shipped
#     one. UNet, VAE encoder, tokenizer and so the silhouette ControlNet and shapes-64-fast are
#     never retrained here: they meet their targets, and the fast model shares the encoder.
# Phase 1: quick GPU figures (fp32) for each outline candidate with the tuned decoder and for the
#   refined encoder's phrasing; the shipped figures are measured again on a CPU by
#   bench/evaluate_{adapters,phrasing,fast}.py.
# Everything comes back under $OUT as at most 8 files.
#
# What ran for the shipped weights is recorded in each artifact's record (train_state.json,
# vae/decoder_tune.json, text_encoder/text_refine.json: command and hardware) and in the model
# card. This version has been dry-run on a CPU only (tiny sizes; see the variables below); earlier
# versions (git log of this file) trained the shipped shapes-64, `outline` and `silhouette` on an
# H200.
set -uo pipefail
out="$(realpath -m "${OUT:-gpu-train}")"
work=/tmp/train
mkdir -p "$out" "$work/evals"
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
# Seconds, from the script's start, by which the trainings must have saved.
END_S=${END_S:-400}
EVAL_S=${EVAL_S:-80}
# Batch sizes and step caps (smaller for a dry run of the plumbing on a CPU).
A_BATCH=${A_BATCH:-128}
V_BATCH=${V_BATCH:-256}
T_BATCH=${T_BATCH:-512}
T_STEPS=${T_STEPS:-6000}
# A dry run on a CPU: EVAL_ARGS="--limit 2"
read -r -a eval_args <<<"${EVAL_ARGS:-}"
left() { echo $(($1 - (SECONDS - start))); }

outline() {  # $1 out dir, $2 rank
    "$PY" -m builtin_model.train_adapters outline --model-dir "$base" --out "$1" --rank "$2" \
        --budget-s "$(left "$END_S")" --max-steps 40000 --batch "$A_BATCH" --lr 1e-3 \
        --device "$DEVICE" >"$1.log" 2>&1 &
}

# ---- phase 0 ----
outline "$work/outline" 8
outline "$work/outline16" 16
"$PY" -m builtin_model.tune_decoder --model-dir "$base" --out "$work/vae" --batch "$V_BATCH" \
    --lr 3e-4 --steps 100000 --budget-s "$(left "$END_S")" --device "$DEVICE" \
    >"$work/vae.log" 2>&1 &
# A fixed step count (the cosine schedule ends where it should); the budget only stops it early.
"$PY" -m builtin_model.refine_text --model-dir "$base" --out "$work/text" --steps "$T_STEPS" \
    --batch "$T_BATCH" --lr 4e-4 --validate-every 1000 --budget-s "$(left "$END_S")" \
    --device "$DEVICE" >"$work/text.log" 2>&1 &
wait
echo "all trainings ended at $((SECONDS - start)) s"
for f in "$work"/*.log; do echo "== $f"; grep -v -i warn "$f" | tail -n 3; done

# ---- phase 1: quick figures on the GPU ----
for v in outline outline16; do
    [[ -d $work/$v ]] || continue
    m=$work/eval-$v
    cp -r "$base" "$m" && rm -rf "$m/loras/outline" && cp -r "$work/$v" "$m/loras/outline"
    [[ -f $work/vae/diffusion_pytorch_model.safetensors ]] && cp "$work"/vae/* "$m/vae/"
    timeout "$EVAL_S" "$PY" bench/evaluate_adapters.py --model-dir "$m" --device "$DEVICE" \
        --seeds 1 --only outline "${eval_args[@]}" --json "$work/evals/adapters-$v.json" \
        >"$work/evals/adapters-$v.log" 2>&1 &
done
if [[ -f $work/text/text_encoder/model.safetensors ]]; then
    timeout "$EVAL_S" "$PY" bench/evaluate_phrasing.py --model-dir "$work/text" --device "$DEVICE" \
        --seeds 3 --batch 144 "${eval_args[@]}" --json "$work/evals/phrasing.json" \
        >"$work/evals/phrasing.log" 2>&1 &
fi
wait
echo "evaluations ended at $((SECONDS - start)) s"
"$PY" - "$work/evals" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    if "outline" in d:
        print(f.name, json.dumps(d["outline"], separators=(",", ":"))[:600])
    if "results" in d:
        print(f.name, json.dumps(d, separators=(",", ":"))[:1500])
EOF
grep -v -i warn "$work/evals/phrasing.log" 2>/dev/null | tail -n 8
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true

# ---- pack: at most 8 files ----
cd "$work" || exit 1
tar -cf "$out/logs.tar" ./*.log ./*/train_state.json evals 2>/dev/null
tar -cf "$out/outline.tar" outline outline16 2>/dev/null
tar -cf "$out/vae.tar" vae 2>/dev/null
tar -cf "$out/text-encoder.tar" text/text_encoder 2>/dev/null
ls -la "$out"
echo "packed at $((SECONDS - start)) s"
