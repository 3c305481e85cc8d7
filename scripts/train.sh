#!/usr/bin/env bash
# The README's main job: train a small CNN with a DSL norm layer and a DSL optimizer through
# tch (CPU by default, CUDA when present). Sets up libtorch first; extra arguments go to the
# example (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
LIBTORCH="$(bash scripts/setup-libtorch.sh | tail -n 1)"
export LIBTORCH
cargo run -q -j "${CARGO_BUILD_JOBS:-2}" --example train -- "$@"
