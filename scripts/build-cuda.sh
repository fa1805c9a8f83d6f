#!/usr/bin/env bash
# Builds `target/release/preftune` with `--features cuda` on a machine with no CUDA toolkit.
#
# nvcc and its headers come from PyPI wheels pinned by sha256 (scripts/requirements-cuda.txt),
# unpacked (not pip-installed) into $PREFTUNE_CUDA_HOME (default ~/.cache/preftune/cuda-13.0).
# nvcc is needed only to turn candle's kernels into PTX at build time; the binary loads the CUDA
# driver, cuBLAS and cuRAND at run time, so it also starts (CPU only) where they are missing.
#
#   CUDA_COMPUTE_CAP  PTX target (default 80: runs on Ampere and newer, Hopper included)
#   CARGO_ARGS        extra arguments for cargo (e.g. "check" instead of the default build)
set -euo pipefail
cd "$(dirname "$0")/.."
home=${PREFTUNE_CUDA_HOME:-$HOME/.cache/preftune/cuda-13.0}
if [ ! -x "$home/bin/nvcc" ] || [ ! -e "$home/include/nv/target" ]; then
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT
    python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
        -r scripts/requirements-cuda.txt -d "$wheels"
    mkdir -p "$home.tmp"
    for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$home.tmp"; done
    rm -rf "$home"
    mv "$home.tmp/nvidia/cu13" "$home"
    rm -rf "$home.tmp"
    chmod +x "$home"/bin/* "$home"/nvvm/bin/*
fi
export PATH="$home/bin:$PATH" CUDA_HOME="$home" CUDA_PATH="$home" NVCC="$home/bin/nvcc"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
nvcc --version | tail -2
# shellcheck disable=SC2086
cargo ${CARGO_ARGS:-build --release} --features cuda -p preftune-cli
