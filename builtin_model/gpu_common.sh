# Sourced by builtin_model/gpu_train.sh and gpu_continue.sh, after they set `start`, `out` and
# `work`: the wheels, the environment, and scoring outline LoRA × decoder pairs on training
# scenes (evaluate_adapters --validation: choices are never made on held-out scenes).
# (A dry run on a 2-core CPU checks the plumbing; its many parallel evaluations oversubscribe
# the cores and reach EVAL_END_S unfinished, where one pair alone scores in about 10 s.)
mkdir -p "$out" "$work/evals"
if [[ -z ${SKIP_WHEELS:-} ]]; then  # SKIP_WHEELS=1 where the venv has them (a dry run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
base=builtin_model/shapes-64
A_BATCH=${A_BATCH:-256}
V_BATCH=${V_BATCH:-256}
read -r -a eval_args <<<"${EVAL_ARGS:---validation 192 --batch 64}"
left() { echo $(($1 - (SECONDS - start))); }  # seconds left until $1 s after the start

show_logs() {  # the last lines of every training's log
    for f in "$work"/*.log; do echo "== $f"; grep -v -i warn "$f" | tail -n 2; done
}

score_pair() {  # $1 name, $2 LoRA dir, $3 VAE dir: scored in the background until EVAL_END_S
    local m=$work/m-$1
    [[ -f $2/pytorch_lora_weights.safetensors && -f $3/config.json ]] || return 0
    cp -r "$base" "$m" && rm -rf "$m/loras/outline" "$m/vae"
    cp -r "$2" "$m/loras/outline" && cp -r "$3" "$m/vae"
    timeout "$(left "$EVAL_END_S")" "$PY" bench/evaluate_adapters.py --model-dir "$m" \
        --device "$DEVICE" --seeds 1 --only outline "${eval_args[@]}" \
        --json "$work/evals/$1.json" >"$work/evals/$1.log" 2>&1 &
}

print_scores() {  # every pair's figures and every decoder tune's round trip, one line each
    "$PY" - "$work" <<'PYEOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
for f in sorted((work / "evals").glob("*.json")):
    o = json.loads(f.read_text())["outline"]
    print(f"{f.stem:14s} hollow {o['hollow_with']:.3f} (without {o['hollow_without']:.3f})",
          "by size", o.get("hollow_with_by_size"), "kind", o["attributes_with"]["kind"],
          "base kind", o["attributes_without"]["kind"])
for f in sorted(work.glob("*/decoder_tune.json")):
    a = json.loads(f.read_text())["after"]
    print(f.parent.name, json.dumps({k: round(v, 4) for k, v in a.items()}))
PYEOF
}
