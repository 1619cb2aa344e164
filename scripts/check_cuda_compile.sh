#!/usr/bin/env bash
# Check the CUDA kernels build without a GPU: the real JIT build (ddetr_cli.ops_build, i.e.
# torch.utils.cpp_extension with nvcc) of cuda_ops/ms_deform_attn_cuda.cu for sm_80 and sm_90,
# linked and loaded into torch, and its CUDA kernels registered to the ddetr operators.
# Any compiler or link error fails. The GPU-side behaviour is tested by scripts/gpu_check.sh.
#
# usage: scripts/check_cuda_compile.sh [--install]
#   --install  pip-install the CUDA compiler matching torch's CUDA version into the active
#              environment first (what CI does); otherwise nvcc is looked up (see find_cuda.sh).
# environment: PY (python, default python3), TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
# exit status: 0 built and registered, 1 build failed, 2 no CUDA compiler / no CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PY="${PY:-python3}"
# shellcheck source=scripts/find_cuda.sh
source scripts/find_cuda.sh
find_cuda "${1:-}" || exit 2
"${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" --version | tail -n 2

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
export DDETR_CACHE_DIR="$cache"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import os
import sys
import time

import torch

from ddetr_cli import ops_build

start = time.perf_counter()
try:
    ops_build.build("cuda", verbose=True)
except ops_build.BuildError as exc:
    print(f"check_cuda_compile: FAILED: {exc}", file=sys.stderr)
    sys.exit(1)
seconds = time.perf_counter() - start
registrations = torch._C._dispatch_dump("ddetr::ms_deform_attn_backward")
if "\nCUDA: registered at" not in registrations:
    print(f"check_cuda_compile: FAILED: no CUDA kernel registered:\n{registrations}", file=sys.stderr)
    sys.exit(1)
archs = os.environ["TORCH_CUDA_ARCH_LIST"]
print(f"check_cuda_compile: ms_deform_attn_cuda.cu built for {archs} and registered in {seconds:.0f} s (incl. CPU kernel)")
PY
