#!/usr/bin/env bash
# Continue gpu_train.sh's candidates on a lent GPU, in a short second call: the outline LoRAs
# o8wc, o8 and o16w and the decoder vaeb from its run (unpacked under $FROM, carried), then score
# each LoRA with each decoder on training scenes (evaluate_adapters --validation). From the repo
# root, with the wheels of bench/gpu_wheels.sh in .whl/:
#   FROM=.gpu/run1 bash builtin_model/gpu_continue.sh
# It ran once, on an H200, in 254 s: FROM held o8wc, o8, o16w and vaeb alone, END_S=235
# EVAL_END_S=315, and the wheels travelled unpacked as one tar.xz extracted to /tmp/site with
# SKIP_WHEELS=1 (the tree, the wheels and the candidates were over the 64 MiB a call carries).
# Its setup and scoring have since moved to builtin_model/gpu_common.sh, shared with gpu_train.sh.
# Dry run on a CPU: SKIP_WHEELS=1 DEVICE=cpu PY=.venv/bin/python END_S=60 EVAL_END_S=150
#   A_BATCH=4 V_BATCH=4 EVAL_ARGS="--validation 2 --batch 4" OUT=/tmp/y FROM=... bash ...
set -uo pipefail
start=$SECONDS
out="$(realpath -m "${OUT:-gpu-continue}")"
from="$(realpath "${FROM:?the unpacked gpu_train.sh results}")"
work=/tmp/continue
source builtin_model/gpu_common.sh
END_S=${END_S:-200}
EVAL_END_S=${EVAL_END_S:-275}

outline() {  # $1 candidate to continue, then train_adapters' options
    local name=$1
    shift
    "$PY" -m builtin_model.train_adapters outline --model-dir "$base" --out "$work/${name}c" \
        --init-from "$from/$name" --budget-s "$(left "$END_S")" --max-steps 40000 \
        --batch "$A_BATCH" --lr 5e-4 --device "$DEVICE" "$@" >"$work/${name}c.log" 2>&1 &
}
outline o8wc --rank 8 --shape-weight 8
outline o8 --rank 8
outline o16w --rank 16 --shape-weight 8
# the decoder continues from vaeb: a model dir whose vae/ is vaeb (its record becomes the parent)
cp -r "$base" "$work/vb" && rm -rf "$work/vb/vae" && cp -r "$from/vaeb" "$work/vb/vae"
"$PY" -m builtin_model.tune_decoder --model-dir "$work/vb" --out "$work/vaebc" --per-scene \
    --hollow-share 0.75 --batch "$V_BATCH" --lr 3e-4 --steps 100000 --score-n 512 \
    --budget-s "$(($(left "$END_S") - 25))" --device "$DEVICE" >"$work/vaebc.log" 2>&1 &
wait
echo "all trainings ended at $((SECONDS - start)) s"
show_logs
(cd "$work" && tar -cf "$out/continued.tar" o8wcc o8c o16wc vaebc)

for o in o8wcc o8c o16wc; do
    for v in vaeb vaebc; do
        vae=$work/$v && [[ $v == vaeb ]] && vae=$from/vaeb
        score_pair "$o-$v" "$work/$o" "$vae"
    done
done
wait
echo "evaluations ended at $((SECONDS - start)) s"
print_scores
(cd "$work" && tar -cf "$out/logs.tar" ./*.log evals)
echo "done at $((SECONDS - start)) s"
