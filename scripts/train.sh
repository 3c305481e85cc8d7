#!/usr/bin/env bash
# The README's main job: train a small classifier with a DSL norm layer and a DSL optimizer.
# Extra arguments go to the example (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q --release -j "${CARGO_BUILD_JOBS:-2}" --example train -- "$@"
