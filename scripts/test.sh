#!/usr/bin/env bash
# The README's test command: sets up what the build needs (libtorch in a project venv),
# builds everything and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
jobs="${CARGO_BUILD_JOBS:-2}"
# libtorch for the tch backend, from the Python package index (scripts/setup-libtorch.sh).
LIBTORCH="$(bash scripts/setup-libtorch.sh | tail -n 1)"
export LIBTORCH

cargo build -j "$jobs" --workspace --all-targets
cargo test -j "$jobs" --workspace --all-targets
# The CLI on the standard library, as a user would run it.
cargo run -q -j "$jobs" -- check plugins/std/nf/*.nf
cargo run -q -j "$jobs" -- fmt --check plugins/std/nf/*.nf
