"""`ddetr data check`: what training would make of a dataset, before a GPU-hour is spent on it.

Python API:
    report = check_dataset("data/coco", splits="all")   # -> {"splits": {name: SplitReport dict}, "ok"}

Each split is read with the validation training uses (`annotations.validate_ground_truth`, the
same verdict as the Rust loader) and every image header is opened (in Rust, in parallel, no pixels
decoded): counts, classes, boxes that training drops or clips, and files it would skip.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddetr_cli.console import UserError

SPLITS = ("train", "val")
FIRST = 5  # file names listed per problem


@dataclass
class SplitReport:
    split: str
    annotation_file: str
    images_dir: str
    images: int = 0
    annotations: int = 0
    classes: dict[str, int] = field(default_factory=dict)  # name -> boxes
    images_without_boxes: int = 0
    crowd_boxes: int = 0
    degenerate_boxes: int = 0  # width or height <= 0: training drops them
    boxes_outside_image: int = 0  # reaching past the image: training clips them
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), first FIRST
    unreadable_count: int = 0
    width: dict[str, float] = field(default_factory=dict)  # min / median / max
    height: dict[str, float] = field(default_factory=dict)
    aspect: dict[str, float] = field(default_factory=dict)  # width / height
    problems: list[str] = field(default_factory=list)  # what would make training fail

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(data: str, splits: str = "all", max_pixels: int | None = None, workers: int | None = None):
    """Check `data`'s splits ("train", "val" or "all" = those that exist) -> report dict."""
    from ddetr_cli.datasets import has_split, resolve_split

    if splits not in (*SPLITS, "all"):
        raise UserError(f"--split must be train, val or all, got {splits!r}")
    names = [s for s in SPLITS if has_split(data, s)] if splits == "all" else [splits]
    if not names:
        raise UserError(f"{data}: no train or val split found")
    reports = [check_split(resolve_split(data, name), max_pixels, workers) for name in names]
    return {
        "data": str(data),
        "ok": all(r.ok for r in reports),
        "splits": {r.split: _plain(r) for r in reports},
    }


def check_split(split, max_pixels: int | None = None, workers: int | None = None) -> SplitReport:
    """One split: annotation verdict, box statistics and every image header."""
    from ddetr_cli.annotations import validate_ground_truth

    report = SplitReport(split.split, str(split.annotation_file), str(split.images_dir))
    try:
        dataset = validate_ground_truth(split.annotation_file)
    except UserError as e:  # the validator's one-line verdict is the report
        report.problems.append(str(e))
        return report
    images = dataset["images"]
    report.images, report.annotations = len(images), len(dataset["annotations"])
    _count_boxes(report, dataset)
    headers = _scan(split.images_dir, images, max_pixels, workers)
    unreadable = [(image["file_name"], h.error) for image, h in zip(images, headers) if h.error]
    report.unreadable, report.unreadable_count = unreadable[:FIRST], len(unreadable)
    sizes = [(h.width, h.height) for h in headers if not h.error and h.width and h.height]
    if sizes:
        report.width = _spread([w for w, _ in sizes])
        report.height = _spread([h for _, h in sizes])
        report.aspect = _spread([w / h for w, h in sizes])
    if images and len(unreadable) == len(images):
        report.problems.append(f"none of the {len(images)} images can be read")
    if not images:
        report.problems.append("no images")
    return report


def _count_boxes(report: SplitReport, dataset: dict) -> None:
    names = {c["id"]: str(c.get("name", c["id"])) for c in dataset["categories"]}
    report.classes = dict.fromkeys(names.values(), 0)
    size = {im["id"]: (im.get("width"), im.get("height")) for im in dataset["images"]}
    with_boxes = set()
    for ann in dataset["annotations"]:
        report.classes[names[ann["category_id"]]] += 1
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0):
            report.crowd_boxes += 1
        if w <= 0 or h <= 0:
            report.degenerate_boxes += 1
            continue
        with_boxes.add(ann["image_id"])
        width, height = size[ann["image_id"]]
        if x < 0 or y < 0 or (width and x + w > width) or (height and y + h > height):
            report.boxes_outside_image += 1
    report.images_without_boxes = len(size) - len(with_boxes & set(size))


def _scan(images_dir, images: list[dict], max_pixels: int | None, workers: int | None) -> list:
    from ddetr_cli.data import DEFAULT_MAX_PIXELS, scan_images

    paths = [Path(images_dir) / image["file_name"] for image in images]
    return scan_images(paths, max_pixels or DEFAULT_MAX_PIXELS, workers)


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _plain(report: SplitReport) -> dict:
    return {**asdict(report), "unreadable": [list(u) for u in report.unreadable], "ok": report.ok}
