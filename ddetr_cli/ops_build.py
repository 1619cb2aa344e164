"""Just-in-time build of the compiled deformable-attention kernels in `cuda_ops/`.

The kernels are compiled on the user's machine with `torch.utils.cpp_extension.load` (ninja) the
first time they are needed, into a per-user cache keyed by the torch version and a hash of the
sources and flags, so later runs load them in well under a second:

    $DDETR_CACHE_DIR (default $XDG_CACHE_HOME/ddetr or ~/.cache/ddetr) / ops / <torch>-<variant>-<hash>/

Three libraries, loaded into the process with `torch.ops.load_library`:
- "cpu": `cuda_ops/ms_deform_attn_cpu.cpp`; defines the `ddetr::ms_deform_attn_forward/backward`
  operators and their CPU kernels. Needs only a C++ compiler.
- "cuda": `cuda_ops/ms_deform_attn_cuda.cu`; adds CUDA kernels to those operators. Needs nvcc and
  a CUDA build of torch, and the "cpu" library (which owns the operator schemas).
- "emulation": `cuda_ops/emulation/`; the CUDA kernels (`ms_deform_attn_kernels.cuh`) compiled by
  the host C++ compiler and run on the CPU with CUDA's thread semantics, as the separate
  `ddetr_emulation::forward/backward` operators (never a backend of `ddetr::`). For the tests.

A failed build never raises from `load`: it logs one warning on the "ddetr" logger and the caller
falls back to the PyTorch reference. `build` raises `BuildError` with the compiler's message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ddetr_cli
from ddetr_cli.benchmarking import cpuinfo

log = logging.getLogger("ddetr")

VARIANTS = ("cpu", "cuda", "emulation")
_EMULATION = [
    "emulation/ms_deform_attn_emulation.cpp",
    "emulation/arch_sm80.cpp",
    "emulation/arch_sm90.cpp",
    "emulation/cuda_emulation.cpp",
]
_SOURCES = {"cpu": ["ms_deform_attn_cpu.cpp"], "cuda": ["ms_deform_attn_cuda.cu"], "emulation": _EMULATION}
_HEADERS = ["ms_deform_attn_math.h", "ms_deform_attn_common.h"]
_KERNEL_HEADERS = {  # beyond _HEADERS
    "cpu": ["ms_deform_attn_cpu_rows.h", "ms_deform_attn_cpu_padded.h"],
    "cuda": ["ms_deform_attn_kernels.cuh"],
    "emulation": [
        "ms_deform_attn_kernels.cuh",
        "emulation/cuda_emulation.h",
        "emulation/emulated_launchers.h",
        "emulation/emulated_ops.h",
    ],
}
# -O3 lets the compiler vectorise the channel loops; on x86-64, -march=native lets it use AVX2/AVX-512
# (~1.5x on the forward). The CPU's feature flags are part of the build's fingerprint, so a cache
# shared by different machines (a home directory on NFS) keeps one build per kind of CPU.
_NATIVE = platform.machine().lower() in ("x86_64", "amd64")
# -fopenmp: ATen's parallel_for is an inline template that runs its loop serially unless the
# extension itself is compiled with OpenMP (_OPENMP defined); linked with it, the extension shares
# the libgomp.so.1 that torch has already loaded (same soname), so one thread pool serves both.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
_CFLAGS = (["-O3", "-march=native"] if _NATIVE else ["-O3"]) + _OPENMP
_CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]
# The emulation is checked, not timed: -O1 keeps its compile short.
_EMULATION_CFLAGS = ["-O1"]

# variant -> None while untried, True when loaded, else the one-line reason it is unavailable.
_state: dict[str, object] = {}


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why in one line."""


def sources_dir() -> Path:
    """`cuda_ops/` beside the `ddetr_cli` package: the repository root in an editable install,
    site-packages in a wheel (pyproject's maturin `include` ships it there)."""
    return Path(ddetr_cli.__file__).resolve().parent.parent / "cuda_ops"


def cache_root() -> Path:
    """Root of the build cache: $DDETR_CACHE_DIR/ops, else $XDG_CACHE_HOME/ddetr/ops or ~/.cache/ddetr/ops."""
    if os.environ.get("DDETR_CACHE_DIR"):
        return Path(os.environ["DDETR_CACHE_DIR"]).expanduser() / "ops"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ddetr" / "ops"


def _fingerprint(variant: str) -> str:
    """Hash of everything that changes the built library: sources, flags, torch/CUDA/Python versions."""
    h = hashlib.sha256()
    src = sources_dir()
    for name in _headers(variant) + _SOURCES[variant]:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    versions = (torch.__version__, torch.version.cuda, sys.version_info[:2], platform.machine())
    h.update(repr((_cflags(variant), versions, _cpu_flags() if _NATIVE else "")).encode())
    if variant == "cuda":  # the GPU architectures compiled for are part of the CUDA build
        h.update(repr((_CUDA_CFLAGS, os.environ.get("TORCH_CUDA_ARCH_LIST", ""), _visible_archs())).encode())
    return h.hexdigest()[:16]


def _headers(variant: str) -> list[str]:
    return _HEADERS + _KERNEL_HEADERS[variant]


def _cflags(variant: str) -> list[str]:
    return _EMULATION_CFLAGS if variant == "emulation" else _CFLAGS


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), from /proc/cpuinfo where there is one."""
    return cpuinfo("flags") or platform.processor()


def _visible_archs() -> list[str]:
    """Compute capabilities of the visible GPUs (what cpp_extension compiles for by default)."""
    if not torch.cuda.is_available():
        return []
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(f"{major}.{minor}" for major, minor in capabilities)


def build_dir(variant: str) -> Path:
    """Where `variant` is (or will be) built."""
    safe_version = torch.__version__.replace("+", "_")
    return cache_root() / f"{safe_version}-{variant}-{_fingerprint(variant)}"


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be built here (one line naming the command that fixes it), or None
    if they can: then torch.utils.cpp_extension is pointed at the compiler found."""
    from ddetr_cli import cuda_toolkit

    compiler = cuda_toolkit.find_compiler() if torch.version.cuda is not None else None
    if compiler is None:
        return cuda_toolkit.missing_reason()
    try:
        cuda_toolkit.activate(compiler)
    except cuda_toolkit.ToolkitError as exc:
        return str(exc)
    return None


def prepare_cuda_compiler(install: bool, say: Callable[[str], None]) -> str | None:
    """Like cuda_unavailable_reason, but with `install` a missing compiler is first pip-installed
    (matching torch's CUDA; `say` tells what is installed). Only `ddetr build-ops --cuda` installs."""
    from ddetr_cli import cuda_toolkit

    if install and torch.version.cuda is not None and cuda_toolkit.find_compiler() is None:
        try:
            cuda_toolkit.install_compiler(say)
        except cuda_toolkit.ToolkitError as exc:
            return str(exc)
    return cuda_unavailable_reason()


def build(variant: str, verbose: bool = False) -> Path:
    """Compile (if not cached) and load `variant` into this process; returns its build directory.

    Raises BuildError (one line) if the sources are missing, no compiler is found or compilation fails.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; expected one of {VARIANTS}")
    if _state.get(variant) is True:
        return build_dir(variant)
    if variant == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise BuildError(f"CUDA kernels unavailable: {reason}")
        build("cpu", verbose)  # owns the operator schemas the CUDA kernels register into
    src = sources_dir()
    missing = [n for n in _headers(variant) + _SOURCES[variant] if not (src / n).is_file()]
    if missing:
        raise BuildError(f"kernel sources missing in {src}: {', '.join(missing)}")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise BuildError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)")

    from torch.utils import cpp_extension

    _put_ninja_on_path()
    out = build_dir(variant)
    start = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        cached = any(out.glob("*.so"))
        cpp_extension.load(
            name=f"ddetr_msda_{variant}",
            sources=[str(src / n) for n in _SOURCES[variant]],
            extra_cflags=_cflags(variant),
            extra_cuda_cflags=_CUDA_CFLAGS,
            extra_ldflags=_OPENMP,
            extra_include_paths=[str(src)],
            build_directory=str(out),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors: RuntimeError/CalledProcessError; unwritable cache: OSError
        _state[variant] = f"{variant} kernel build failed in {out}: {_first_line(exc)}"
        raise BuildError(_state[variant]) from exc
    _state[variant] = True
    if not cached:
        seconds = time.perf_counter() - start
        log.info("built the %s deformable-attention kernel in %.1f s (%s)", variant, seconds, out)
    return out


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package installs it beside this interpreter,
    which is not on PATH when a virtual environment's python is run without activating it."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if (directory / "ninja").is_file():
            os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def load(variant: str) -> bool:
    """True if `variant` is loaded (building it on first use); False, with one warning logged once, if not."""
    state = _state.get(variant)
    if state is None:
        try:
            build(variant)
        except BuildError as exc:
            _state[variant] = str(exc)
            log.warning("ddetr: %s; using the PyTorch reference for deformable attention", exc)
        state = _state[variant]
    return state is True


def unavailable_reason(variant: str) -> str | None:
    """Why `variant` is not loaded (after a `load` attempt), or None if it is."""
    state = _state.get(variant)
    return None if state is True else (state or "not built yet")


def _first_line(exc: BaseException) -> str:
    """The most useful single line of a compiler failure: the first `error` line, else the message."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "error:" in line or "Error:" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__
