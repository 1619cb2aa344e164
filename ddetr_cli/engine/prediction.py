"""Detections for image files, folders (recursive) and globs (the engine behind `ddetr predict`).

Python API:
    predict(["images/", "more/*.jpg"], weights="best.pt", out="results.json",
            ann="instances_val.json", save_vis="vis/", score_thr=0.3) -> list of detections

Each detection is a COCO results entry plus names: {"image_id" (when --ann lists the file),
"file_name", "category_id", "category_name", "bbox": [x, y, w, h] pixels, "score"}.
"""

from __future__ import annotations

import glob
from pathlib import Path

from ddetr_cli.annotations import validate_ground_truth
from ddetr_cli.console import UserError, debug, info, progress, warn
from ddetr_cli.engine.inference import (
    class_to_category,
    coco_detections,
    image_sizes,
    inference_size,
    load_detector,
    skipped_summary,
)
from ddetr_cli.model.coco_classes import COCO_CATEGORY_NAMES
from ddetr_cli.runs import check_writable, write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jpe"}
GLOB_CHARS = set("*?[")


def expand_sources(sources: list[str]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Files, folders (recursive) and globs -> ([(image path, name relative to its source)], skipped).

    A source that matches nothing is a UserError; files that are not images are returned in
    `skipped` with the reason.
    """
    found: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    for source in sources:
        if any(c in GLOB_CHARS for c in source) and not Path(source).exists():
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise UserError(f"no files match {source}")
            for match in matches:
                _add_path(Path(match), found, skipped, explicit=False)
            continue
        path = Path(source)
        if not path.exists():
            raise UserError(f"no such file or directory: {source}")
        _add_path(path, found, skipped, explicit=True)
    unique, seen = [], set()
    for path, name in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, name))
    return unique, skipped


def _add_path(path: Path, found: list, skipped: list, explicit: bool) -> None:
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images and explicit:
            raise UserError(f"no images found in {path}")
        found.extend((p, p.relative_to(path).as_posix()) for p in images)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        found.append((path, path.name))
    elif explicit:
        skipped.append((str(path), "not an image file"))


def annotation_index(ann: str | Path) -> tuple[dict, dict]:
    """--ann -> ({file name or base name: image_id}, {category id: name})."""
    dataset = validate_ground_truth(ann)
    by_name: dict = {}
    base_counts: dict = {}
    for image in dataset["images"]:
        by_name[str(image["file_name"])] = image["id"]
        base = Path(str(image["file_name"])).name
        base_counts[base] = base_counts.get(base, 0) + 1
    for image in dataset["images"]:
        base = Path(str(image["file_name"])).name
        if base_counts[base] == 1:
            by_name.setdefault(base, image["id"])
    names = {c["id"]: str(c.get("name", c["id"])) for c in dataset["categories"]}
    return by_name, names


def category_names(config, ann_names: dict) -> dict:
    """{category id: display name}: the checkpoint's class names, else the annotation file's,
    else COCO's for an official 91-class model."""
    ids = class_to_category(config)
    names = {}
    if config.num_classes == 91 and config.category_ids is None:
        names.update(COCO_CATEGORY_NAMES)
    names.update(ann_names)
    if config.class_names is not None:
        for cid, name in zip(ids, config.class_names):
            names[cid] = str(name)
    return names


def predict(
    sources: list[str],
    weights: str | Path,
    out: str | Path | None = "results.json",
    ann: str | Path | None = None,
    save_vis: str | Path | None = None,
    score_thr: float = 0.3,
    topk: int = 100,
    batch_size: int = 1,
    workers: int = 2,
    device: str | None = None,
    imgsz: int | None = None,
    amp: str = "off",
    max_pixels: int | None = None,
) -> list[dict]:
    """Run `weights` on every image under `sources`; write `out` (and pictures to `save_vis`)."""
    if not sources:
        raise UserError("give at least one image file, folder or glob")
    if not 0.0 <= score_thr <= 1.0:
        raise UserError(f"--score-thr must be in [0, 1], got {score_thr}")
    if out is not None:
        check_writable(out, "--out")
    if save_vis is not None:
        check_writable(Path(save_vis) / "probe.jpg", "--save-vis")
    images, skipped = expand_sources([str(s) for s in sources])
    for path, reason in skipped:
        warn(f"skipped {path}: {reason}")
    if not images:
        raise UserError("no images to predict on: " + ", ".join(str(s) for s in sources))
    id_by_name, ann_names = annotation_index(ann) if ann is not None else ({}, {})

    import torch

    from ddetr_cli.data import ImageListLoader
    from ddetr_cli.distributed import resolve_device

    dev = resolve_device(device)
    detector = load_detector(weights, dev, amp)
    config = detector.config
    category_ids = class_to_category(config)
    names = category_names(config, ann_names)
    val_size, max_size = image_sizes(inference_size(weights, imgsz))
    debug(f"{len(images)} images, inference size {val_size} (max {max_size}), device {dev}")
    name_of = {str(path): name for path, name in images}
    loader = ImageListLoader(
        [str(p) for p, _ in images],
        batch_size=batch_size,
        workers=workers,
        val_size=val_size,
        max_size=max_size,
        **({} if max_pixels is None else {"max_pixels": max_pixels}),
    )

    results: list[dict] = []
    vis_dir = Path(save_vis) if save_vis is not None else None
    n_done = 0
    with progress() as bar:
        task = bar.add_task("predict", total=len(images), status="")
        for batch, mask, infos in loader:
            orig_sizes = torch.stack([torch.as_tensor(i["orig_size"]) for i in infos]).to(dev)
            for info_, result in zip(infos, detector(batch.to(dev), mask.to(dev), orig_sizes, topk=topk)):
                path = str(info_["path"])
                rel = name_of.get(path, Path(path).name)
                image_id = id_by_name.get(rel, id_by_name.get(Path(path).name))
                dets = coco_detections(result, image_id, category_ids, score_thr=score_thr)
                for det in dets:
                    det["file_name"] = path
                    det["category_name"] = names.get(det["category_id"], str(det["category_id"]))
                results.extend(_ordered(d) for d in dets)
                if vis_dir is not None:
                    _save_visualisation(path, rel, dets, vis_dir)
                n_done += 1
            bar.advance(task, len(infos))
    if loader.skipped:
        warn(skipped_summary(loader.skipped, "images"))
    if n_done == 0:
        raise UserError("none of the images could be read")
    if out is not None:
        write_json(out, results)
    info(
        f"{len(results)} detections in {n_done} images"
        + (f" -> {out}" if out is not None else "")
        + (f"; pictures in {vis_dir}" if vis_dir is not None else "")
    )
    return results


def _ordered(det: dict) -> dict:
    keys = ("image_id", "file_name", "category_id", "category_name", "bbox", "score")
    return {k: det[k] for k in keys if k in det}


def _save_visualisation(path: str, rel: str, dets: list[dict], vis_dir: Path) -> None:
    import cv2

    from ddetr_cli.plots import draw_detections, read_image_raw

    image = read_image_raw(path)  # the pixels the model saw: EXIF orientation ignored, as the loader
    if image is None:  # decoded by the loader but not by OpenCV (rare formats): no picture
        warn(f"cannot draw on {path}: OpenCV cannot read it")
        return
    target = vis_dir / rel
    if target.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp"):
        target = target.with_suffix(".jpg")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(target), draw_detections(image, dets)):
        raise OSError(f"cannot write {target}")
