#!/usr/bin/env bash
# Train what the built-in models still need, on one lent GPU, in one call of under ten minutes
# (a session gets 15 minutes of device time, start included), then measure the adapters' GPU
# cost. From the repo root, with the wheels of bench/gpu_wheels.sh carried in .whl/:
#   bash builtin_model/gpu_train.sh
# Phase 0 (t=0 .. END_S), side by side on the one GPU, all from the shipped shapes-64:
#   - the `outline` LoRA (its ≥ 90 % hollow target is the one still open), four ways: rank 8 as
#     shipped; rank 8 and rank 16 with the shape's latent pixels weighted 8× in the loss
#     (--shape-weight: a small shape's hole is a latent pixel or two); the shipped LoRA
#     continued with that weighting;
#   - the VAE decoder tune, continuing the shipped one, two ways: as shipped, and with each scene
#     normalized on its own and three hollow scenes in four (--per-scene --hollow-share 0.75:
#     small hollow shapes are what the round trip loses).
#   UNet, VAE encoder, text encoder, tokenizer, and so the silhouette ControlNet and
#   shapes-64-fast, are never retrained here: they meet their targets.
# Phase 1 (to EVAL_END_S): each outline candidate scored on the GPU with each decoder on
#   training scenes (evaluate_adapters --validation: choices are never made on held-out scenes);
#   the shipped figures are measured again on a CPU by bench/evaluate_*.py.
# Phase 2: pack, then bench/gpu_device_run.sh's `adapters` phase (the GPU cost figures) in what
#   time is left (its SD 1.5-shaped model is built on the CPU during phase 0). Everything comes back under $OUT as at most 8 files.
#
# What ran for the shipped weights is recorded in each artifact's record (train_state.json,
# vae/decoder_tune.json, text_encoder/text_refine.json: command and hardware) and in the model
# card. This version ran once on an H200 (411 s; figures in bench/README.md), and
# builtin_model/gpu_continue.sh continued its best candidates in a second call (both share
# builtin_model/gpu_common.sh). Dry run on a CPU: SKIP_WHEELS=1 DEVICE=cpu PY=.venv/bin/python
# END_S=60 EVAL_END_S=200 A_BATCH=4 V_BATCH=4 EVAL_ARGS="--validation 2 --batch 4" SD15_ARGS=--small OUT=/tmp/x \
#   bash builtin_model/gpu_train.sh
set -uo pipefail
start=$SECONDS  # every deadline below counts from here, the wheels' install included
out="$(realpath -m "${OUT:-gpu-train}")"
work=/tmp/train
source builtin_model/gpu_common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Seconds, from the script's start, by which the trainings must have saved, the evaluations
# ended and the cost figures been printed (the device call's limit is 600 s).
END_S=${END_S:-330}
EVAL_END_S=${EVAL_END_S:-450}
COST_END_S=${COST_END_S:-585}

outline() {  # $1 name, then train_adapters' options
    local name=$1
    shift
    "$PY" -m builtin_model.train_adapters outline --model-dir "$base" --out "$work/$name" \
        --budget-s "$(left "$END_S")" --max-steps 40000 --batch "$A_BATCH" --device "$DEVICE" \
        "$@" >"$work/$name.log" 2>&1 &
}
decoder() {  # $1 name, then tune_decoder's options
    local name=$1
    shift
    "$PY" -m builtin_model.tune_decoder --model-dir "$base" --out "$work/$name" \
        --batch "$V_BATCH" --lr 3e-4 --steps 100000 --budget-s "$(($(left "$END_S") - 30))" \
        --score-n 512 --device "$DEVICE" "$@" >"$work/$name.log" 2>&1 &
}  # (its budget leaves 30 s for scoring the round trip after training)

# ---- phase 0 ----
if [[ ${COST:-1} == 1 ]]; then  # the cost phase's SD 1.5-shaped model, built on the CPU meanwhile
    timeout "$(left "$END_S")" "$PY" -u bench/gpu_sd15.py --save "$work/sd15" ${SD15_ARGS:-} \
        >"$work/sd15-save.log" 2>&1 &
fi
outline o8 --rank 8 --lr 1e-3
outline o8w --rank 8 --lr 1e-3 --shape-weight 8
outline o16w --rank 16 --lr 1e-3 --shape-weight 8
outline o8wc --rank 8 --lr 5e-4 --shape-weight 8 --init-from "$base/loras/outline"
decoder vae
decoder vaeb --per-scene --hollow-share 0.75
wait
echo "all trainings ended at $((SECONDS - start)) s"
show_logs

# ---- phase 1: every outline candidate with every decoder, on training scenes ----
for o in shipped o8 o8w o16w o8wc; do
    for v in shipped vae vaeb; do
        lora=$work/$o && [[ $o == shipped ]] && lora=$base/loras/outline
        vae=$work/$v && [[ $v == shipped ]] && vae=$base/vae
        score_pair "$o-$v" "$lora" "$vae"
    done
done
wait
echo "evaluations ended at $((SECONDS - start)) s"
print_scores
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true

# ---- phase 2: pack (at most 8 files), then the adapters' GPU cost in the time left ----
(cd "$work" && tar -cf "$out/logs.tar" ./*.log evals &&
    tar -cf "$out/outline.tar" o8 o8w o16w o8wc; tar -cf "$out/vae.tar" vae vaeb) 2>/dev/null
ls -la "$out"
echo "packed at $((SECONDS - start)) s"
if [[ ${COST:-1} == 1 && -f $work/sd15/imagegen.json ]]; then
    # as bench/gpu_device_run.sh's `adapters` phase runs it
    timeout "$(left "$COST_END_S")" "$PY" -u bench/adapters_cost.py --device "$DEVICE" \
        --model-dir "$work/sd15" --runs 3 --n 4 --json "$out/adapters_cost.jsonl" 2>&1 \
        | grep --line-buffered -v Warning | tee "$out/adapters_cost.txt"
fi
echo "done at $((SECONDS - start)) s"
