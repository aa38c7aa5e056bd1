#!/usr/bin/env bash
# First run on an accelerator, in one command (docs/accelerators.md):
#   bash scripts/device_check.sh [OUT_DIR]      (default: $OUT, else results/device_check)
# Installs what the device image lacks (its jax is 0.11.x; it has no tensorflow-datasets,
# grain or ml_collections), then writes to OUT_DIR:
#   env.json          devices, jax/flax versions
#   bench_train.json  vanilla / recursive / MoR-EC train steps at the 360M shape, bf16, remat
#   bench_decode.json decoding throughput, MoR at equal-memory (KV) batches
#   plan.json         mor.memory's plan for this accelerator, to compare with the measured peak
# Every stage has its own time limit, cut to what is left of a 570 s budget: the whole
# script ends within 10 minutes, installs included, and a stage that runs out leaves the
# others' files.
set -uo pipefail

OUT_DIR="${1:-${OUT:-results/device_check}}"
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET_S=570
log() { echo "[device_check +$(( $(date +%s) - start ))s] $*" >&2; }
# limited SECONDS CMD...: CMD under timeout, at most SECONDS and never past the budget
limited() {
  local want=$1 left=$(( BUDGET_S - ($(date +%s) - start) ))
  shift
  (( left < want )) && want=$left
  (( want <= 0 )) && { log "no time left for: $*"; return 124; }
  timeout "$want" "$@"
}

# 1. packages: the device machine reaches no index, so missing ones come as wheels carried
# in WHEELS (prepared on a networked host: python3 -m pip download -d .wheels
# ml_collections tensorflow-datasets grain importlib_resources); the image's jax is kept
WHEELS="${WHEELS:-.wheels}"
log "installing (wheels: $WHEELS)"
limited 60 python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/pip.txt" 2>&1
if [ -d "$WHEELS" ]; then
  limited 120 python3 -m pip install -q --no-index --find-links "$WHEELS" ml_collections \
    tensorflow-datasets grain importlib_resources >>"$OUT_DIR/pip.txt" 2>&1
else
  limited 120 python3 -m pip install -q ml_collections tensorflow-datasets grain \
    importlib_resources >>"$OUT_DIR/pip.txt" 2>&1
fi || log "pip reported errors (see pip.txt); continuing with what is there"
python3 -c "import jax, flax, optax" 2>>"$OUT_DIR/pip.txt" || log "jax/flax/optax missing"

# 2. what the device is
limited 30 python3 - >"$OUT_DIR/env.json" <<'EOF'
import json, jax, flax
d = jax.devices()[0]
print(json.dumps({"backend": jax.default_backend(), "device_kind": d.device_kind,
                  "devices": jax.device_count(), "jax": jax.__version__,
                  "flax": flax.__version__}))
EOF
log "env: $(cat "$OUT_DIR/env.json")"

# 3. the 360M train step in bf16 with remat and the platform's attention (auto)
SHAPE="--d_model 960 --num_layers 32 --num_heads 15 --num_kv_heads 5 --ffn_dim 2560"
SHAPE="$SHAPE --vocab 49152 --seq_len 2048 --dtype bfloat16 --remat"
log "bench_train"
limited 240 python3 -m experiments.bench_train --models vanilla,recursive,mor_ec $SHAPE \
  --batch 8 --repeats 5 --attention auto >"$OUT_DIR/bench_train.json" \
  2>"$OUT_DIR/bench_train.err" || log "bench_train failed or timed out (see bench_train.err)"

# 4. decoding: MoR batches sized to the vanilla KV bytes (bench_decode's equal-memory rows)
log "bench_decode"
limited 120 python3 -m experiments.bench_decode --d_model 960 --num_heads 15 --num_kv_heads 5 \
  --vocab 49152 --batch 32 --max_len 512 --recursions 2,3,4 --rounds 4 --no_trained \
  >"$OUT_DIR/bench_decode.json" 2>"$OUT_DIR/bench_decode.err" \
  || log "bench_decode failed or timed out (see bench_decode.err)"

# 5. the plan for this machine's kind, to hold against the peak memory bench_train saw
log "plan"
limited 40 python3 -m experiments.plan --config configs/paper.py:vanilla,360m \
  --accelerator "${ACCELERATOR:-h100}" --devices 1 --config.data.batch_size=8 \
  >"$OUT_DIR/plan.json" 2>"$OUT_DIR/plan.err" || log "plan failed (see plan.err)"

log "done; outputs in $OUT_DIR"
ls -l "$OUT_DIR" >&2
