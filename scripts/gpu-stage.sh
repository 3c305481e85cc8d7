#!/usr/bin/env bash
# Stage the GPU check here, on a CPU machine, for a device machine that has no Rust toolchain
# and no network: build the check's binary and copy the peers' script (../shared/tools/
# gpu_peers.py, which a device machine does not get) into target/, then print what to carry
# and what to run there (scripts/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
LIBTORCH="$(bash scripts/setup-libtorch.sh | tail -n 1)"
export LIBTORCH
cargo build -j "${CARGO_BUILD_JOBS:-2}" -p normforge-cuda --example gpu_check
peers="${NORMFORGE_PEERS:-../shared/tools/gpu_peers.py}"
if ! [ -f "$peers" ]; then
    echo "gpu-stage: $peers not found (set NORMFORGE_PEERS)" >&2
    exit 1
fi
install -m 0644 "$peers" target/gpu_peers.py
# Carried without its debug information (half its size; a panic there is caught and reported
# as a message, with no need of a symbolised backtrace).
bin=target/gpu_check
strip --strip-debug -o "$bin" target/debug/examples/gpu_check 2>/dev/null || cp target/debug/examples/gpu_check "$bin"
# Every library the binary links resolves against a libtorch alone (there: the machine's torch).
if LD_LIBRARY_PATH="$LIBTORCH/lib" ldd "$bin" | grep 'not found'; then
    echo "gpu-stage: $bin needs libraries a torch installation does not give" >&2
    exit 1
fi
size=$(( $(stat -c %s "$bin") + $(stat -c %s target/gpu_peers.py) ))
# What travels: the carried files and the working tree (tracked, and untracked but not ignored).
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f 1)
echo "carry:   [\"$bin\", \"target/gpu_peers.py\"]   ($(( size >> 20 )) MiB; $(( (size + tree) >> 20 )) MiB with the tree, of the 64 MiB a call takes)"
echo "command: bash scripts/gpu-check.sh $bin \$OUT          (timeout_s 600: ours, then the peers)"
echo "   or, two calls on the same warm machine: ... \$OUT ours, then ... \$OUT peers"
