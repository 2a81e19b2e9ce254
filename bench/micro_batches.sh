#!/usr/bin/env bash
# Pretraining throughput of the `cpu` model on DATA (a `talaria data prepare` directory, such as a
# speedrun's RUN/data) in three set-ups, alternated for ROUNDS rounds (the machine's speed drifts):
#   before:        one batch of 16 rows per step, candle's element-wise pool on (CANDLE_NUM_THREADS=2);
#   one batch:     the same with the default CANDLE_NUM_THREADS=1;
#   side by side:  two micro-batches of 8 rows per step, run at once (--grad-accum 2 --side-by-side,
#                  as the speedrun trains).
# Prints the last logged tokens/s (a 10-second window) of each run.
#
#   usage: bash bench/micro_batches.sh DATA [STEPS=60] [ROUNDS=3] [BIN=target/release/talaria]
set -euo pipefail
data=${1:?usage: micro_batches.sh DATA [STEPS] [ROUNDS] [BIN]}
steps=${2:-60}
rounds=${3:-3}
bin=${4:-target/release/talaria}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() { # name, CANDLE_NUM_THREADS, batch, accum, extra flags
  rm -rf "$tmp/run"
  CANDLE_NUM_THREADS=$2 "$bin" pretrain --data "$data" --model cpu --seq-len 128 --batch-size "$3" \
    --grad-accum "$4" ${5:-} --steps "$steps" --lr 3e-3 --eval-every 100000 --save-every 100000 --out "$tmp/run" \
    > "$tmp/log" 2>&1
  python3 - "$tmp/run/metrics.jsonl" "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
print(f"{sys.argv[2]:<14} {rows[-1]['tokens_per_s']:>8.0f} tokens/s  loss at step {rows[-1]['step']}: {rows[-1]['loss']:.6f}")
PY
}
for r in $(seq 1 "$rounds"); do
  echo "round $r"
  run "before" 2 16 1
  run "one batch" 1 16 1
  run "side by side" 1 8 2 --side-by-side
done
