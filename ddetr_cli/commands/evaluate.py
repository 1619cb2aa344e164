"""`ddetr eval`: COCO box AP of a model, or of an existing results file, on a COCO-format split.

The Typer face of `ddetr_cli.engine.evaluation.evaluate` (the Python API).
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
from ddetr_cli.engine.evaluation import evaluate

HELP = (
    "Evaluate a model, or an existing COCO results file, on a COCO-format split: the 12 COCO "
    "numbers (COCOeval: hotcoco, or --backend faster / pycocotools), per-class AP, metrics.json and "
    "optionally the detections."
)
EXAMPLES = [
    "ddetr eval --weights runs/train/exp/weights/best.pt --data data/coco --split val --out metrics.json",
    "ddetr eval --weights r50_deformable_detr.pth --data data/coco --save-detections det.json",
    "HF_HUB_OFFLINE=1 ddetr eval --weights SenseTime/deformable-detr --data data/coco   # Hub id, cache only",
    "ddetr eval --predictions det.json --data data/coco --split val --out metrics.json",
    "torchrun --nproc_per_node 2 -m ddetr_cli.cli eval --weights best.pt --data data/coco",
]


def command(
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        "-w",
        help="Checkpoint: ddetr .pt, official .pth, Hugging Face folder" + HUB_HELP + ONNX_HELP,
    ),
    data: str = typer.Option(
        ..., "--data", help="Dataset: COCO-layout ROOT folder, dataset.yaml, or 'synthetic' (generated)."
    ),
    split: str = typer.Option(
        "val", "--split", help="Split to evaluate (annotations/instances_<split>*.json)."
    ),
    out: Path = typer.Option(Path("metrics.json"), "--out", "-o", help="Metrics JSON to write."),
    save_detections: Optional[Path] = typer.Option(
        None, "--save-detections", help="Also write the model's detections (COCO results JSON)."
    ),
    predictions: Optional[Path] = typer.Option(
        None, "--predictions", help="Evaluate this COCO results file instead of running a model."
    ),
    device: Optional[str] = DEVICE_OPTION,
    batch_size: int = typer.Option(2, "--batch-size", "-b", min=1, help="Images per batch."),
    workers: int = typer.Option(2, "--workers", min=0, help="Data loader threads."),
    imgsz: Optional[int] = INFERENCE_IMGSZ_OPTION,
    amp: Amp = AMP_OPTION,
    topk: int = typer.Option(100, "--topk", min=1, help="Detections kept per image (COCO scores 100)."),
    backend: str = typer.Option(
        "hotcoco",
        "--backend",
        help="COCO evaluator: hotcoco (Rust), faster (faster-coco-eval) or pycocotools; same numbers.",
    ),
    max_pixels: Optional[int] = MAX_PIXELS_OPTION,
) -> None:
    evaluate(
        weights=weights,
        data=data,
        split=split,
        out=out,
        save_detections=save_detections,
        predictions=predictions,
        device=device,
        batch_size=batch_size,
        workers=workers,
        imgsz=imgsz,
        amp=amp.value,
        topk=topk,
        backend=backend,
        max_pixels=max_pixels,
    )
