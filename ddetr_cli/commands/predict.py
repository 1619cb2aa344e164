"""`ddetr predict`: detections for image files, folders (recursive) and globs.

The Typer face of `ddetr_cli.engine.prediction.predict` (the Python API).
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.commands.options import (
    AMP_OPTION,
    DEVICE_OPTION,
    HUB_HELP,
    INFERENCE_IMGSZ_OPTION,
    MAX_PIXELS_OPTION,
    ONNX_HELP,
)
from ddetr_cli.distributed import Amp
from ddetr_cli.engine.prediction import predict

HELP = (
    "Detect objects in images (files, folders searched recursively, globs): COCO-format results JSON "
    "and optional pictures with boxes, labels and scores."
)
EXAMPLES = [
    "ddetr predict images/ --weights runs/train/exp/weights/best.pt --out results.json",
    "ddetr predict 'photos/**/*.jpg' a.png --weights best.pt --save-vis vis/ --score-thr 0.5",
    "ddetr predict data/coco/val2017 --weights best.pt --ann data/coco/annotations/instances_val2017.json",
]


def command(
    sources: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs."),
    weights: Path = typer.Option(
        ...,
        "--weights",
        "-w",
        help="Checkpoint: ddetr .pt, official .pth, HF folder" + HUB_HELP + ONNX_HELP,
    ),
    out: Path = typer.Option(Path("results.json"), "--out", "-o", help="Results JSON (COCO results format)."),
    ann: Optional[Path] = typer.Option(
        None, "--ann", help="COCO annotation file: maps file names to image_id (and gives class names)."
    ),
    save_vis: Optional[Path] = typer.Option(
        None, "--save-vis", help="Folder for images with drawn detections."
    ),
    score_thr: float = typer.Option(0.3, "--score-thr", help="Keep detections with at least this score."),
    topk: int = typer.Option(100, "--topk", min=1, help="Most detections per image before --score-thr."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", min=0, help="Image decoding threads."),
    device: Optional[str] = DEVICE_OPTION,
    imgsz: Optional[int] = INFERENCE_IMGSZ_OPTION,
    amp: Amp = AMP_OPTION,
    max_pixels: Optional[int] = MAX_PIXELS_OPTION,
) -> None:
    predict(
        sources,
        weights=weights,
        out=out,
        ann=ann,
        save_vis=save_vis,
        score_thr=score_thr,
        topk=topk,
        batch_size=batch_size,
        workers=workers,
        device=device,
        imgsz=imgsz,
        amp=amp.value,
        max_pixels=max_pixels,
    )
