#!/usr/bin/env bash
# The README's test command: sets up what the build needs (lavapipe from Debian's packages,
# libtorch in a project venv), builds everything and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
jobs="${CARGO_BUILD_JOBS:-2}"
# lavapipe (Mesa's software Vulkan) runs the CubeCL kernels on the CPU.
if ! [ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] && ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    else
        echo "lavapipe is missing: install mesa-vulkan-drivers and libvulkan1" >&2
        exit 1
    fi
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# libtorch for the tch backend, from the Python package index (scripts/setup-libtorch.sh).
LIBTORCH="$(bash scripts/setup-libtorch.sh | tail -n 1)"
export LIBTORCH
# NVRTC and the CUDA headers from the same venv: the generated CUDA C++ of every std kernel is
# compiled for Hopper here, with no GPU (backends/cuda/tests).
cuda="$(dirname "$LIBTORCH")/nvidia/cu13"
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NORMFORGE_CUDA_INCLUDE="$cuda/include" NORMFORGE_REQUIRE_NVRTC=1
# The headers the host's C++ compiler needs beside those to build that CUDA C++ for the CPU and
# run it there (the same venv, scripts/setup-libtorch.sh).
export NORMFORGE_HOST_CUDA_INCLUDE="$PWD/.venv-torch/host-cuda/nvidia/cu13/include"

# Build first, with the same profile and flags as the run below, so no test binary is built twice;
# the examples as programs too (tests/main_job.rs runs the training example).
cargo test -j "$jobs" --workspace --all-targets --no-run
cargo build -j "$jobs" --workspace --bins --examples
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test -j "$jobs" --workspace --all-targets 2>&1 | tee "$log"
# The CLI on the standard library, as a user would run it: the binary the workspace build made
# (`cargo run` would unify features for one package and rebuild half the dependencies).
nf="${CARGO_TARGET_DIR:-target}/debug/normforge"
"$nf" check plugins/std/nf/*.nf
"$nf" fmt --check plugins/std/nf/*.nf
# The GPU check's summary reads its figures right (made-up records; no GPU needed).
python3 scripts/gpu-table.py --self-test
# One closing line over every test binary, in the plain form CI reads.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
