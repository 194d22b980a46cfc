#!/usr/bin/env bash
# `make gpu-check`: the checks that need a GPU, in one script, for a machine
# whose python3 has torch 2.11.0+cu130 and which has no network.
#
#   1. builds align against that torch (make's torch stamp, then cargo);
#   2. checks that `align info` shows CUDA;
#   3. compares a tiny random model's f32 logits on CUDA and on the CPU
#      (`align bench parity`, within 1e-4);
#   4. runs a few steps each of LoRA SFT, reward and RL with a bf16 base on a
#      gemma-2b-shaped model (`align bench lora`, `--reward`, `--rl`),
#      printing tokens/s and the peak GPU memory (nvidia-smi polled);
#   5. prints a summary block to paste into the README.
#
# Within 8 minutes on one H200 once built. Every part also runs on the CPU:
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh
# uses the tiny preset (GPU_CHECK_PRESET), 64 tokens (GPU_CHECK_SEQ) and
# skips the CUDA-only checks, to prove the script end to end anywhere.
# GPU_CHECK_STEPS sets the timed steps (default 3), GPU_CHECK_OUT the folder
# the logs go to (default runs/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  PRESET=${GPU_CHECK_PRESET:-tiny}
  SEQ=${GPU_CHECK_SEQ:-64}
  NEW=${GPU_CHECK_NEW_TOKENS:-8}
else
  PRESET=${GPU_CHECK_PRESET:-gemma-2b}
  SEQ=${GPU_CHECK_SEQ:-512}
  NEW=${GPU_CHECK_NEW_TOKENS:-32}
fi
STEPS=${GPU_CHECK_STEPS:-3}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo ">> [$(elapsed) s] $*"; }
fail() { echo "gpu-check FAILED: $*" >&2; exit 1; }

# 1. Build (the system python3's torch when it is 2.11.0; no network needed
#    when cargo's registry cache is already filled).
say "building"
make .stamps/torch >/dev/null
export LIBTORCH
LIBTORCH=$(cat .stamps/libtorch)
export LD_LIBRARY_PATH="$LIBTORCH/lib:${LD_LIBRARY_PATH:-}"
cargo build --release --bin align 2>"$OUT/build.log" \
  || cargo build --release --offline --bin align 2>>"$OUT/build.log" \
  || { tail -30 "$OUT/build.log"; fail "cargo build (log: $OUT/build.log)"; }
BIN=target/release/align
BUILD_S=$(elapsed)

# 2. align info shows CUDA.
say "align info"
"$BIN" info | tee "$OUT/info.json"
if [ "$DEVICE" = cuda ]; then
  grep -q '"cuda_available": true' "$OUT/info.json" || fail "align info does not show CUDA"
fi
GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)
[ -n "$GPU_NAME" ] || GPU_NAME="none ($DEVICE run)"

# 3. Tiny-model logits, CUDA against the CPU, f32.
say "logits parity"
"$BIN" bench parity --preset tiny --device "$DEVICE" --tolerance 1e-4 | tee "$OUT/parity.txt" \
  || fail "logits parity"

# 4. LoRA SFT, reward and RL steps with a bf16 base, peak GPU memory polled.
#    Each phase runs in its own align processes; nvidia-smi's memory.used is
#    the whole GPU's, so the figure before the phase is printed beside it.
POLL_PID=""
start_poll() {
  : >"$OUT/$1.mem"
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/$1.mem" 2>/dev/null &
    POLL_PID=$!
  fi
}
stop_poll() {
  if [ -n "$POLL_PID" ]; then kill "$POLL_PID" 2>/dev/null || true; wait "$POLL_PID" 2>/dev/null || true; fi
  POLL_PID=""
  sort -n "$OUT/$1.mem" | tail -1
}
idle_mem() {
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1
  fi
}
declare -A PEAK BEFORE
phase() {
  local name=$1; shift
  say "$name: align bench lora $*"
  BEFORE[$name]=$(idle_mem)
  start_poll "$name"
  if ! timeout 300 "$BIN" bench lora --preset "$PRESET" --device "$DEVICE" --base-dtype bf16 \
      --python none --seq "$SEQ" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.txt"; then
    stop_poll "$name" >/dev/null
    tail -20 "$OUT/$name.err"
    fail "$name"
  fi
  PEAK[$name]=$(stop_poll "$name")
}
phase sft --warmup 1 --steps "$STEPS"
phase reward --reward --warmup 1 --steps "$STEPS"
phase rl --rl --warmup 1 --steps 1 --prompts 4 --k 2 --new-tokens "$NEW"

# 5. The summary block.
line() { grep -E "^bf16 base  align" "$OUT/$1.txt" | head -1 | sed -E 's/^bf16 base  //; s/ +/ /g'; }
mem() { if [ -n "${PEAK[$1]}" ]; then echo "peak GPU memory ${PEAK[$1]} MiB (${BEFORE[$1]} MiB before)"; else echo "no GPU memory figure ($DEVICE)"; fi; }
TOTAL=$(elapsed)
cat <<EOF | tee "$OUT/summary.md"

----- gpu-check summary (paste into the README) -----
$(date -u +%Y-%m-%d), GPU: $GPU_NAME, device $DEVICE, $PRESET, bf16 base, LoRA r 16 all-linear, checkpointing
align: $(grep -o '"align": "[^"]*"' "$OUT/info.json" | cut -d'"' -f4), torch $(sed -nE "s/^__version__ = '([^']*)'.*/\1/p" "$LIBTORCH/version.py" 2>/dev/null || echo '?')
$(cat "$OUT/parity.txt")
SFT    (batch 1 × $SEQ tokens): $(line sft); $(mem sft)
reward (1 pair × $SEQ tokens a side): $(line reward); $(mem reward)
RL     (4 prompts × 2 samples × $NEW new tokens): $(line rl); $(mem rl)
build ${BUILD_S} s, whole check ${TOTAL} s
------------------------------------------------------
EOF
[ "$TOTAL" -le 480 ] || echo "warning: the check took ${TOTAL} s, over its 8-minute budget"
