#!/usr/bin/env bash
# PPO's step time and its parts, for two talaria binaries side by side on one speedrun's SFT and
# reward models, at the `cpu` preset's PPO settings (src/speedrun.rs). Each binary runs STEPS steps
# of `talaria ppo` per round, alternated for ROUNDS rounds (the machine's speed drifts); the medians
# over every logged step of every round are printed per binary: rollouts (rollout_s), reward-model
# scoring (score_s), the old, reference and value passes (passes_s), the update (update_s) and the
# whole step, with B's speed-up over A.
#
#   usage: bash bench/ppo_step.sh RUN BIN_A BIN_B [STEPS=8] [ROUNDS=2]
#
# RUN is a `talaria speedrun` directory (RUN/sft, RUN/reward, RUN/world/rl_prompts.jsonl). BIN_A is
# typically a build of an older commit (`git worktree add /tmp/old COMMIT && cargo build --release`
# there), BIN_B target/release/talaria.
set -euo pipefail
run=${1:?usage: ppo_step.sh RUN BIN_A BIN_B [STEPS] [ROUNDS]}
a=${2:?usage: ppo_step.sh RUN BIN_A BIN_B [STEPS] [ROUNDS]}
b=${3:?usage: ppo_step.sh RUN BIN_A BIN_B [STEPS] [ROUNDS]}
steps=${4:-8}
rounds=${5:-2}
for f in "$run/sft" "$run/reward" "$run/world/rl_prompts.jsonl"; do
  [ -e "$f" ] || { echo "$f is missing: RUN must be a finished talaria speedrun directory" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ppo() { # binary, output directory
  "$1" ppo --policy "$run/sft" --reward "$run/reward" --prompts "$run/world/rl_prompts.jsonl" --out "$2" \
    --steps "$steps" --prompts-per-step 16 --samples-per-prompt 8 --max-new-tokens 40 --temperature 1.0 \
    --lr 2e-5 --critic-lr 1e-4 --warmup 4 --ppo-epochs 2 --minibatch 128 --clip 0.2 --value-clip 0.2 \
    --gamma 1.0 --lambda 0.95 --kl-coef 0.15 --kl-horizon 10000 --reward-clip 5.0 --prompt-baseline \
    --no-end-penalty -2.0 --grad-clip 1.0 --seed 0 --eval-every 100000 --save-every 100000 \
    > "$2.log" 2>&1 || { echo "$1 ppo failed:" >&2; tail -5 "$2.log" >&2; exit 1; }
}
for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds"
  ppo "$a" "$tmp/a$r"
  ppo "$b" "$tmp/b$r"
done
python3 - "$tmp" "$rounds" "$a" "$b" <<'PY'
import json, statistics, sys
tmp, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
parts = ["rollout_s", "score_s", "passes_s", "update_s"]
medians = {}
for side, name in zip("ab", names):
    rows = [json.loads(l) for r in range(1, rounds + 1) for l in open(f"{tmp}/{side}{r}/metrics.jsonl")]
    rows = [x for x in rows if "update_s" in x]
    m = {p: statistics.median(x[p] for x in rows) for p in parts}
    m["step_s"] = statistics.median(sum(x[p] for p in parts) for x in rows)
    m["answer_tokens"] = statistics.median(x.get("answer_len", float("nan")) for x in rows)
    medians[side] = m
    print(f"{name}: {len(rows)} steps, medians " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
print("speed-up of B over A: " + ", ".join(
    f"{p} {medians['a'][p] / medians['b'][p]:.2f}x" if medians["b"][p] > 0 else f"{p} -"
    for p in parts + ["step_s"]))
PY
