"""Typer options that several commands share, declared once so that they read the same everywhere
(Typer copies an option's declaration per command, so one object may serve many)."""

from __future__ import annotations

import typer

from ddetr_cli.distributed import Amp

DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda, cuda:N or N (default: CUDA if available).")
AMP_OPTION = typer.Option(Amp.off, "--amp", help="Mixed precision.")
# Inference commands (eval, predict): the shorter side images are resized to.
INFERENCE_IMGSZ_OPTION = typer.Option(
    None, "--imgsz", help="Shorter image side (default: the checkpoint's training size, else 800)."
)
# --weights (eval, predict, bench, export): what a Hub id means, appended to each command's help.
HUB_HELP = (
    ", or a Hugging Face Hub id org/name or org/name@revision, e.g. SenseTime/deformable-detr (cached under "
    "HF_HOME; HF_HUB_OFFLINE=1: the cache only). A local path always wins."
)
# Every command that reads images: the pixel budget a header may claim before the file is skipped.
MAX_PIXELS_OPTION = typer.Option(
    None, "--max-pixels", min=1, help="Skip images whose header claims more pixels (default: 8000 x 8000)."
)
# --weights of the inference commands (eval, predict, bench) also takes an exported model.
ONNX_HELP = " A `ddetr export` .onnx file runs through onnxruntime."
