#!/usr/bin/env bash
# The GPU check (issue 6), run ON the GPU machine with binaries built on a CPU machine:
#   here:  cargo build -p normforge-cuda --example gpu_check   (scripts/test.sh builds it too)
#   there: bash scripts/gpu-check.sh [BINARY] [OUT_DIR]
# It uses that machine's PyTorch (python3, CUDA build) for libtorch and its NVRTC/driver, runs
# the correctness checks and our timings, then ../shared/tools/gpu_peers.py in the same session,
# and prints both tables. Figures go into BENCHMARKS.md with the card's name.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/debug/examples/gpu_check}"
out="${2:-${OUT:-$root/gpu-check-out}}"
mkdir -p "$out"
torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NORMFORGE_CACHE_DIR="$out/ptx-cache"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
"$bin" "$out"; rc=$?
peers="$root/../shared/tools/gpu_peers.py"
if [ -f "$peers" ]; then
    python3 "$peers" "$out" > "$out/peers.log" 2>&1 || echo "gpu_peers.py failed: see $out/peers.log"
    tail -n 40 "$out/peers.log"
fi
exit $rc
