#!/usr/bin/env bash
# Reward models on real human preferences: a small model is pretrained on TinyStories,
# fine-tuned on OpenAssistant conversations, then trained as a reward model on HH-RLHF (harmless) pairs
# and, separately, on OpenAssistant ranked replies. Each reward run prints and logs its held-out
# pairwise accuracy, margin and reward/length correlation (metrics.jsonl in its directory).
#
# Usage: scripts/real_data_rm.sh [OUT_DIR]   (default runs/real-rm; reads ../shared/data or $DATA)
# Fixed step counts, so the numbers do not depend on the machine; about 10 minutes on two idle cores.
set -euo pipefail

DATA=${DATA:-../shared/data}
OUT=${1:-runs/real-rm}
TALARIA=${TALARIA:-target/release/talaria}

for f in pretrain/tinystories_train_head.txt sft/oasst_en_100_trees.jsonl \
    preference/hh_rlhf_harmless_base_test.jsonl.gz; do
    [ -f "$DATA/$f" ] || { echo "missing $DATA/$f (see ../shared/data/SOURCES.md)" >&2; exit 1; }
done
[ -x "$TALARIA" ] || cargo build --release
mkdir -p "$OUT"

TEXT="$DATA/pretrain/tinystories_train_head.txt"
"$TALARIA" tokenizer train --input "$TEXT" --vocab-size 4096 --out "$OUT/tokenizer.json"
"$TALARIA" data prepare --input "$TEXT" --tokenizer "$OUT/tokenizer.json" --out "$OUT/data"
"$TALARIA" pretrain --data "$OUT/data" --model cpu --batch-size 16 --lr 3e-3 --steps 800 \
    --eval-every 200 --out "$OUT/pretrain"
"$TALARIA" sft --init "$OUT/pretrain" --data "$DATA/sft/oasst_en_100_trees.jsonl" --batch-size 8 --lr 5e-4 \
    --steps 60 --out "$OUT/sft"
"$TALARIA" reward --init "$OUT/sft" --data "$DATA/preference/hh_rlhf_harmless_base_test.jsonl.gz" \
    --val-fraction 0.1 --lr 2e-4 --steps 400 --eval-every 100 --out "$OUT/reward-hh"
"$TALARIA" reward --init "$OUT/sft" --data "$DATA/sft/oasst_en_100_trees.jsonl" \
    --val-fraction 0.1 --lr 2e-4 --steps 200 --eval-every 50 --out "$OUT/reward-oasst"
