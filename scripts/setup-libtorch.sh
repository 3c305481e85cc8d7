#!/usr/bin/env bash
# Install libtorch for tch: PyTorch 2.11.0's wheel from the Python package index into a
# project venv (.venv-torch), without its CUDA dependencies but the two runtime libraries
# libtorch_cpu.so links against, and NVRTC. The PyTorch download site is not used. Idempotent.
# Prints the LIBTORCH directory on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-torch"
want="2.11.0"
if ! [ -f "$venv/.installed-$want" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
        "torch==$want" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 >&2
    touch "$venv/.installed-$want"
fi
# NVRTC, to compile the generated CUDA C++ on any machine (backends/cuda); its headers come
# with nvidia-cuda-runtime above, both under nvidia/cu13.
nvrtc="13.0.88"
if ! [ -f "$venv/.installed-nvrtc-$nvrtc" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "nvidia-cuda-nvrtc==$nvrtc" >&2
    touch "$venv/.installed-nvrtc-$nvrtc"
fi
# What NVRTC has built in, for the host's C++ compiler: the CUDA compiler's crt/ headers and
# libcu++'s nv/target, which cuda_bf16.h and cuda_fp16.h include. The tests build the generated
# CUDA C++ for the CPU with them and run it there (backends/cuda/tests/host_*.rs). In a
# directory of their own, which NVRTC never reads.
host="13.0.88"
if ! [ -f "$venv/.installed-host-cuda-$host" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --upgrade --target "$venv/host-cuda" \
        "nvidia-cuda-crt==$host" nvidia-cuda-cccl==13.0.85 >&2
    touch "$venv/.installed-host-cuda-$host"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site/torch"
