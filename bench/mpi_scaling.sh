#!/usr/bin/env bash
# Data-parallel throughput on one machine: pretraining the `cpu` model with 2 MPI ranks x 1 thread
# against 1 process x 2 threads, at the same global batch (2 x --batch-size rows of 256 tokens per
# step), side by side in one run. BENCHMARKS.md ("Data parallelism over MPI") quotes its output.
#
#   bash bench/mpi_scaling.sh [DATA] [STEPS]
#
# DATA is a `talaria data prepare` directory (default: a fresh default world at scale 0.3).
# Needs mpirun and builds `--features mpi` into target/mpi.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${2:-40}
batch=8
cargo build --release --features mpi --bin talaria --target-dir target/mpi -q
bin=target/mpi/release/talaria
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=${1:-}
if [ -z "$data" ]; then
  "$bin" data synth --out "$work/world" --scale 0.3 >/dev/null
  "$bin" tokenizer train --input "$work/world/pretrain.txt" --vocab-size 512 --out "$work/tokenizer.json" >/dev/null
  "$bin" data prepare --input "$work/world/pretrain.txt" --tokenizer "$work/tokenizer.json" --out "$work/data" >/dev/null
  data=$work/data
fi
common=(pretrain --data "$data" --model cpu --batch-size "$batch" --steps "$steps" --eval-every 100000 --val-batches 1)
median_tps() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
tps = [r["tokens_per_s"] for r in rows[5:]]
print(f"{statistics.median(tps):.0f}")
PY
}
for round in 1 2 3; do
  rm -rf "$work/one" "$work/two"
  RAYON_NUM_THREADS=2 "$bin" "${common[@]}" --grad-accum 2 --out "$work/one" >/dev/null 2>&1
  OMPI_MCA_btl_vader_single_copy_mechanism=none mpirun --allow-run-as-root --oversubscribe -np 2 \
    -x RAYON_NUM_THREADS=1 "$bin" "${common[@]}" --grad-accum 1 --out "$work/two" >/dev/null 2>&1
  one=$(median_tps "$work/one/metrics.jsonl")
  two=$(median_tps "$work/two/metrics.jsonl")
  python3 -c "print(f'round $round: 1 process x 2 threads {$one} tokens/s, 2 ranks x 1 thread {$two} tokens/s: {$two/$one:.2f}x')"
done
