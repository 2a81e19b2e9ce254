#!/usr/bin/env bash
# Installs a CUDA 13.0 toolchain from PyPI wheels (no GPU and no system CUDA needed), enough to
# compile and link Talaria with `--features cuda` (candle 0.11's CUDA backend: cudarc 0.19 and
# candle-kernels 0.11), and NCCL for `--features nccl`. README, "GPUs", says how the build and the
# GPU run use it.
#
#   usage: bash scripts/install_cuda_build_tools.sh [DIR]   (DIR defaults to .cuda-tools)
#          eval "$(bash scripts/install_cuda_build_tools.sh DIR | grep '^export ')"
#
# Idempotent: the pip step is skipped when DIR already holds the same pinned set; symlinks and the
# libcuda.so link stub are (re)made only when missing. Prints the env vars to export on stdout.
#
# Layout made (ROOT = DIR/site/nvidia/cu13, the prefix the CUDA 13 wheels share):
#   ROOT/bin/nvcc ptxas fatbinary cudafe++ nvlink   (nvidia-cuda-nvcc)
#   ROOT/nvvm/bin/cicc, ROOT/nvvm/libdevice         (nvidia-nvvm)
#   ROOT/include (+ include/crt, include/cccl)      (runtime, crt, cccl, cublas, curand, nvrtc)
#   ROOT/lib/lib{cudart,cublas,cublasLt,curand,nvrtc}.so -> versioned .so shipped by the wheels
#   ROOT/lib64 -> lib
#   ROOT/lib/libnccl.so{,.2} -> DIR/nccl/nvidia/nccl/lib/libnccl.so.2   (nvidia-nccl-cu13, its own
#                               pip target: pip --target would replace the shared nvidia/ folder)
#   ROOT/lib/stubs/libcuda.so   link-time stub (SONAME libcuda.so.1) built here with gcc; no wheel
#                               ships one. NEVER put lib/stubs on LD_LIBRARY_PATH at run time.
set -euo pipefail

DIR="${1:-.cuda-tools}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SITE="$DIR/site"
ROOT="$SITE/nvidia/cu13"

# CUDA 13.0 on purpose: its PTX (ISA 9.0) is JIT-able by every CUDA 13.x driver, and cudarc 0.19.10
# knows 13.0 (it rejects nvcc releases newer than 13.4). cuda-toolkit==13.0.2 pins exactly these.
PKGS=(
  nvidia-cuda-nvcc==13.0.88      # nvcc, ptxas, fatbinary, cudafe++, nvlink            (~37 MB)
  nvidia-nvvm==13.0.88           # cicc, libnvvm, libdevice                            (~62 MB)
  nvidia-cuda-crt==13.0.88       # include/crt/*.h                                     (<1 MB)
  nvidia-cuda-runtime==13.0.96   # cuda_runtime.h, cuda.h, cuda_fp16/bf16/fp8.h, libcudart.so.13 (~2 MB)
  nvidia-cuda-cccl==13.0.85      # include/cccl (cuda/std, cub, thrust)                (~3 MB)
  nvidia-cuda-nvrtc==13.0.88     # libnvrtc.so.13                                      (~90 MB)
  nvidia-cublas==13.1.0.3        # libcublas.so.13, libcublasLt.so.13                  (~423 MB)
  nvidia-curand==10.4.0.35       # libcurand.so.10                                     (~60 MB)
)
STAMP="$DIR/.installed"
WANT="${PKGS[*]}"

log() { echo "[cuda-tools] $*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$ROOT/bin/nvcc" ]]; then
  log "pip packages already installed in $SITE"
else
  PY="${PYTHON:-python3}"
  log "installing ${#PKGS[@]} wheels (~680 MB download, ~1.2 GB on disk) into $SITE"
  rm -rf "$SITE"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-cache-dir \
    --only-binary=:all: --target "$SITE" "${PKGS[@]}" >&2
  echo "$WANT" > "$STAMP"
fi

[[ -x "$ROOT/bin/nvcc" && -x "$ROOT/nvvm/bin/cicc" ]] || { log "nvcc/cicc missing under $ROOT"; exit 1; }

# NCCL 2.32 for CUDA 13 (~305 MB): only `--features nccl` links it.
NCCL_PKG="nvidia-nccl-cu13==2.32.3"
NCCL_LIB="$DIR/nccl/nvidia/nccl/lib/libnccl.so.2"
if [[ -f "$DIR/.nccl-installed" && "$(cat "$DIR/.nccl-installed")" == "$NCCL_PKG" && -f "$NCCL_LIB" ]]; then
  log "NCCL already installed in $DIR/nccl"
else
  log "installing $NCCL_PKG into $DIR/nccl"
  rm -rf "$DIR/nccl"
  "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps --no-cache-dir \
    --only-binary=:all: --target "$DIR/nccl" "$NCCL_PKG" >&2
  echo "$NCCL_PKG" > "$DIR/.nccl-installed"
fi
[[ -f "$NCCL_LIB" ]] || { log "missing $NCCL_LIB"; exit 1; }
# Relative links (ROOT/lib is DIR/site/nvidia/cu13/lib), so that DIR can move.
ln -sfn ../../../../nccl/nvidia/nccl/lib/libnccl.so.2 "$ROOT/lib/libnccl.so.2"
ln -sfn libnccl.so.2 "$ROOT/lib/libnccl.so"

# Unversioned names for the linker (-lcudart -lcublas -lcublasLt -lcurand -lnvrtc).
cd "$ROOT/lib"
for pair in cudart:libcudart.so.13 cublas:libcublas.so.13 cublasLt:libcublasLt.so.13 \
            curand:libcurand.so.10 nvrtc:libnvrtc.so.13; do
  name="lib${pair%%:*}.so" target="${pair#*:}"
  [[ -e "$target" ]] || { log "missing $ROOT/lib/$target"; exit 1; }
  [[ "$(readlink "$name" 2>/dev/null || true)" == "$target" ]] || ln -sfn "$target" "$name"
done
cd "$ROOT"
[[ -e lib64 ]] || ln -s lib lib64

# libcuda.so link stub: every cu* entry point of cuda.h (after the preprocessor's _v2/_v3 renames)
# plus, when cudarc's sources are in the cargo registry, every driver symbol cudarc declares.
# Each stub returns 999 (CUDA_ERROR_UNKNOWN); it only satisfies the linker. The binary records
# NEEDED libcuda.so.1, which the real driver provides on a GPU machine.
STUB_DIR="$ROOT/lib/stubs"
if [[ ! -f "$STUB_DIR/libcuda.so" ]]; then
  mkdir -p "$STUB_DIR"
  {
    echo '#include <cuda.h>' | ${CC:-gcc} -E -P -I"$ROOT/include" -x c - \
      | grep -oP '\bcu[A-Za-z0-9_]+(?=\s*\()' || true
    for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs; do
      [[ -f "$f" ]] && grep -ohP '^\s+fn \Kcu\w+(?=\()' "$f" || true
    done
  } | sort -u | sed 's/.*/int &(void) { return 999; }/' > "$STUB_DIR/libcuda_stub.c"
  ${CC:-gcc} -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so" "$STUB_DIR/libcuda_stub.c"
  log "built $STUB_DIR/libcuda.so ($(wc -l < "$STUB_DIR/libcuda_stub.c") symbols)"
fi

"$ROOT/bin/nvcc" --version | grep -q 'release 13.0' || { log "unexpected nvcc version"; exit 1; }
log "ok: $("$ROOT/bin/nvcc" --version | sed -n 4p)"

# What cargo needs. cudarc: `nvcc --version` on PATH (cuda-version-from-build-system) and CUDA_HOME
# for -L ROOT/lib, ROOT/lib/stubs. cudaforge (candle-kernels): NVCC (else PATH), CUDA_COMPUTE_CAP
# (else it runs nvidia-smi and fails without a GPU). 90 = H100/H200 -> sm_90a code and PTX.
cat <<EOF
export PATH="$ROOT/bin:\$PATH"
export CUDA_HOME="$ROOT"
export NVCC="$ROOT/bin/nvcc"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-\$(nproc)}"
# At run time on a GPU machine (not needed to build): export LD_LIBRARY_PATH="$ROOT/lib:\$LD_LIBRARY_PATH"
EOF
