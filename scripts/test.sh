#!/usr/bin/env bash
# The README's test command: builds everything and runs every test. Needs only a Rust
# toolchain today; later backends add their own set-up here (see ARCHITECTURE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
jobs="${CARGO_BUILD_JOBS:-2}"

cargo build -j "$jobs" --workspace --all-targets
cargo test -j "$jobs" --workspace --all-targets
# The CLI on the standard library, as a user would run it.
cargo run -q -j "$jobs" -- check plugins/std/nf/*.nf
cargo run -q -j "$jobs" -- fmt --check plugins/std/nf/*.nf
