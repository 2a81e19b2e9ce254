#!/usr/bin/env bash
# Data-parallel throughput on one machine: pretraining the `cpu` model with 2 MPI ranks x 1 thread
# against 1 process x 2 threads, at the same global batch (2 x --batch-size rows of 256 tokens per
# step), side by side in one run; then, given a speedrun directory, PPO steps of its SFT model on its
# reward model at the speedrun's settings. BENCHMARKS.md ("Data parallelism over MPI") quotes it.
#
#   bash bench/mpi_scaling.sh [DATA] [STEPS] [SPEEDRUN_DIR]
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
# The median over steps 6.. of `key` in a metrics.jsonl.
median() {
  python3 - "$1" "$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if f'"{sys.argv[2]}"' in l]
print(statistics.median(r[sys.argv[2]] for r in rows[5:]))
PY
}
for round in 1 2 3; do
  rm -rf "$work/one" "$work/two"
  RAYON_NUM_THREADS=2 "$bin" "${common[@]}" --grad-accum 2 --out "$work/one" >/dev/null 2>&1
  OMPI_MCA_btl_vader_single_copy_mechanism=none mpirun --allow-run-as-root --oversubscribe -np 2 \
    -x RAYON_NUM_THREADS=1 "$bin" "${common[@]}" --grad-accum 1 --out "$work/two" >/dev/null 2>&1
  one=$(median "$work/one/metrics.jsonl" tokens_per_s)
  two=$(median "$work/two/metrics.jsonl" tokens_per_s)
  comm=$(median "$work/two/metrics.jsonl" allreduce_s)
  python3 -c "print(f'round $round: 1 process x 2 threads {$one:.0f} tokens/s, 2 ranks x 1 thread {$two:.0f} tokens/s: {$two/$one:.2f}x; gradient all-reduce {1000*$comm:.2f} ms of a {1000*2*$batch*256/$two:.0f} ms step')"
done
run=${3:-}
[ -n "$run" ] || exit 0
ppo=(ppo --policy "$run/sft" --reward "$run/reward" --prompts "$run/world/rl_prompts.jsonl" --steps 6
  --prompts-per-step 16 --samples-per-prompt 8 --minibatch 128 --prompt-baseline --max-new-tokens 40 --eval-every 1000)
# The median over steps 2.. of a PPO step's four timed parts.
step_s() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"update_s"' in l]
print(statistics.median(r["rollout_s"] + r["score_s"] + r["passes_s"] + r["update_s"] for r in rows[1:]))
PY
}
for round in 1 2 3; do
  rm -rf "$work/ppo1" "$work/ppo2"
  RAYON_NUM_THREADS=2 "$bin" "${ppo[@]}" --out "$work/ppo1" >/dev/null 2>&1
  OMPI_MCA_btl_vader_single_copy_mechanism=none mpirun --allow-run-as-root --oversubscribe -np 2 \
    -x RAYON_NUM_THREADS=1 "$bin" "${ppo[@]}" --out "$work/ppo2" >/dev/null 2>&1
  one=$(step_s "$work/ppo1/metrics.jsonl")
  two=$(step_s "$work/ppo2/metrics.jsonl")
  python3 -c "print(f'PPO round $round: 1 process x 2 threads {$one:.2f} s/step, 2 ranks x 1 thread {$two:.2f} s/step: {$one/$two:.2f}x')"
done
