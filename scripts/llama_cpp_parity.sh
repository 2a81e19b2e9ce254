#!/usr/bin/env bash
# llama.cpp on a model exported by `talaria export gguf`: builds llama.cpp from the copy that PyPI's
# llama-cpp-python source package carries (nothing of it is kept in this repository), checks that its
# greedy answers on the f32 GGUF equal `talaria chat --temperature 0` for a few prompts, then times
# decoding of both on the same model, side by side: `llama-bench -p 0 -n 200 -d 16` (200 tokens after a
# 16-token context) on the f32, f16 and q8_0 files against `talaria bench decode --ckpt` (the same) with
# the weights read in f32, f16 and q8, in alternating rounds, with each one's peak memory.
#
# Usage: scripts/llama_cpp_parity.sh CHAT_CHECKPOINT [WORK_DIR]   (default WORK_DIR target/llama.cpp)
# Needs python3 with pip, a C++ compiler; cmake and ninja come from PyPI when missing. The build takes
# about 15 minutes on two cores, once.
set -euo pipefail

CKPT=${1:?usage: scripts/llama_cpp_parity.sh CHAT_CHECKPOINT [WORK_DIR]}
WORK=${2:-target/llama.cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
TALARIA=${TALARIA:-target/release/talaria}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
PROMPTS=(
    "What is 12 + 7?"
    "Spell the word river backwards."
    "What is the capital of Norway?"
    "Sort these numbers: 5, 2, 9."
    "Which is larger, 41 or 14?"
    "Hello! Who are you?"
)

[ -x "$TALARIA" ] || cargo build --release
mkdir -p "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"

# 1. llama.cpp's source, from the llama-cpp-python sdist.
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$WORK"
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi

# 2. Build llama-simple (greedy decoding of one prompt) and llama-bench.
if [ ! -x "$BIN/llama-simple" ] || [ ! -x "$BIN/llama-bench" ]; then
    command -v cmake >/dev/null && command -v ninja >/dev/null || python3 -m pip install cmake ninja
    cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$SRC/build" --target llama-simple llama-bench -j "$(nproc)"
fi

# 3. The model in GGUF, f32 for the comparison and f16 / q8_0 for the timings.
for dtype in f32 f16 q8_0; do
    "$TALARIA" export gguf "$CKPT" --out "$WORK/model-$dtype.gguf" --dtype "$dtype"
done

# 4. Greedy answers, prompt by prompt. llama-simple echoes the prompt (special tokens as text) and
# stops at the end-of-turn token; the prompt is the chat template's rendering of one user turn.
same=0
for q in "${PROMPTS[@]}"; do
    prompt="<|bos|><|user|>$q<|end|><|assistant|>"
    ours=$("$TALARIA" chat "$CKPT" --temperature 0 --max-new-tokens 48 --prompt "$q")
    theirs=$("$BIN/llama-simple" -m "$WORK/model-f32.gguf" -n 48 "$prompt" 2>/dev/null)
    theirs=${theirs#"$prompt"}
    if [ "$ours" == "$theirs" ]; then
        same=$((same + 1))
        echo "same   $q -> $ours"
    else
        echo "DIFFER $q -> talaria [$ours], llama.cpp [$theirs]"
    fi
done
echo "greedy answers equal on $same of ${#PROMPTS[@]} prompts"

# 5. Decode speed, alternating rounds; medians. Peak memory: Talaria's own VmHWM; llama.cpp's
# maximum resident set from GNU time when it is installed.
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
declare -A runs mem
for r in $(seq "$ROUNDS"); do
    for dtype in f32 f16 q8; do
        line=$("$TALARIA" bench decode --ckpt "$CKPT" --steps 200 --dtype "$dtype" --json | tail -1)
        runs[talaria-$dtype]+="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["tokens_per_s"])' "$line") "
        mem[talaria-$dtype]=$(python3 -c 'import json, sys; print(round(json.loads(sys.argv[1])["peak_rss_mib"]))' "$line")
    done
    for dtype in f32 f16 q8_0; do
        cmd=("$BIN/llama-bench" -m "$WORK/model-$dtype.gguf" -p 0 -n 200 -d 16 -t "$THREADS" -r 1 -o json)
        if [ -x /usr/bin/time ]; then
            out=$(/usr/bin/time -f '%M' -o "$WORK/time.txt" "${cmd[@]}" 2>/dev/null)
            mem[llama-$dtype]=$(( $(tail -1 "$WORK/time.txt") / 1024 ))
        else
            out=$("${cmd[@]}" 2>/dev/null)
            mem[llama-$dtype]="-"
        fi
        runs[llama-$dtype]+="$(python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["avg_ts"])' <<<"$out") "
    done
done
printf '%-16s %10s %14s %10s\n' "decode, batch 1" "tokens/s" "peak MiB" "vs llama"
for pair in "talaria-f32 llama-f32" "talaria-f16 llama-f16" "talaria-q8 llama-q8_0"; do
    read -r ours theirs <<<"$pair"
    a=$(tr ' ' '\n' <<<"${runs[$ours]}" | grep . | median)
    b=$(tr ' ' '\n' <<<"${runs[$theirs]}" | grep . | median)
    printf '%-16s %10.0f %14s %10.2f\n' "$ours" "$a" "${mem[$ours]}" "$(python3 -c "print($a / $b)")"
    printf '%-16s %10.0f %14s\n' "$theirs" "$b" "${mem[$theirs]}"
done
build=$("$BIN/llama-bench" -m "$WORK/model-f32.gguf" -p 0 -n 1 -r 1 -o json 2>/dev/null |
    python3 -c 'import json, sys; d = json.load(sys.stdin)[0]; print(d["build_number"], d["build_commit"])')
echo "(vs llama: Talaria's tokens/s over llama.cpp's at the same precision; $ROUNDS alternating rounds,"
echo " $THREADS threads; llama.cpp build $build from llama-cpp-python $VERSION)"
[ "$same" -eq "${#PROMPTS[@]}" ]
