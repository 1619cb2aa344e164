"""`ddetr export`: a checkpoint as an ONNX detector (pre-processing, network, top-k in one graph).

Python API: ddetr_cli.engine.export.export_onnx (this module is only the command line face).
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.commands.options import HUB_HELP
from ddetr_cli.console import UserError, info

HELP = (
    "Export a model to ONNX for onnxruntime / TensorRT: uint8 images in, top-k scores, category ids "
    "and xyxy pixel boxes out, with the class names and settings in the file's metadata."
)
EXAMPLES = [
    "ddetr export --weights runs/train/exp/weights/best.pt --out model.onnx",
    "ddetr export --weights r50_deformable_detr.pth --imgsz 800x1066 --dynamic --out r50.onnx",
    "ddetr export --weights best.pt --input normalized --batch 2 --topk 300 --out model.onnx",
]


class Format(str, Enum):
    onnx = "onnx"


class InputForm(str, Enum):
    uint8 = "uint8"
    normalized = "normalized"


def command(
    weights: Path = typer.Option(
        ..., "--weights", "-w", help="Checkpoint: ddetr .pt, official .pth, HF folder" + HUB_HELP
    ),
    format: Format = typer.Option(Format.onnx, "--format", help="Export format."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: WEIGHTS.onnx)."),
    imgsz: Optional[str] = typer.Option(
        None, "--imgsz", help="Input HxW (default: s x 4s/3 for the training size s, else 800x1066)."
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size of the fixed-shape graph."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic batch, height and width."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 16 for GridSample)."),
    input_form: InputForm = typer.Option(
        InputForm.uint8,
        "--input",
        help="uint8: RGB images + valid sizes (deployment); normalized: the PyTorch model's input + mask.",
    ),
    topk: int = typer.Option(100, "--topk", min=1, help="Detections per image in the graph's output."),
    half: bool = typer.Option(
        False, "--half", help="fp16 convolutions and matmuls (as --amp fp16); I/O unchanged."
    ),
    simplify: bool = typer.Option(False, "--simplify", help="Run onnxsim on the graph (needs onnxsim)."),
) -> None:
    from ddetr_cli.engine.export import export_onnx
    from ddetr_cli.engine.inference import parse_imgsz

    if format != Format.onnx:
        raise UserError(f"--format {format.value} is not supported")
    path = export_onnx(
        weights,
        out,
        imgsz=parse_imgsz(imgsz) if imgsz is not None else None,
        batch=batch,
        dynamic=dynamic,
        opset=opset,
        input_form=input_form.value,
        topk=topk,
        half=half,
        simplify=simplify,
    )
    size_mb = path.stat().st_size / 1e6
    info(f"exported {weights} -> {path} ({size_mb:.1f} MB, input {input_form.value}, opset {opset})")
