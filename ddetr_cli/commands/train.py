"""`ddetr train`: train (or fine-tune) a Deformable DETR on COCO-format data, with the paper's recipe.

The Typer face of `ddetr_cli.engine.trainer.train` (the Python API; the run directory and
checkpoint contents are described there).
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.commands.options import DEVICE_OPTION, MAX_PIXELS_OPTION
from ddetr_cli.distributed import Amp
from ddetr_cli.engine.settings import parse_scales
from ddetr_cli.engine.trainer import train

HELP = (
    "Train or fine-tune a Deformable DETR on COCO-format data (ROOT folder, dataset.yaml or "
    "'synthetic') with the paper's recipe; works the same under torchrun (DDP)."
)
EXAMPLES = [
    "ddetr train --data data/coco --epochs 50 --batch-size 2 --device cuda   # ImageNet backbone",
    "ddetr train --data dataset.yaml --weights SenseTime/deformable-detr --epochs 12 --lr-drop 10",
    "HF_HUB_OFFLINE=1 TORCH_HOME=/shared/torch ddetr train --data data/coco   # caches only",
    "ddetr train --data data/coco --pretrained-backbone none   # from scratch (not the paper's)",
    "ddetr train --data dataset.yaml --weights r50_deformable_detr.pth --epochs 12 --lr-drop 10",
    "ddetr train --data synthetic --preset tiny --device cpu",
    "ddetr train --resume runs/train/exp/weights/last.pt",
    "torchrun --nproc_per_node 8 -m ddetr_cli.cli train --data data/coco --variant two-stage",
]


def command(
    data: Optional[str] = typer.Option(
        None, "--data", help="COCO-layout ROOT folder, dataset.yaml, or 'synthetic' (default: synthetic)."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: 50)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", "-b", help="Images per device (default: 2)."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default: 2e-4)."),
    lr_backbone: Optional[float] = typer.Option(
        None, "--lr-backbone", help="Backbone learning rate (default: 2e-5)."
    ),
    lr_linear_proj_mult: Optional[float] = typer.Option(
        None, "--lr-linear-proj-mult", help="Sampling-offset/reference-point lr factor (default: 0.1)."
    ),
    weight_decay: Optional[float] = typer.Option(
        None, "--weight-decay", help="AdamW weight decay (default: 1e-4)."
    ),
    lr_drop: Optional[int] = typer.Option(
        None, "--lr-drop", help="Multiply the lr by 0.1 after this many epochs (default: 40)."
    ),
    clip_max_norm: Optional[float] = typer.Option(
        None, "--clip-max-norm", help="Gradient-norm clip, 0 = off (default: 0.1)."
    ),
    variant: Optional[str] = typer.Option(
        None, "--variant", help="plain, box-refine or two-stage (default: plain)."
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="resnet50 (default), resnet18/34/101, or tiny."
    ),
    pretrained_backbone: Optional[str] = typer.Option(
        None,
        "--pretrained-backbone",
        metavar="imagenet|none|PATH",
        help="ResNet starting weights: imagenet (default: torchvision's IMAGENET1K_V1 from the "
        "$TORCH_HOME cache, downloaded once when online), none (from scratch), or a local "
        "torchvision/timm state dict. Not used with --weights, --resume or the tiny backbone.",
    ),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        "-w",
        help="Fine-tune from a checkpoint: local .pt/.pth/HF folder, or a Hugging Face Hub id "
        "org/name or org/name@revision (HF_HOME cache; HF_HUB_OFFLINE=1 = cache only). Classes whose names "
        "match the checkpoint's keep its class-head rows; the others start fresh.",
    ),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", help="Transformer width (default: 256)."),
    nheads: Optional[int] = typer.Option(None, "--nheads", help="Attention heads (default: 8)."),
    enc_layers: Optional[int] = typer.Option(None, "--enc-layers", help="Encoder layers (default: 6)."),
    dec_layers: Optional[int] = typer.Option(None, "--dec-layers", help="Decoder layers (default: 6)."),
    dim_feedforward: Optional[int] = typer.Option(
        None, "--dim-feedforward", help="FFN width (default: 1024)."
    ),
    num_queries: Optional[int] = typer.Option(None, "--num-queries", help="Object queries (default: 300)."),
    num_feature_levels: Optional[int] = typer.Option(
        None, "--num-feature-levels", help="Feature levels (default: 4)."
    ),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Transformer dropout (default: 0.1)."),
    imgsz: Optional[int] = typer.Option(
        None,
        "--imgsz",
        help="Evaluation shorter side; training scales scaled to match (default: 800, scales 480..800).",
    ),
    scales: Optional[str] = typer.Option(None, "--scales", help="Training shorter sides, comma-separated."),
    crop_prob: Optional[float] = typer.Option(
        None, "--crop-prob", help="Probability of the random-crop augmentation branch (default: 0.5)."
    ),
    amp: Optional[Amp] = typer.Option(None, "--amp", help="Mixed precision (default: off)."),
    device: Optional[str] = DEVICE_OPTION,
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader threads (default: 2)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Random seed (data order, augmentation, init) (default: 42)."
    ),
    eval_interval: Optional[int] = typer.Option(
        None, "--eval-interval", help="Evaluate every N epochs (default: 1)."
    ),
    log_interval: Optional[int] = typer.Option(
        None, "--log-interval", help="Log losses every N iterations (default: 10)."
    ),
    label_mapping: Optional[str] = typer.Option(
        None,
        "--label-mapping",
        help="compact (classes 0..K-1, default) or raw (category ids as classes, official COCO).",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Named settings bundle, e.g. tiny (options override it)."
    ),
    project: Path = typer.Option(Path("runs/train"), "--project", help="Parent folder of run directories."),
    name: str = typer.Option("exp", "--name", help="Run directory name (exp, exp2, ... when taken)."),
    exist_ok: bool = typer.Option(
        False, "--exist-ok", help="Reuse --project/--name instead of incrementing."
    ),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="[PATH]",
        help="Continue a run from PATH (last.pt); alone: the latest under --project.",
    ),
    max_pixels: Optional[int] = MAX_PIXELS_OPTION,
) -> None:
    result = train(
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_backbone=lr_backbone,
        lr_linear_proj_mult=lr_linear_proj_mult,
        weight_decay=weight_decay,
        lr_drop=lr_drop,
        clip_max_norm=clip_max_norm,
        variant=variant,
        backbone=backbone,
        pretrained_backbone=pretrained_backbone,
        weights=weights,
        hidden_dim=hidden_dim,
        nheads=nheads,
        enc_layers=enc_layers,
        dec_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        num_queries=num_queries,
        num_feature_levels=num_feature_levels,
        dropout=dropout,
        imgsz=imgsz,
        scales=parse_scales(scales),
        crop_prob=crop_prob,
        amp=amp,
        device=device,
        workers=workers,
        seed=seed,
        eval_interval=eval_interval,
        log_interval=log_interval,
        label_mapping=label_mapping,
        preset=preset,
        project=project,
        name=name,
        exist_ok=exist_ok,
        resume=resume,
        max_pixels=max_pixels,
    )
    if result.interrupted:
        raise typer.Exit(130)
