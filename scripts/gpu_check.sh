#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: build the CUDA deformable-attention kernel, run every
# GPU test, benchmark the op and the model, and write a report.
#
# usage: scripts/gpu_check.sh            (from anywhere; PYTHON=... picks the interpreter)
# output: $OUT if set, else ./gpu_report: report.md (summary), gpu_check.log (everything),
#         pytest_gpu.xml, bench_op.json, bench_model*.json
# exit status: 0 when every step passed, 1 otherwise (all steps run regardless, so one failure
# still leaves the other figures in the report).
#
# It needs a Python environment with torch (CUDA build) and the test dependencies. The repository
# is used from source (PYTHONPATH), so it need not be installed. nvcc is looked up on PATH, in
# $CUDA_HOME, /usr/local/cuda and torch's pip CUDA packages; failing that, the matching compiler is
# pip-installed (nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt) if PyPI can be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
REPORT_DIR="${OUT:-$REPO/gpu_report}"
mkdir -p "$REPORT_DIR"
LOG="$REPORT_DIR/gpu_check.log"
REPORT="$REPORT_DIR/report.md"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
# The interpreter: $PYTHON, else the first of these that has torch.
PY=""
for candidate in "${PYTHON:-}" python3 python "$REPO/.venv/bin/python" /work/venv/bin/python; do
    if [[ -n "$candidate" ]] && "$candidate" -c 'import torch' >/dev/null 2>&1; then
        PY="$candidate"
        break
    fi
done
if [[ -z "$PY" ]]; then
    echo "gpu_check: no Python with torch found (set PYTHON=/path/to/python)" | tee "$REPORT"
    exit 1
fi
export PY
# A virtual environment's tools (ninja, pip) sit beside its python, on PATH only once activated.
PATH="$(dirname "$(command -v "$PY")"):$PATH"
export PATH
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
FAILED=0

# run_step NAME COMMAND...: runs the command, records PASS/FAIL and its duration, never exits.
run_step() {
    local name="$1"
    shift
    echo
    echo "=== $name: $* ==="
    local start status
    start=$(date +%s)
    set +e
    "$@"
    status=$?
    set -e
    local seconds=$(( $(date +%s) - start ))
    if [[ $status -eq 0 ]]; then
        SUMMARY+=("| $name | PASS | ${seconds} s |")
    else
        SUMMARY+=("| $name | FAIL (exit $status) | ${seconds} s |")
        FAILED=1
    fi
    echo "=== $name: exit $status after ${seconds} s ==="
}

versions() {
    date -u
    uname -a
    nvidia-smi || echo "nvidia-smi not available"
    "$PY" --version
    "$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
PY
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
}

# shellcheck source=scripts/find_cuda.sh
source "$REPO/scripts/find_cuda.sh"

find_nvcc() {  # exports CUDA_HOME when nvcc is not on PATH (see find_cuda.sh)
    find_cuda || return 1
    "${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" --version
}

build_kernels() {
    "$PY" - <<'PY'
import time

from ddetr_cli import ops_build

for variant in ("cpu", "cuda"):
    start = time.perf_counter()
    path = ops_build.build(variant, verbose=True)
    print(f"{variant} kernel ready in {time.perf_counter() - start:.1f} s: {path}")
PY
}

gpu_tests() {
    # --noconftest: these tests need nothing from conftest.py (which imports the data pipeline).
    "$PY" -m pytest -m gpu -v -rA -p no:cacheprovider --noconftest --junitxml="$REPORT_DIR/pytest_gpu.xml" \
        tests/test_ops_gpu.py
}

other_gpu_tests() {  # gpu-marked tests of other areas (model, training), if any
    local status=0
    "$PY" -m pytest -m gpu -rA -p no:cacheprovider --ignore=tests/test_ops_gpu.py tests || status=$?
    [[ $status -eq 5 ]] && return 0  # 5: none collected
    return $status
}

cpu_tests() {
    "$PY" -m pytest -q -rfE -p no:cacheprovider --noconftest tests/test_ops.py
}

bench_op() {
    "$PY" -m ddetr_cli.cli bench op --device cuda --repeats 20 --warmup 3 --json "$REPORT_DIR/bench_op.json" \
        | tee "$REPORT_DIR/bench_op.txt"
}

bench_model() {
    "$PY" -m ddetr_cli.cli bench --variant plain --imgsz 800x1333 --device cuda --iters 20 \
        --json "$REPORT_DIR/bench_model.json" | tee "$REPORT_DIR/bench_model.txt"
}

bench_model_bf16() {
    "$PY" -m ddetr_cli.cli bench --variant plain --imgsz 800x1333 --device cuda --amp bf16 --iters 20 \
        --json "$REPORT_DIR/bench_model_bf16.json" | tee "$REPORT_DIR/bench_model_bf16.txt"
}

run_step "versions and GPU" versions
run_step "CUDA compiler" find_nvcc
run_step "build kernels" build_kernels
run_step "GPU op tests" gpu_tests
run_step "other GPU tests" other_gpu_tests
run_step "CPU op tests" cpu_tests
run_step "op benchmark" bench_op
run_step "model benchmark fp32" bench_model
run_step "model benchmark bf16" bench_model_bf16

{
    echo "# ddetr GPU check"
    echo
    echo "$(date -u), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || true
    echo '```'
    echo
    echo "| step | result | time |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${SUMMARY[@]}"
    for table in bench_op bench_model bench_model_bf16; do
        if [[ -s "$REPORT_DIR/$table.txt" ]]; then
            echo
            echo "## $table"
            echo
            echo '```'
            cat "$REPORT_DIR/$table.txt"
            echo '```'
        fi
    done
    echo
    echo "Full log: gpu_check.log"
} > "$REPORT"
echo
cat "$REPORT"
exit "$FAILED"
