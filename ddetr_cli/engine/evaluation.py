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

from ddetr_cli.console import UserError, console, debug, info
from ddetr_cli.engine.inference import dataset_detections, image_sizes, inference_size, load_detector
from ddetr_cli.runs import write_json


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
    if weights is not None:
        from ddetr_cli.hub import resolve_weights

        weights = resolve_weights(weights)  # before the data is read: a wrong id fails at once
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
        detector = load_detector(weights, ctx.device, amp)
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
        detections = dataset_detections(detector, loader, ctx, topk=topk)
        return detections, ctx.is_main
    finally:
        distributed.cleanup()
