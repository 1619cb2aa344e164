"""COCO evaluation of a model, or of an existing results file (the engine behind `ddetr eval`).

Python API:
    evaluate(weights="runs/train/exp/weights/best.pt", data="data/coco", split="val",
             out="metrics.json", save_detections="det.json") -> metrics dict
    evaluate(predictions="det.json", data="data/coco", split="val") -> metrics dict

metrics: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
(pycocotools' COCOeval.stats, in [0, 1], -1 where COCO gives -1) and "per_class" {name: AP}.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ddetr_cli.console import UserError, console, debug, info, warn
from ddetr_cli.engine.inference import (
    DatasetDetections,
    class_to_category,
    dataset_detections,
    image_sizes,
    inference_size,
    load_detector,
    skipped_summary,
)
from ddetr_cli.runs import check_writable, write_json

if TYPE_CHECKING:
    from ddetr_cli.detections import Detections


def evaluate(
    weights: str | Path | None = None,
    data: str | None = None,
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
    backend: str | None = None,
    max_pixels: int | None = None,
    show: bool = True,
) -> dict:
    """COCO-evaluate `weights` (or the results file `predictions`) on `data`'s `split`.

    Writes `out` (metrics JSON) and `save_detections` (COCO results) when given; returns the metrics.
    Under torchrun the images are sharded and the detections gathered; rank 0 writes. `backend`:
    the COCO evaluator (`coco_eval.BACKENDS`; default hotcoco, same numbers as pycocotools).
    """
    from ddetr_cli import coco_eval
    from ddetr_cli.datasets import resolve_split

    if data is None:
        raise UserError("give --data: a COCO-layout ROOT folder, a dataset.yaml, or 'synthetic'")
    if (weights is None) == (predictions is None):
        raise UserError("give exactly one of --weights (evaluate a model) or --predictions (a results file)")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if weights is not None:
        from ddetr_cli.hub import resolve_weights

        weights = resolve_weights(weights)  # before the data is read: a wrong id fails at once
    for path, option in ((out, "--out"), (save_detections, "--save-detections")):
        if path is not None:
            check_writable(path, option)
    data_split = resolve_split(data, split)
    backend = backend or coco_eval.DEFAULT_BACKEND
    gt = coco_eval.load_ground_truth(data_split.annotation_file, backend)

    if predictions is not None:
        detections = coco_eval.load_detections(predictions, gt)
        metrics = coco_eval.evaluate_detections(gt, detections, backend)
        metrics.update(images=len(gt.imgs), skipped_images=0)
    else:
        loader_options = {"batch_size": batch_size, "workers": workers}
        if max_pixels is not None:
            loader_options["max_pixels"] = max_pixels
        run, is_main = _run_model(weights, data_split, gt, device, loader_options, imgsz, amp, topk)
        if not is_main:
            return {}
        detections, metrics = score_run(gt, run, data_split.annotation_file, backend)
    if data_split.class_names is not None:
        metrics["per_class"] = _rename_classes(metrics["per_class"], gt, data_split.class_names)
    if save_detections is not None and predictions is None:
        write_json(save_detections, detections.to_dicts())
        info(f"Detections: {save_detections} ({len(detections)})")
    if out is not None:
        write_json(out, metrics)
    if show:
        title = f"COCO bbox evaluation ({split}: {_seen(metrics)})"
        console.print(coco_eval.metrics_table(metrics, title=title))
        console.print(coco_eval.per_class_table(metrics["per_class"]))
        if out is not None:
            info(f"Metrics: {out}")
    return metrics


def score_run(
    gt, run: DatasetDetections, annotation_file, backend: str | None = None
) -> tuple[Detections, dict]:
    """A model's pass over a split -> (its checked detections, COCO metrics on the images it saw).

    Unreadable images are left out of the evaluation (their ground truth would count as missed),
    said in one warning and counted in the metrics ("images", "skipped_images"); a split of which
    no image could be read is a user error.
    """
    from ddetr_cli import coco_eval

    if run.skipped:
        warn(f"{annotation_file}: {skipped_summary(run.skipped, 'images')}; evaluated without them")
    if not run.image_ids:
        raise UserError(f"{annotation_file}: none of the {len(gt.imgs)} images could be read")
    detections = coco_eval.model_detections(run.detections, gt)
    seen = run.image_ids if run.skipped else None
    metrics = coco_eval.evaluate_detections(gt, detections, backend or coco_eval.DEFAULT_BACKEND, seen)
    metrics.update(images=len(run.image_ids), skipped_images=len(run.skipped))
    return detections, metrics


def _seen(metrics: dict) -> str:
    if metrics.get("skipped_images"):
        return f"{metrics['images']} images, {metrics['skipped_images']} unreadable skipped"
    return f"{metrics['images']} images"


def check_classes(config, gt, weights, annotation_file) -> None:
    """Refuse weights whose classes cannot name the split's categories: their AP would be about 0."""
    model_ids = set(class_to_category(config))
    gt_ids = set(gt.getCatIds())
    unknown = sorted(gt_ids - model_ids)
    if unknown:
        listed = ", ".join(str(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(
            f"{weights}: its {config.num_classes} classes do not cover the categories of {annotation_file} "
            f"({len(unknown)} of {len(gt_ids)} unknown to it: ids {listed}); its AP would be about 0. "
            "Fine-tune it on this data first: ddetr train --weights ..."
        )


def _rename_classes(per_class: dict, gt, names: list[str]) -> dict:
    """Apply dataset.yaml `names:` (in category-id order) to the per-class table."""
    if len(names) != len(per_class):
        raise UserError(
            f"dataset.yaml has {len(names)} names but the annotation file {len(per_class)} categories"
        )
    return dict(zip(names, per_class.values()))


def _run_model(weights, data_split, gt, device, loader_options: dict, imgsz, amp, topk):
    from ddetr_cli import distributed
    from ddetr_cli.data import CocoLoader

    ctx = distributed.setup(device)
    try:
        detector = load_detector(weights, ctx.device, amp)
        check_classes(detector.config, gt, weights, data_split.annotation_file)
        val_size, max_size = image_sizes(inference_size(weights, imgsz))
        debug(f"inference size {val_size} (max {max_size}), device {ctx.device}")
        loader = CocoLoader(
            str(data_split.images_dir),
            str(data_split.annotation_file),
            train=False,
            rank=ctx.rank,
            world_size=ctx.world_size,
            val_size=val_size,
            max_size=max_size,
            on_bad_image="skip",
            **loader_options,
        )
        return dataset_detections(detector, loader, ctx, topk=topk), ctx.is_main
    finally:
        distributed.cleanup()
