"""`ddetr demo`: generate data, train a tiny Deformable DETR, evaluate it and draw its detections.

The Typer face of `ddetr_cli.engine.demo.run_demo` (the Python API; outputs described there).
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the command working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.console import info
from ddetr_cli.engine.demo import run_demo

HELP = (
    "Generate a synthetic shapes dataset, train a tiny Deformable DETR on it, evaluate it and "
    "draw its detections: the whole pipeline on a CPU in minutes, nothing to download."
)
EXAMPLES = [
    "ddetr demo",
    "ddetr demo --out runs/demo2 --seed 1",
    "ddetr demo --fast   # a shortened run (about a minute), as CI does",
]


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Directory for data, run and pictures."),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", help="Training epochs (default: the tiny preset's)."
    ),
    fast: bool = typer.Option(False, "--fast", help="A shortened run (fewer images and epochs), as CI does."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data, the initialisation and the data order."),
    device: Optional[str] = typer.Option(
        "cpu", "--device", help="cpu (default: the demo is sized for a CPU), cuda, cuda:N."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader threads (default: 2)."),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        help="CPU threads for torch (default: one per core; 1 is faster on a busy machine).",
    ),
) -> None:
    """Generate shapes data, train the tiny preset, evaluate it and draw its detections (CPU, minutes)."""
    result = run_demo(
        out, epochs=epochs, fast=fast, seed=seed, device=device, workers=workers, threads=threads
    )
    if result.metrics.get("AP50", 0.0) < 0.5 and not fast:
        info("[yellow]AP50 is below 0.5: try more --epochs[/yellow]")
