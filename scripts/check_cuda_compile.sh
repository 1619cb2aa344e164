#!/usr/bin/env bash
# Check the CUDA kernels build without a GPU, the way a user with a PyPI torch gets them: the
# compiler found or pip-installed by ddetr_cli.cuda_toolkit, then `ddetr build-ops --cuda` (the JIT
# build through ddetr_cli.ops_build, i.e. torch.utils.cpp_extension with nvcc) of
# cuda_ops/ms_deform_attn_cuda.cu for sm_80 and sm_90, then the library loaded into torch and its
# CUDA kernels checked to be registered to the ddetr operators. Any compiler or link error fails.
# What the kernels compute is tested on the CPU by tests/test_cuda_emulation.py, and on a GPU by
# scripts/gpu_check.sh.
#
# usage: scripts/check_cuda_compile.sh [--install]
#   --install  let the compiler matching torch's CUDA version be pip-installed into the active
#              environment when none is found (what CI does); otherwise a missing compiler exits 2.
# environment: PY (python, default python3), TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
# exit status: 0 built and registered, 1 build failed, 2 no CUDA compiler / no CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PY="${PY:-python3}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
export DDETR_CACHE_DIR="$cache"

if [[ "${1:-}" != "--install" ]]; then
    "$PY" -m ddetr_cli.cuda_toolkit || exit 2  # found, or exit: only --install may install
fi
start=$SECONDS
# The user's command: finds (or installs) nvcc, builds the CPU and the CUDA kernel.
"$PY" -m ddetr_cli.cli -v build-ops --cuda || exit 1

"$PY" - <<'PY'
import os
import sys

import torch

from ddetr_cli import cuda_toolkit, ops_build

compiler = cuda_toolkit.find_compiler()
print(f"check_cuda_compile: nvcc in {compiler.home} (found in {compiler.found_in})")
ops_build.build("cuda")  # cached by build-ops above: loads the library
registrations = torch._C._dispatch_dump("ddetr::ms_deform_attn_backward")
if "\nCUDA: registered at" not in registrations:
    print(f"check_cuda_compile: FAILED: no CUDA kernel registered:\n{registrations}", file=sys.stderr)
    sys.exit(1)
archs = os.environ["TORCH_CUDA_ARCH_LIST"]
print(f"check_cuda_compile: ms_deform_attn_cuda.cu built for {archs}, CUDA kernels registered")
PY
echo "check_cuda_compile: done in $((SECONDS - start)) s (compiler install, CPU and CUDA builds)"
