#!/usr/bin/env bash
# The GPU check (issue 6), run ON the GPU machine with binaries built on a CPU machine:
#   here:  bash scripts/gpu-stage.sh   (builds the binary, puts it stripped and gpu_peers.py in target/)
#   there: bash scripts/gpu-check.sh [BINARY] [OUT_DIR] [all|ours|peers]
# It uses that machine's PyTorch (python3, CUDA build) for libtorch and its NVRTC/driver, runs
# the correctness checks and our timings, then gpu_peers.py in the same session, and prints
# both, then every figure against its target (scripts/gpu-table.py, also $OUT/table.md).
# Figures go into BENCHMARKS.md with the card's name. A device call lasts at most 600 s:
# `all` gives our binary 330 s and the peers what is left of 570; `ours` and `peers` alone (two
# calls on the same warm machine, each measuring its own copy bandwidth) 570 s each. Each
# writes its figures as it measures them, so a part cut short keeps what it measured, and our
# binary's run goes on in a fresh process from the item after one that lost the device.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/gpu_check}"
out="${2:-${OUT:-$root/gpu-check-out}}"
parts="${3:-all}"
case "$parts" in all | ours | peers) ;; *) echo "gpu-check: parts are all, ours or peers, not $parts" >&2; exit 2 ;; esac
mkdir -p "$out"
start=$SECONDS
torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
# NVRTC and the CUDA headers: the toolkit's, else those of torch's own CUDA wheels.
wheels="$(dirname "$(dirname "$torch_lib")")/nvidia/cu13"
[ -d "$wheels/lib" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$wheels/lib"
if ! [ -f /usr/local/cuda/include/cuda_bf16.h ] && [ -f "$wheels/include/cuda_bf16.h" ]; then
    export NORMFORGE_CUDA_INCLUDE="${NORMFORGE_CUDA_INCLUDE:-$wheels/include}"
fi
# The compiled kernels' cache, outside $out: a device call brings back at most 8 files from
# $OUT, and a file per kernel there could crowd out the figures. (Kept in /tmp, a second call on
# the same warm machine compiles nothing again; the first-step timings use no disk cache.)
export NORMFORGE_CACHE_DIR="${NORMFORGE_CACHE_DIR:-/tmp/normforge-ptx-cache}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
rc=0
if [ "$parts" != peers ]; then
    budget=570
    [ "$parts" = all ] && budget=330
    # One process, or (where one ends inside an item: a fault left the CUDA context unusable,
    # an item ran past its limit, a crash) the next from the item after, until every item has
    # run or the time is spent. The binary writes the item it runs to $progress (`done` at the
    # end); each process measures its own copy bandwidth for its figures.
    progress="$(mktemp)"
    trap 'rm -f "$progress"' EXIT
    from=0
    while :; do
        left=$(( budget - (SECONDS - start) ))
        if [ "$left" -lt 20 ]; then
            echo "gpu-check: no time left to go on from item $from" >&2
            [ "$rc" = 0 ] && rc=124
            break
        fi
        rm -f "$progress"
        timeout -k 10 "$left" "$bin" "$out" --from "$from" --progress "$progress"; r=$?
        [ "$r" = 0 ] || rc=$r
        if [ "$r" = 124 ] || [ "$r" = 137 ]; then
            echo "gpu-check: our binary ran past ${budget} s and was stopped; $out/normforge.jsonl keeps what it measured" >&2
            break
        fi
        last="$(cat "$progress" 2>/dev/null || true)"
        item="${last%%$'\t'*}"
        # Done, or ended before its first item (no device, say): nothing to go on from.
        case "$item" in '' | done | *[!0-9]*) break ;; esac
        label="${last#*$'\t'}"
        if [ "$r" != 75 ] && [ "$r" != 76 ]; then
            # Ended by something the binary could not report itself (a crash): say so for it.
            printf '{"lost":%d,"label":"%s","why":"the process ended (status %d)"}\n' "$item" "$label" "$r" >> "$out/normforge.jsonl"
        fi
        echo "gpu-check: the run ended in item $item ($label, status $r); going on from item $(( item + 1 )) in a fresh process" >&2
        from=$(( item + 1 ))
    done
fi
if [ "$parts" != ours ]; then
    # The peers: $NORMFORGE_PEERS, else target/gpu_peers.py (a device machine gets the
    # repository and what is carried, never the ../shared beside it), else ../shared/tools.
    peers=""
    for p in "${NORMFORGE_PEERS:-}" "$root/target/gpu_peers.py" "$root/../shared/tools/gpu_peers.py"; do
        if [ -n "$p" ] && [ -f "$p" ]; then peers="$p"; break; fi
    done
    if [ -z "$peers" ]; then
        echo "gpu-check: gpu_peers.py not found (scripts/gpu-stage.sh puts it in target/; carry it): no peer figures this run" >&2
        [ "$rc" = 0 ] && rc=3
    else
        left=$(( 570 - (SECONDS - start) ))
        timeout -k 10 "$(( left > 30 ? left : 30 ))" python3 "$peers" "$out" > "$out/peers.log" 2>&1 || echo "gpu_peers.py failed or ran out of time: see $out/peers.log ($out/peers.jsonl keeps what it measured)"
        tail -n 40 "$out/peers.log"
    fi
fi
# Every figure against its target, beside the peers' (also written to $out/table.md).
python3 "$root/scripts/gpu-table.py" "$out" || echo "gpu-check: the summary table failed; the figures are in $out/*.jsonl"
files=$(find "$out" -type f | wc -l)
[ "$files" -le 8 ] || echo "gpu-check: $files files under $out, more than a device call brings back (8)" >&2
exit $rc
