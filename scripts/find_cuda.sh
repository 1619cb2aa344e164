# Sourced by check_cuda_compile.sh and gpu_check.sh: find_cuda [--install] makes sure
# torch.utils.cpp_extension can find an nvcc, exporting CUDA_HOME when nvcc is not on PATH.
# Looks on PATH, in $CUDA_HOME, /usr/local/cuda, then torch's pip CUDA tree (site-packages/nvidia/cuXX,
# where the nvidia-cuda-nvcc wheel installs next to the runtime headers torch brought). With
# --install, or when nothing is found, it pip-installs the compiler matching torch.version.cuda
# (nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt; --no-deps: the runtime comes with torch).
# Returns 1 when no compiler can be had. Uses $PY (default python3).

find_cuda() {
    local py="${PY:-python3}" install="${1:-}"
    if [[ "$install" != "--install" ]]; then
        if command -v nvcc >/dev/null; then
            echo "find_cuda: nvcc on PATH: $(command -v nvcc)"
            return 0
        elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
            echo "find_cuda: nvcc in CUDA_HOME=$CUDA_HOME"
            return 0
        elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
            export CUDA_HOME=/usr/local/cuda
            echo "find_cuda: nvcc in $CUDA_HOME"
            return 0
        fi
    fi
    local cuda_version site
    cuda_version="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
    if [[ -z "$cuda_version" ]]; then
        echo "find_cuda: this torch build has no CUDA support"
        return 1
    fi
    pip_site() {
        "$py" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu'"${cuda_version%%.*}"'"))' \
            2>/dev/null || true
    }
    site="$(pip_site)"
    if [[ "$install" == "--install" || -z "$site" || ! -x "$site/bin/nvcc" ]]; then
        echo "find_cuda: pip-installing the CUDA $cuda_version compiler"
        timeout 600 "$py" -m pip install -q --no-deps "nvidia-cuda-nvcc==${cuda_version}.*" \
            "nvidia-nvvm==${cuda_version}.*" "nvidia-cuda-crt==${cuda_version}.*" || true
        site="$(pip_site)"
    fi
    if [[ -z "$site" || ! -x "$site/bin/nvcc" ]]; then
        echo "find_cuda: no CUDA compiler available"
        return 1
    fi
    # cpp_extension links $CUDA_HOME/lib64/libcudart.so; the pip tree has lib/libcudart.so.NN only.
    [[ -e "$site/lib64" ]] || ln -s lib "$site/lib64"
    if [[ ! -e "$site/lib/libcudart.so" ]]; then
        local cudart
        cudart="$(cd "$site/lib" && ls libcudart.so.* | head -n 1)"
        ln -s "$cudart" "$site/lib/libcudart.so"
    fi
    export CUDA_HOME="$site"
    echo "find_cuda: nvcc from pip in CUDA_HOME=$CUDA_HOME"
}
