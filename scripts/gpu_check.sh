#!/usr/bin/env bash
# The GPU checks, in one run, on a machine with an NVIDIA GPU, its driver and Python with PyTorch
# (no Rust needed there). Build the binary elsewhere first (README, "GPUs"):
#
#   eval "$(bash scripts/install_cuda_build_tools.sh .cuda-tools | grep '^export ')"
#   cargo build --release --features cuda --target-dir target/cuda
#
# (the stripped binary is about 68 MB, 19 MB gzipped: `strip` and `gzip -9` it to carry it), then,
# on the GPU machine, from the repository root:
#
#   bash scripts/gpu_check.sh target/cuda/release/talaria OUT [SPEEDRUN_SECONDS] [NCCL_BIN]
#
# NCCL_BIN, optional, is a `--features nccl` build (`cargo build --release --features nccl
# --target-dir target/nccl`). It links the MPI library, which a GPU machine may lack: carry the
# libraries `ldd NCCL_BIN` lists from OpenMPI (libmpi, libopen-rte, libopen-pal, libhwloc, libevent,
# libpmix) in a folder `lib` beside it; the check puts that folder on LD_LIBRARY_PATH.
#
# It writes OUT/summary.txt and every command's output:
#   1. parity: the same 30 pretraining steps from the same weights on the CPU, on CUDA in f32 and
#      on CUDA in bf16 mixed precision: per-step losses and final weights, tensor by tensor (a
#      parameter that received no gradient on the GPU stays where the CPU run moved it from);
#   2. training speed on GPT-2 small's shape (124M, batch 8 x 1024) in bf16: `talaria bench train`
#      against bench/pytorch_reference.py eager, and with torch.compile;
#   3. batched decoding speed (1 and 16 sequences);
#   4. the `gpu` speedrun, cut off after SPEEDRUN_SECONDS (default 240; 0 skips it);
#   5. with NCCL_BIN: a one-rank NCCL communicator, bootstrapped as under mpirun, and its all-reduce of
#      256 MiB checked against the sum worked out on the host (`talaria bench allreduce`).
set -uo pipefail
bin=$(realpath "${1:?usage: gpu_check.sh BIN OUT [SPEEDRUN_SECONDS]}")
out=${2:?usage: gpu_check.sh BIN OUT [SPEEDRUN_SECONDS]}
speedrun_s=${3:-240}
nccl_bin=${4:+$(realpath "$4")}
mkdir -p "$out"
out=$(realpath "$out")
summary=$out/summary.txt
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

# cuBLAS, cuRAND, NVRTC and the CUDA runtime 13: from PyTorch's NVIDIA wheels when the system has none.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for name in ("libcublas.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13", "libnccl.so.2"):
        for f in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
say "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
say "libraries from: ${libs:-the system}"
if ! "$bin" bench train --device cuda --preset test --steps 1 --batch 1 > "$out/smoke.txt" 2>&1; then
  say "FAILED: the binary does not run on CUDA (see $out/smoke.txt)"
  exit 1
fi

# 1. Parity.
"$bin" data synth --out "$out/world" --scale 0.2 > /dev/null
"$bin" tokenizer train --input "$out/world/pretrain.txt" --vocab-size 300 --out "$out/tokenizer.json" > /dev/null
"$bin" data prepare --input "$out/world/pretrain.txt" --tokenizer "$out/tokenizer.json" --out "$out/data" > /dev/null
common=(pretrain --data "$out/data" --model tiny --steps 30 --batch-size 8 --seq-len 64 --eval-every 30)
"$bin" "${common[@]}" --device cpu --out "$out/cpu" > "$out/parity_cpu.txt" 2>&1
"$bin" "${common[@]}" --device cuda --out "$out/cuda" > "$out/parity_cuda.txt" 2>&1
"$bin" "${common[@]}" --device cuda --dtype bf16 --out "$out/cuda_bf16" > "$out/parity_cuda_bf16.txt" 2>&1
python3 - "$out" <<'PY' | tee -a "$summary"
import json, sys
import numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
def losses(run):
    return [json.loads(l)["loss"] for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l]
def weights(run):
    return load_file(f"{out}/{run}/checkpoint/model.safetensors")
cpu, w_cpu = losses("cpu"), weights("cpu")
for run, loss_tol, weight_tol in (("cuda", 1e-4, 1e-3), ("cuda_bf16", 3e-2, 1e-1)):
    try:
        got, w = losses(run), weights(run)
    except FileNotFoundError as e:
        print(f"parity {run}: FAILED ({e})")
        continue
    worst_loss = max(abs(a - b) / abs(a) for a, b in zip(cpu, got))
    worst = max((np.abs(w[k] - w_cpu[k]).max() / max(np.abs(w_cpu[k]).max(), 1e-2), k) for k in w_cpu)
    ok = len(got) == len(cpu) and worst_loss < loss_tol and worst[0] < weight_tol
    print(f"parity {run}: {'ok' if ok else 'FAILED'}: {len(got)} steps, largest relative loss difference "
          f"{worst_loss:.2e} (limit {loss_tol}), largest weight difference {worst[0]:.2e} of the tensor's "
          f"scale in {worst[1]} (limit {weight_tol})")
PY

# 2. Training speed on GPT-2 small's shape, bf16.
"$bin" bench train --device cuda --preset gpt2 --batch 8 --steps 10 --dtype bf16 --json > "$out/train_talaria.txt" 2>&1
python3 bench/pytorch_reference.py train --device cuda --preset gpt2 --batch 8 --steps 10 --dtype bf16 --json \
  > "$out/train_pytorch.txt" 2>&1
python3 bench/pytorch_reference.py train --device cuda --preset gpt2 --batch 8 --steps 10 --dtype bf16 --compile \
  --json > "$out/train_pytorch_compile.txt" 2>&1
python3 - "$out" <<'PY' | tee -a "$summary"
import json, sys
out = sys.argv[1]
def last_json(name):
    try:
        return json.loads(open(f"{out}/{name}").read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}
ours = last_json("train_talaria.txt")
for name in ("train_talaria.txt", "train_pytorch.txt", "train_pytorch_compile.txt"):
    r = last_json(name)
    if "tokens_per_s" not in r:
        print(f"{name}: FAILED ({r.get('error', 'no figures')})")
        continue
    # Model FLOPs utilisation against the device's measured bf16 matmul peak.
    ratio = ours.get("tokens_per_s", float("nan")) / r["tokens_per_s"]
    print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, {r['gflops']:.0f} GFLOP/s "
          f"({100 * r['gflops'] / r['peak_matmul_gflops']:.0f}% of the measured matmul peak); talaria / this = {ratio:.2f}")
PY

# 3. Batched decoding.
for batch in 1 16; do
  "$bin" bench decode --device cuda --preset gpt2 --batch "$batch" --steps 200 --json > "$out/decode_$batch.txt" 2>&1
  say "decode batch $batch: $(grep 'tokens/s' "$out/decode_$batch.txt" | head -1 || echo FAILED)"
done

# 4. The gpu speedrun, as far as the time allows.
if [ "$speedrun_s" -gt 0 ]; then
  timeout "$speedrun_s" "$bin" speedrun --preset gpu --device cuda --out "$out/speedrun" > "$out/speedrun.txt" 2>&1
  say "gpu speedrun (exit $?; 124 = cut off at ${speedrun_s}s): $(grep -E '^\[' "$out/speedrun.txt" | tr '\n' ' ')"
fi
# 5. NCCL through the one-rank world.
if [ -n "$nccl_bin" ]; then
  LD_LIBRARY_PATH="$(dirname "$nccl_bin")/lib:$LD_LIBRARY_PATH" "$nccl_bin" bench allreduce --device cuda --mb 256 \
    --steps 10 --json > "$out/allreduce_nccl.txt" 2>&1
  status=$?
  say "nccl all-reduce (exit $status; 0 = equal to the host's sum): $(grep -E '^(engine|median|bus|max)' \
    "$out/allreduce_nccl.txt" | tr -s ' ' | tr '\n' ';')"
fi
say "done: $summary"
