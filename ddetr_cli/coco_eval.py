"""COCO box evaluation with a choice of evaluator, quiet, with validated inputs.

Backends (`BACKENDS`), all giving pycocotools' numbers (a test holds them equal to 1e-9):
- "hotcoco" (default): hotcoco's `COCO` / `COCOeval`, pycocotools' algorithm in Rust, indexing
  and results loading included (about 40x pycocotools' evaluation at 5,000 images). Its `COCO`
  hands out copies: `dataset`, `imgs`, `cats` are rebuilt on every access, so read them once.
- "faster": faster-coco-eval's COCOeval_faster (matching and accumulation in C++; pycocotools' own
  Python index). Its summarize() gives 14 stats, pycocotools' 12 then AR at IoU .50 and .75.
- "pycocotools": the reference `COCOeval`, kept as the oracle.
The three copy pycocotools' API: `COCO` (imgs, cats, getImgIds, getCatIds, loadRes) and a COCOeval
with params (imgIds, catIds), evaluate/accumulate/summarize, `stats` and `eval["precision"]`
[T, R, K, A, M].

The 12 numbers are exactly `COCOeval.stats[:12]` (AP at IoU .50:.95, .50, .75, small/medium/large,
then AR at 1/10/100 detections and small/medium/large), in [0, 1], -1 where COCO has nothing to
score. Per-class AP is the mean of the precision array over IoU thresholds and recall points for
one category (area "all", 100 detections), as detectron2 reports it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
from pathlib import Path

import numpy as np

from ddetr_cli.annotations import gc_paused, read_json, validate_ground_truth
from ddetr_cli.console import UserError, warn

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("hotcoco", "faster", "pycocotools")
DEFAULT_BACKEND = "hotcoco"
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")  # what box evaluation reads of a result


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


def load_detections(path: str | Path) -> list:
    """A COCO results file (a JSON list of detections), or a UserError."""
    path = Path(path)
    detections = read_json(path, "predictions file")
    if not isinstance(detections, list):
        raise UserError(f"{path}: a COCO results file must be a JSON list of detections")
    return detections


def _is_number(x) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float64
        return False


def check_detections(detections: list, gt, source: str) -> list:
    """Validate COCO results against the ground truth; returns those whose category is scored.

    A malformed entry or an image id that is not in the ground truth is a UserError naming the
    entry. Detections of categories the ground truth does not have are dropped, as COCOeval
    ignores them (an official 91-class COCO model can predict the unused ids).
    """
    image_ids = set(gt.getImgIds())
    if not _all_well_formed(detections, image_ids):
        for i, det in enumerate(detections):
            _check_detection(i, det, image_ids, source)
    category_ids = set(gt.getCatIds())
    kept = [det for det in detections if det["category_id"] in category_ids]
    if len(kept) < len(detections) and source != "model":
        warn(
            f"{source}: {len(detections) - len(kept)} detections have category ids not in the ground truth; "
            "ignored"
        )
    return kept


def _check_detection(i: int, det, image_ids: set, source: str) -> None:
    """A UserError naming detection `i` of `source` if it is malformed."""
    if not isinstance(det, dict):
        raise UserError(f"{source}: detection {i} is not an object")
    for key in RESULT_KEYS:
        if key not in det:
            raise UserError(f"{source}: detection {i} has no '{key}'")
    if not isinstance(det["image_id"], int) or isinstance(det["image_id"], bool):
        raise UserError(f"{source}: detection {i}: image_id must be an integer")
    if det["image_id"] not in image_ids:
        raise UserError(
            f"{source}: detection {i}: image_id {det['image_id']} is not an image of the ground truth"
        )
    if not isinstance(det["category_id"], (int, float)) or isinstance(det["category_id"], bool):
        raise UserError(f"{source}: detection {i}: category_id must be an integer")
    bbox = det["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise UserError(f"{source}: detection {i}: bbox must be [x, y, width, height] numbers")
    if bbox[2] < 0 or bbox[3] < 0:
        raise UserError(f"{source}: detection {i}: bbox has a negative width or height")
    if not _is_number(det["score"]):
        raise UserError(f"{source}: detection {i}: score must be a finite number")


def _all_well_formed(detections: list, image_ids: set) -> bool:
    """True when no detection would fail `_check_detection`, decided column by column in loops that
    run in C (a third of the time of checking 500,000 detections one by one); False means
    "maybe not": then each is checked, and the first bad one named."""
    try:
        image, category, bbox, score = ([det[key] for det in detections] for key in RESULT_KEYS)
    except (TypeError, KeyError):  # not an object, or a key missing
        return False
    if not (set(map(type, image)) <= {int} and set(image) <= image_ids):
        return False
    if not (set(map(type, category)) <= {int, float} and set(map(type, bbox)) <= {list}):
        return False
    numbers = [*itertools.chain.from_iterable(bbox), *score]
    if set(map(len, bbox)) - {4} or not set(map(type, numbers)) <= {int, float}:
        return False
    try:
        values = np.array(numbers, dtype=np.float64)
    except OverflowError:
        return False
    sizes = values[: 4 * len(bbox)].reshape(-1, 4)[:, 2:]
    return bool(np.isfinite(values).all() and (sizes >= 0).all())


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
    gt, detections: list, backend: str = DEFAULT_BACKEND, image_ids: list[int] | None = None
) -> dict:
    """COCO bbox evaluation -> {"AP", ..., "ARl", "per_class": {class name: AP}}.

    `gt` comes from `load_ground_truth` (with any backend: it is re-indexed when the library
    differs); `detections` must already have passed `check_detections` and are not modified.
    `image_ids`: evaluate only these images (those a model actually saw), default all of them.
    """
    gt, backend = _index_for(gt, backend)
    coco_class, make_eval = _api(backend)
    with gc_paused(), contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools" and detections:
            dt = gt.loadRes([dict(d) for d in detections])  # the oracle, run the documented way
        elif backend == "hotcoco":
            dt = gt.loadRes(_four_fields(detections))  # in Rust; leaves the dicts as they are, takes []
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


def _four_fields(detections: list) -> list:
    """`detections` with only `RESULT_KEYS`: hotcoco parses every field it knows with strict types,
    also those that box evaluation overwrites (`id`, `area`, `iscrowd`) or never reads (a mask's
    `segmentation`), so such a field can make it refuse a results file pycocotools takes."""
    if all(len(det) == len(RESULT_KEYS) for det in detections):  # already, as ddetr writes them
        return detections
    return [{key: det[key] for key in RESULT_KEYS} for det in detections]


def _index_results(gt, coco_class, detections: list):
    """The result `COCO` that `gt.loadRes(detections)` makes for boxes (ids 1..N, area w * h,
    iscrowd 0), without the polygon per box that bbox evaluation never reads; it also takes an
    empty list, which pycocotools' loadRes cannot (an empty result scores 0 where there is ground
    truth)."""
    annotations = [
        {
            "id": i,
            "image_id": d["image_id"],
            "category_id": d["category_id"],
            "bbox": d["bbox"],
            "score": d["score"],
            "area": d["bbox"][2] * d["bbox"][3],
            "iscrowd": 0,
        }
        for i, d in enumerate(detections, 1)
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
