"""The CUDA compiler (nvcc) the JIT build of the CUDA kernel needs: found, or installed from PyPI.

A `pip install torch` CUDA build brings the CUDA runtime but no compiler. `find_compiler` looks, in
order, for nvcc on PATH, in $CUDA_HOME, in /usr/local/cuda and in torch's pip CUDA tree
(site-packages/nvidia/cu<major>, where NVIDIA's nvcc wheels install beside the runtime torch
brought). `install_compiler` pip-installs the wheels matching `torch.version.cuda` into this
environment (`--no-deps`: the runtime is torch's); only `ddetr build-ops --cuda` calls it, never a
training run. Wheels exist for CUDA >= 13 in that layout (nvidia-cuda-nvcc, nvidia-nvvm,
nvidia-cuda-crt); for older CUDA builds of torch the toolkit must come from NVIDIA.

`python -m ddetr_cli.cuda_toolkit [--install] [--export]` prints the compiler found (installing it
first with --install if none is), or with --export a shell line setting CUDA_HOME; exit status 2
when there is none. scripts/find_cuda.sh and scripts/check_cuda_compile.sh use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SYSTEM_CUDA = Path("/usr/local/cuda")
BUILD_COMMAND = "ddetr build-ops --cuda"
FIRST_PIP_CUDA = 13  # the first CUDA major whose compiler wheels install into torch's nvidia/cu<major>


class ToolkitError(RuntimeError):
    """No CUDA compiler can be had here; the message says why in one line."""


@dataclass(frozen=True)
class Compiler:
    """A CUDA toolkit root (the CUDA_HOME of the build; nvcc is home/bin/nvcc) and where it was found."""

    home: Path
    found_in: str


def torch_cuda_version() -> str | None:
    """The CUDA version this torch was built for ("13.2"), None for a CPU-only build."""
    import torch

    return torch.version.cuda


def pip_tree() -> Path | None:
    """torch's pip CUDA tree, site-packages/nvidia/cu<major>, if this torch has one."""
    version = torch_cuda_version()
    if version is None:
        return None
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        tree = Path(root) / f"cu{version.split('.')[0]}"
        if tree.is_dir():
            return tree
    return None


def _has_nvcc(home: Path | None) -> bool:
    return home is not None and os.access(home / "bin" / "nvcc", os.X_OK)


def find_compiler() -> Compiler | None:
    """The first CUDA compiler found on PATH, in $CUDA_HOME, /usr/local/cuda or torch's pip tree."""
    on_path = shutil.which("nvcc")
    if on_path:
        return Compiler(Path(on_path).resolve().parent.parent, "PATH")
    env_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env_home and _has_nvcc(Path(env_home)):
        return Compiler(Path(env_home), "CUDA_HOME")
    if _has_nvcc(SYSTEM_CUDA):
        return Compiler(SYSTEM_CUDA, str(SYSTEM_CUDA))
    tree = pip_tree()
    if _has_nvcc(tree):
        return Compiler(tree, "torch's pip CUDA tree")
    return None


def compiler_packages(cuda_version: str) -> list[str]:
    """The PyPI wheels of the compiler for CUDA `cuda_version` ("13.2"): nvcc, its NVVM backend and
    the crt headers, pinned to the same minor version as torch's runtime."""
    major, minor = (int(part) for part in cuda_version.split(".")[:2])
    if major < FIRST_PIP_CUDA:
        raise ToolkitError(
            f"torch is built for CUDA {cuda_version}: install the CUDA {major}.{minor} toolkit from NVIDIA "
            f"and set CUDA_HOME (compiler wheels are used for CUDA >= {FIRST_PIP_CUDA} only)"
        )
    pin = f"=={major}.{minor}.*"
    return [f"nvidia-cuda-nvcc{pin}", f"nvidia-nvvm{pin}", f"nvidia-cuda-crt{pin}"]


def install_command(cuda_version: str) -> list[str]:
    """The pip command that installs the compiler into this interpreter's environment."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", *compiler_packages(cuda_version)]


def missing_reason() -> str:
    """One line: why there is no compiler, and the command that gets one."""
    version = torch_cuda_version()
    if version is None:
        return "this torch build has no CUDA support"
    try:
        compiler_packages(version)
    except ToolkitError as exc:
        return f"no CUDA compiler found (nvcc not on PATH, in CUDA_HOME or {SYSTEM_CUDA}); {exc}"
    return (
        f"no CUDA compiler found (nvcc not on PATH, in CUDA_HOME, {SYSTEM_CUDA} or torch's pip CUDA tree); "
        f"run `{BUILD_COMMAND}` to install it from PyPI and build the kernel"
    )


def install_compiler(say: Callable[[str], None] = print) -> Compiler:
    """pip-installs the compiler matching torch's CUDA into this environment, saying what it runs;
    returns it. Raises ToolkitError (one line) if torch has no CUDA or the install gives no nvcc."""
    version = torch_cuda_version()
    if version is None:
        raise ToolkitError("this torch build has no CUDA support")
    command = install_command(version)
    say(f"Installing the CUDA {version} compiler from PyPI: {' '.join(command[1:])}")
    result = subprocess.run(command, check=False)
    tree = pip_tree()
    if result.returncode != 0 or not _has_nvcc(tree):
        raise ToolkitError(f"`{' '.join(command[1:])}` gave no nvcc (exit status {result.returncode})")
    return Compiler(tree, "torch's pip CUDA tree")


def activate(compiler: Compiler) -> None:
    """Points torch.utils.cpp_extension (and child processes) at `compiler`. A pip tree gets the two
    links cpp_extension expects: $CUDA_HOME/lib64 and an unversioned libcudart.so (ToolkitError if
    it cannot)."""
    from torch.utils import cpp_extension

    if compiler.found_in == "torch's pip CUDA tree":
        _link_pip_runtime(compiler.home)
    os.environ["CUDA_HOME"] = str(compiler.home)
    cpp_extension.CUDA_HOME = str(compiler.home)


def _link_pip_runtime(home: Path) -> None:
    lib = home / "lib"
    try:
        if not (home / "lib64").exists():
            (home / "lib64").symlink_to("lib")
        if not (lib / "libcudart.so").exists():
            versioned = sorted(lib.glob("libcudart.so.*"))
            if versioned:
                (lib / "libcudart.so").symlink_to(versioned[0].name)
    except OSError as exc:
        raise ToolkitError(f"cannot prepare torch's pip CUDA tree {home} for the build: {exc}") from exc


def main(argv: list[str]) -> int:
    install, export = "--install" in argv, "--export" in argv
    say = (lambda line: print(line, file=sys.stderr)) if export else print
    compiler = find_compiler()
    try:
        if compiler is None and install:
            compiler = install_compiler(say)
    except ToolkitError as exc:
        say(f"cuda_toolkit: {exc}")
        return 2
    if compiler is None:
        say(f"cuda_toolkit: {missing_reason()}")
        return 2
    try:
        activate(compiler)
    except ToolkitError as exc:
        say(f"cuda_toolkit: {exc}")
        return 2
    if export:
        print(f"export CUDA_HOME='{compiler.home}'")
    else:
        print(f"cuda_toolkit: nvcc in {compiler.home} (found in {compiler.found_in})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
