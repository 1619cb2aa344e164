"""`ddetr build-ops`: compile the deformable-attention kernels ahead of time (otherwise they are
compiled on first use) and say where they are cached.

Python API:
    build_ops_report(cuda=None, force=False, verbose=False) -> {variant: {"ok", "seconds", "path"|"error"}}
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

import shutil
import time
from typing import Optional

import typer

from ddetr_cli.console import console, info, is_verbose

EXAMPLES = [
    "ddetr build-ops",
    "ddetr build-ops --no-cuda --force -v",
    "ddetr build-ops --cuda                       # installs nvcc from PyPI if none is found",
    "DDETR_CACHE_DIR=/shared/cache ddetr build-ops --cuda",
]


def build_ops_report(cuda: Optional[bool] = None, force: bool = False, verbose: bool = False) -> dict:
    """Build the CPU kernel and, when `cuda` is True (None: when this torch has CUDA, a GPU is visible
    and nvcc is found), the CUDA kernel; with True a missing compiler is pip-installed first.
    `force` deletes their cached builds first. Never raises for a failed build."""
    import torch

    from ddetr_cli import ops_build

    if cuda is None:
        cuda = ops_build.cuda_unavailable_reason() is None and torch.cuda.is_available()
    report = {}
    for variant in ("cpu", "cuda") if cuda else ("cpu",):
        if force:
            shutil.rmtree(ops_build.build_dir(variant), ignore_errors=True)
        start = time.perf_counter()
        try:
            if variant == "cuda" and (reason := ops_build.prepare_cuda_compiler(install=True, say=info)):
                raise ops_build.BuildError(f"CUDA kernels unavailable: {reason}")
            path = ops_build.build(variant, verbose=verbose)
        except ops_build.BuildError as exc:
            report[variant] = {"ok": False, "seconds": time.perf_counter() - start, "error": str(exc)}
        else:
            report[variant] = {"ok": True, "seconds": time.perf_counter() - start, "path": str(path)}
    return report


def build_ops(
    cuda: Optional[bool] = typer.Option(
        None,
        "--cuda/--no-cuda",
        help="Build the CUDA kernel too, first installing the CUDA compiler from PyPI (matching torch's "
        "CUDA) if none is found. Default: when torch has CUDA, a GPU is visible and nvcc is found.",
    ),
    force: bool = typer.Option(False, "--force", help="Delete the cached builds and compile from scratch."),
) -> None:
    """Compile the deformable attention kernels (CPU, and CUDA when available) ahead of first use.

    Builds go to the per-user cache ($DDETR_CACHE_DIR or ~/.cache/ddetr/ops), so the first model
    run does not pay the compile time. Exits 1 if a requested kernel fails to build (the model
    would then fall back to the PyTorch reference). With -v the compiler's output is shown.
    """
    info("Building the deformable-attention kernels (about 10-60 s the first time)...")
    report = build_ops_report(cuda=cuda, force=force, verbose=is_verbose())
    failed = False
    for variant, result in report.items():
        if result["ok"]:
            seconds, path = result["seconds"], result["path"]
            console.print(f"[green]{variant}[/green] kernel ready in {seconds:.1f} s: {path}", soft_wrap=True)
        else:
            failed = True
            console.print(f"[red]{variant}[/red] kernel failed: {result['error']}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)
