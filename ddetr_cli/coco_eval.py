"""COCO box evaluation with a choice of evaluator, quiet, with validated inputs.

Backends (`BACKENDS`), all giving pycocotools' numbers (a test holds them equal to 1e-9):
- "hotcoco" (default): hotcoco's `COCO` / `COCOeval`, pycocotools' algorithm in Rust, indexing
  and results loading included (about 30x pycocotools' evaluation at 5,000 images); it gets the
  detections as one [N, 7] array. Its `COCO` hands out copies: `dataset`, `imgs`, `cats` are
  rebuilt on every access, so read them once.
- "faster": faster-coco-eval's COCOeval_faster (matching and accumulation in C++; pycocotools' own
  Python index). Its summarize() gives 14 stats, pycocotools' 12 then AR at IoU .50 and .75.
- "pycocotools": the reference `COCOeval`, kept as the oracle.
The three copy pycocotools' API: `COCO` (imgs, cats, getImgIds, getCatIds, loadRes) and a COCOeval
with params (imgIds, catIds), evaluate/accumulate/summarize, `stats` and `eval["precision"]`
[T, R, K, A, M].

Detections are `detections.Detections` columns, read and checked from a results file by ddetr's
Rust reader (`load_detections`) or made from a model's result dicts (`model_detections`).

The 12 numbers are exactly `COCOeval.stats[:12]` (AP at IoU .50:.95, .50, .75, small/medium/large,
then AR at 1/10/100 detections and small/medium/large), in [0, 1], -1 where COCO has nothing to
score. Per-class AP is the mean of the precision array over IoU thresholds and recall points for
one category (area "all", 100 detections), as detectron2 reports it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from ddetr_cli.annotations import gc_paused, validate_ground_truth
from ddetr_cli.console import UserError, warn
from ddetr_cli.detections import Detections, model_columns, read_detections

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("hotcoco", "faster", "pycocotools")
DEFAULT_BACKEND = "hotcoco"


def _api(backend: str):
    """(COCO class, COCOeval factory) of `backend`."""
    if backend == "hotcoco":
        import hotcoco

        return hotcoco.COCO, lambda gt, dt: hotcoco.COCOeval(gt, dt, "bbox")
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        def make_eval(gt, dt):
            return COCOeval_faster(gt, dt, iouType="bbox", print_function=_silent)

        return COCO, make_eval
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda gt, dt: COCOeval(gt, dt, iouType="bbox")
    raise UserError(f"unknown evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _silent(*args, **kwargs) -> None:
    pass


def index_ground_truth(dataset: dict, backend: str = DEFAULT_BACKEND):
    """A `COCO` object of `backend`'s library over an already validated COCO dict (faster-coco-eval's
    where hotcoco cannot take the ids, see `backend_for`)."""
    backend = backend_for(dataset, backend)
    coco_class, _ = _api(backend)
    coco = coco_class()
    coco.dataset = _hotcoco_dataset(dataset) if backend == "hotcoco" else dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_ground_truth(annotation_file: str | Path, backend: str = DEFAULT_BACKEND):
    """A `COCO` object (of `backend`'s library) for `annotation_file`, validated and cleaned by
    `annotations.validate_ground_truth`, or a UserError naming the file and the bad entry."""
    dataset = validate_ground_truth(annotation_file)
    if backend_for(dataset, backend) != backend:
        warn(
            f"{annotation_file}: negative image or category ids, which hotcoco cannot take; evaluated "
            "with faster-coco-eval (same numbers)"
        )
    return index_ground_truth(dataset, backend)


def backend_for(dataset: dict, backend: str) -> str:
    """`backend`, or "faster" for "hotcoco" when an image or category id is negative: hotcoco takes
    ids >= 0 only, pycocotools (and ddetr's validator) any integer."""
    if backend == "hotcoco" and any(e["id"] < 0 for key in ("images", "categories") for e in dataset[key]):
        return "faster"
    return backend


def _hotcoco_dataset(dataset: dict) -> dict:
    """The part of a validated COCO dict that box evaluation reads, in the form hotcoco takes.

    hotcoco parses every field it knows with strict types, so a `width` or `segmentation` that
    pycocotools never reads could make it refuse a file; it wants annotation ids >= 0 (renumbered
    1..N in file order: COCOeval uses them only as match markers); it names a nameless category
    `cat_<id>` with a message on stderr where pycocotools users see the id.
    """
    return {
        "images": [{"id": image["id"]} for image in dataset["images"]],
        "categories": [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in dataset["categories"]],
        "annotations": [
            {
                "id": i,
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "area": a["area"],
                "iscrowd": a["iscrowd"],
            }
            for i, a in enumerate(dataset.get("annotations", []), 1)
        ],
    }


def load_detections(path: str | Path, gt) -> Detections:
    """The COCO results file `path` checked against the ground truth `gt` by the Rust reader.

    A malformed entry or an image id that is not in the ground truth is a UserError naming the file
    and the entry. Detections of categories the ground truth does not have are dropped (said once),
    as COCOeval ignores them.
    """
    return _scored(read_detections(path, gt.getImgIds()), gt, str(path))


def model_detections(entries: list[dict], gt) -> Detections:
    """A model's COCO results entries as columns (`detections.model_columns`), without the
    categories `gt` lacks (quietly: an official 91-class COCO model can predict the unused ids)."""
    return _scored(model_columns(entries), gt, "model")


def _scored(detections: Detections, gt, source: str) -> Detections:
    """`detections` without those whose category `gt` lacks (said once, unless `source` is "model")."""
    keep = np.isin(detections.category_id, np.asarray(gt.getCatIds(), dtype=np.float64))
    dropped = len(keep) - int(keep.sum())
    if dropped and source != "model":
        warn(f"{source}: {dropped} detections have category ids not in the ground truth; ignored")
    return detections if not dropped else detections.select(keep)


def per_class_ap(coco_eval) -> dict:
    """{category id: AP} from an accumulated COCOeval (-1 for a category without ground truth)."""
    precision = coco_eval.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M max-dets]
    result = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        result[int(cat_id)] = float(p.mean()) if p.size else -1.0
    return result


def evaluate_detections(
    gt, detections: Detections, backend: str = DEFAULT_BACKEND, image_ids: list[int] | None = None
) -> dict:
    """COCO bbox evaluation -> {"AP", ..., "ARl", "per_class": {class name: AP}}.

    `gt` comes from `load_ground_truth` (with any backend: it is re-indexed when the library
    differs); `detections` come from `load_detections` or `model_detections`.
    `image_ids`: evaluate only these images (those a model actually saw), default all of them.
    """
    gt, backend = _index_for(gt, backend)
    coco_class, make_eval = _api(backend)
    with gc_paused(), contextlib.redirect_stdout(io.StringIO()):
        if backend == "hotcoco":
            dt = gt.loadRes(detections.rows())  # an array: no Python object per detection
        elif backend == "pycocotools" and len(detections):
            dt = gt.loadRes(detections.to_dicts())  # the oracle, run the documented way
        else:
            dt = _index_results(gt, coco_class, detections)
        coco_eval = make_eval(gt, dt)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)}
    metrics["per_class"] = class_name_keys(gt, per_class_ap(coco_eval))
    return metrics


def _index_for(gt, backend: str) -> tuple:
    """(`gt` as an index of the library that evaluates it, that backend): `backend`'s, or
    faster-coco-eval's where hotcoco cannot take the ids (then `gt` is used as it is when it is
    already faster-coco-eval's: training evaluates every epoch against one index)."""
    if isinstance(gt, _api(backend)[0]):
        return gt, backend
    dataset = gt.dataset  # hotcoco builds a copy on every access
    backend = backend_for(dataset, backend)
    if isinstance(gt, _api(backend)[0]):
        return gt, backend
    return index_ground_truth(dataset, backend), backend


def _index_results(gt, coco_class, detections: Detections):
    """The result `COCO` that `gt.loadRes(detections)` makes for boxes (ids 1..N, area w * h,
    iscrowd 0), without the polygon per box that bbox evaluation never reads; it also takes an
    empty list, which pycocotools' loadRes cannot (an empty result scores 0 where there is ground
    truth)."""
    annotations = [
        {**d, "id": i, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
        for i, d in enumerate(detections.to_dicts(), 1)
    ]
    dt = coco_class()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"]}
    dt.dataset["annotations"] = annotations
    dt.createIndex()
    return dt


def class_name_keys(gt, by_category_id: dict) -> dict:
    """Re-key {category id: value} by category name (name + id where two categories share a name)."""
    cats = gt.cats  # read once: hotcoco builds a new dict on every access
    names = {cid: str(cats[cid].get("name", cid)) for cid in by_category_id}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {
        (names[cid] if counts[names[cid]] == 1 else f"{names[cid]} ({cid})"): value
        for cid, value in by_category_id.items()
    }


def metrics_table(metrics: dict, title: str = "COCO bbox evaluation"):
    """A Rich table of the 12 numbers."""
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    descriptions = {
        "AP": "AP @[IoU=0.50:0.95]",
        "AP50": "AP @[IoU=0.50]",
        "AP75": "AP @[IoU=0.75]",
        "APs": "AP small",
        "APm": "AP medium",
        "APl": "AP large",
        "AR1": "AR @1 det",
        "AR10": "AR @10 dets",
        "AR100": "AR @100 dets",
        "ARs": "AR small",
        "ARm": "AR medium",
        "ARl": "AR large",
    }
    for name in STAT_NAMES:
        value = metrics[name]
        table.add_row(f"{name:6s} {descriptions[name]}", "-" if value < 0 else f"{value:.4f}")
    return table


def per_class_table(per_class: dict):
    from rich.table import Table

    table = Table(title="Per-class AP", show_header=True, header_style="bold")
    table.add_column("class")
    table.add_column("AP", justify="right")
    for name, value in per_class.items():
        table.add_row(name, "-" if value < 0 else f"{value:.4f}")
    return table
