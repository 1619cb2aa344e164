# Sourced by check_cuda_compile.sh and gpu_check.sh: find_cuda makes sure torch.utils.cpp_extension
# can find an nvcc, exporting CUDA_HOME. The search and the install are ddetr_cli.cuda_toolkit's, the
# code `ddetr build-ops --cuda` runs: nvcc on PATH, in $CUDA_HOME, /usr/local/cuda, torch's pip CUDA
# tree (site-packages/nvidia/cuXX); when none is found, the compiler wheels matching
# torch.version.cuda are pip-installed (nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt; --no-deps).
# Returns 1 when no compiler can be had. Uses $PY (default python3); ddetr_cli must be importable.
# (An argument, e.g. the old --install, is accepted and ignored: installing when needed is the rule.)

find_cuda() {
    local py="${PY:-python3}" line
    line="$("$py" -m ddetr_cli.cuda_toolkit --install --export)" || return 1
    eval "$line"
    echo "find_cuda: nvcc in CUDA_HOME=$CUDA_HOME"
}
