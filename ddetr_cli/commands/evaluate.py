"""`ddetr eval`: COCO box AP of a model, or of an existing results file, on a COCO-format split.

Python API:
    evaluate(weights="runs/train/exp/weights/best.pt", data="data/coco", split="val",
             out="metrics.json", save_detections="det.json") -> metrics dict
    evaluate(predictions="det.json", data="data/coco", split="val") -> metrics dict

metrics: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
(pycocotools' COCOeval.stats, in [0, 1], -1 where COCO gives -1) and "per_class" {name: AP}.
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.commands.options import AMP_OPTION, DEVICE_OPTION, INFERENCE_IMGSZ_OPTION
from ddetr_cli.console import UserError, console, debug, info, progress
from ddetr_cli.distributed import Amp

HELP = (
    "Evaluate a model, or an existing COCO results file, on a COCO-format split: the 12 COCO "
    "numbers (pycocotools COCOeval), per-class AP, metrics.json and optionally the detections."
)
EXAMPLES = [
    "ddetr eval --weights runs/train/exp/weights/best.pt --data data/coco --split val --out metrics.json",
    "ddetr eval --weights r50_deformable_detr.pth --data data/coco --save-detections det.json",
    "ddetr eval --predictions det.json --data data/coco --split val --out metrics.json",
    "torchrun --nproc_per_node 2 -m ddetr_cli.cli eval --weights best.pt --data data/coco",
]

DEFAULT_SIZE = 800
MAX_SIZE_RATIO = 1333 / 800  # the paper's longer-side cap relative to the shorter side


def image_sizes(imgsz: int) -> tuple[int, int]:
    """Shorter-side inference size -> (val_size, max_size) with the paper's 800:1333 ratio."""
    if imgsz < 32:
        raise UserError(f"--imgsz must be at least 32 pixels, got {imgsz}")
    return imgsz, round(imgsz * MAX_SIZE_RATIO)


def inference_size(weights: str | Path | None, imgsz: int | None) -> int:
    """--imgsz when given, else the size a ddetr checkpoint was trained for, else 800."""
    if imgsz is not None:
        return imgsz
    if weights is not None:
        from ddetr_cli.runs import checkpoint_meta

        size = checkpoint_meta(weights).get("imgsz")
        if isinstance(size, int):
            return size
    return DEFAULT_SIZE


def load_weights(weights: str | Path, device, num_classes: int | None = None):
    """load_model with path checks: a missing path is a user error, not a traceback."""
    from ddetr_cli.model import load_model

    path = Path(weights)
    if not path.exists():
        raise UserError(f"--weights: no such file or directory: {weights}")
    return load_model(path, device=device, num_classes=num_classes)


def class_to_category(config) -> list[int]:
    """Class index -> dataset category id (identity when the checkpoint has no mapping, as official COCO)."""
    if config.category_ids is not None:
        return [int(c) for c in config.category_ids]
    return list(range(config.num_classes))


def coco_detections(result: dict, image_id, category_ids: list[int], score_thr: float = 0.0) -> list[dict]:
    """One image's postprocess output (xyxy pixels) -> COCO results entries ([x, y, w, h] pixels).

    Boxes and scores are rounded (0.01 px, 1e-5) before anything is evaluated or saved, so a saved
    detections file evaluates to exactly the numbers reported with it.
    """
    scores = result["scores"].float().cpu().tolist()
    labels = result["labels"].cpu().tolist()
    boxes = result["boxes"].float().cpu().tolist()
    out = []
    for score, label, (x0, y0, x1, y1) in zip(scores, labels, boxes):
        if score < score_thr:
            continue
        entry = {} if image_id is None else {"image_id": int(image_id)}
        entry["category_id"] = category_ids[label] if label < len(category_ids) else int(label)
        entry["bbox"] = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        entry["score"] = round(score, 5)
        out.append(entry)
    return out


def model_detections(
    model, loader, ctx, amp: str = "off", topk: int = 100, description: str = "eval", bar=None
) -> list:
    """Run `model` over a val CocoLoader on every rank -> every image's COCO detections, on every rank.

    Images a rank saw twice (shards are padded to equal length) are counted once. `bar`: a live
    Rich progress to add a task to (only one live display can exist), else one is made.
    """
    import contextlib

    import torch

    from ddetr_cli.distributed import autocast, gather_lists
    from ddetr_cli.model import postprocess

    category_ids = class_to_category(_unwrap(model).config)
    per_image: list[tuple[int, list]] = []
    was_training = model.training
    model.eval()
    own_bar = progress(disable=not ctx.is_main) if bar is None else contextlib.nullcontext(bar)
    with torch.no_grad(), own_bar as bar:
        task = bar.add_task(description, total=len(loader), status="")
        for images, mask, targets in loader:
            images, mask = images.to(ctx.device, non_blocking=True), mask.to(ctx.device, non_blocking=True)
            with autocast(ctx.device, amp):
                outputs = model(images, mask)
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(ctx.device)
            results = postprocess(outputs, orig_sizes, topk=topk)
            for target, result in zip(targets, results):
                image_id = int(target["image_id"])
                per_image.append((image_id, coco_detections(result, image_id, category_ids)))
            bar.advance(task)
    model.train(was_training)
    seen, detections = set(), []
    for image_id, dets in gather_lists(per_image, ctx):
        if image_id not in seen:
            seen.add(image_id)
            detections.extend(dets)
    return detections


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def write_json(path: str | Path, obj) -> Path:
    from ddetr_cli.runs import atomic_write_text

    path = Path(path)
    try:
        return atomic_write_text(path, json.dumps(obj, indent=1))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e


def evaluate(
    weights: str | Path | None = None,
    data: str = "synthetic",
    split: str = "val",
    out: str | Path | None = "metrics.json",
    save_detections: str | Path | None = None,
    predictions: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 2,
    workers: int = 2,
    imgsz: int | None = None,
    amp: str = "off",
    topk: int = 100,
    show: bool = True,
) -> dict:
    """COCO-evaluate `weights` (or the results file `predictions`) on `data`'s `split`.

    Writes `out` (metrics JSON) and `save_detections` (COCO results) when given; returns the metrics.
    Under torchrun the images are sharded and the detections gathered; rank 0 writes.
    """
    from ddetr_cli import coco_eval
    from ddetr_cli.datasets import resolve_split

    if (weights is None) == (predictions is None):
        raise UserError("give exactly one of --weights (evaluate a model) or --predictions (a results file)")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if weights is not None and not Path(weights).exists():
        raise UserError(f"--weights: no such file or directory: {weights}")
    data_split = resolve_split(data, split)
    gt = coco_eval.load_ground_truth(data_split.annotation_file)

    if predictions is not None:
        detections = coco_eval.load_detections(predictions)
        detections = coco_eval.check_detections(detections, gt, str(predictions))
        is_main = True
    else:
        detections, is_main = _run_model(weights, data_split, device, batch_size, workers, imgsz, amp, topk)
        detections = coco_eval.check_detections(detections, gt, "model")
    if not is_main:
        return {}

    metrics = coco_eval.evaluate_detections(gt, detections)
    if data_split.class_names is not None:
        metrics["per_class"] = _rename_classes(metrics["per_class"], gt, data_split.class_names)
    if save_detections is not None and predictions is None:
        write_json(save_detections, detections)
        info(f"Detections: {save_detections} ({len(detections)})")
    if out is not None:
        write_json(out, metrics)
    if show:
        console.print(
            coco_eval.metrics_table(metrics, title=f"COCO bbox evaluation ({split}: {len(gt.imgs)} images)")
        )
        console.print(coco_eval.per_class_table(metrics["per_class"]))
        if out is not None:
            info(f"Metrics: {out}")
    return metrics


def _rename_classes(per_class: dict, gt, names: list[str]) -> dict:
    """Apply dataset.yaml `names:` (in category-id order) to the per-class table."""
    if len(names) != len(per_class):
        raise UserError(
            f"dataset.yaml has {len(names)} names but the annotation file {len(per_class)} categories"
        )
    return dict(zip(names, per_class.values()))


def _run_model(weights, data_split, device, batch_size, workers, imgsz, amp, topk):
    from ddetr_cli import distributed
    from ddetr_cli.data import CocoLoader

    ctx = distributed.setup(device)
    try:
        model = load_weights(weights, ctx.device)
        val_size, max_size = image_sizes(inference_size(weights, imgsz))
        debug(f"inference size {val_size} (max {max_size}), device {ctx.device}")
        loader = CocoLoader(
            str(data_split.images_dir),
            str(data_split.annotation_file),
            train=False,
            batch_size=batch_size,
            workers=workers,
            rank=ctx.rank,
            world_size=ctx.world_size,
            val_size=val_size,
            max_size=max_size,
        )
        detections = model_detections(model, loader, ctx, amp=amp, topk=topk)
        return detections, ctx.is_main
    finally:
        distributed.cleanup()


def command(
    weights: Optional[Path] = typer.Option(
        None, "--weights", "-w", help="Checkpoint: ddetr .pt, official .pth or Hugging Face folder."
    ),
    data: str = typer.Option(
        "synthetic", "--data", help="Dataset: COCO-layout ROOT folder, dataset.yaml, or 'synthetic'."
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
    )
