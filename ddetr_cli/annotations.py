"""Ground-truth validation: one check of a COCO annotation file before any work is done on it.

`validate_ground_truth(path)` returns the parsed file, cleaned, or raises a one-line UserError naming
the file and the first offending entry, e.g.

    val.json: annotations[17] (id 42): bbox must be 4 numbers [x, y, width, height], got [1, 2, 3]

Rules (the Rust loader, `rust_loader/src/coco.rs`, gives the same verdict on every file):
- the file is an object with an "images" list and a "categories" list; "annotations" is optional;
- images: object with an integer `id` (unique) and a `file_name` that is a relative path inside
  the images folder (no absolute path, no `..`);
- categories: object with an integer `id` (unique), an optional string `name`;
- annotations: object with integer `image_id` and `category_id` that name a listed image and
  category, and `bbox` = 4 finite numbers [x, y, w, h] with w, h >= 0. Optional: an integer `id`
  (unique), `iscrowd` (0/1 or a boolean), `area` (a finite number >= 0).
Integers are JSON integers in the int64 range (not booleans, not 1.0).

Cleaning (what converted datasets often lack, filled the way pycocotools users expect):
- missing `area` -> the box area w * h. COCO's own `area` is the segmentation mask's area; without
  a mask the box is the only area there is, and it is what `COCO.loadRes` gives detections. It
  decides the small/medium/large buckets (32^2, 96^2).
- missing `iscrowd` -> 0; booleans -> 0/1.
- annotation ids: COCOeval stores the matched ground-truth id as its match marker, where 0 means
  "unmatched", so an annotation with id 0 could never count as found. When any id is missing or 0,
  all annotations are renumbered 1..N in file order (nothing refers to ground-truth ids).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from pathlib import Path

from ddetr_cli.console import UserError

_INT64 = (-(2**63), 2**63 - 1)
_SINGULAR = {"images": "image", "categories": "category", "annotations": "annotation"}


def read_json(path: Path, what: str):
    """The parsed JSON of `path`, or a UserError naming the file (`what`: "annotation file", ...)
    and the problem."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with gc_paused(), open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e


@contextlib.contextmanager
def gc_paused():
    """Pauses the cyclic garbage collector: building millions of containers that are not garbage
    (a parsed JSON file, COCOeval's per-detection dicts) would make it rescan them again and
    again (about half of `json.load`'s time on a 500,000-detection results file)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def validate_ground_truth(path: str | Path) -> dict:
    """The COCO dict of annotation file `path`, validated and cleaned (see the module doc)."""
    path = Path(path)
    return validate_coco(read_json(path, "annotation file"), str(path))


def validate_coco(dataset, source: str) -> dict:
    """Validates and cleans a parsed COCO dict in place; `source` names it in errors."""
    if not isinstance(dataset, dict):
        raise UserError(f"{source}: not a COCO annotation file (the top level must be an object)")
    for key in ("images", "categories"):
        if key not in dataset:
            raise UserError(f"{source}: not a COCO annotation file (no '{key}' list)")
    dataset.setdefault("annotations", [])
    for key in ("images", "categories", "annotations"):
        if not isinstance(dataset[key], list):
            raise UserError(f"{source}: '{key}' must be a list, got {_show(dataset[key])}")
    image_ids = _check_images(dataset["images"], source)
    category_ids = _check_categories(dataset["categories"], source)
    _check_annotations(dataset["annotations"], image_ids, category_ids, source)
    return dataset


def is_safe_relative_path(file_name: str) -> bool:
    """True for a plain relative path that stays inside the images folder (as the Rust loader)."""
    return (
        file_name != ""
        and not file_name.startswith(("/", "\\"))
        and ".." not in file_name.replace("\\", "/").split("/")
    )


def _check_images(images: list, source: str) -> set:
    ids: dict[int, int] = {}
    for i, image in enumerate(images):
        where = _entry("images", i, image)
        _require_object(image, where, source)
        image_id = _require_int(image, "id", where, source)
        file_name = image.get("file_name")
        if not isinstance(file_name, str):
            _fail(source, where, f"file_name must be a string, got {_show(file_name)}")
        if not is_safe_relative_path(file_name):
            _fail(source, where, f"unsafe file_name {file_name!r} (absolute paths and '..' are rejected)")
        _require_new(ids, image_id, i, "images", where, source)
    return set(ids)


def _check_categories(categories: list, source: str) -> set:
    ids: dict[int, int] = {}
    for i, category in enumerate(categories):
        where = _entry("categories", i, category)
        _require_object(category, where, source)
        category_id = _require_int(category, "id", where, source)
        if "name" in category and not isinstance(category["name"], str):
            _fail(source, where, f"name must be a string, got {_show(category['name'])}")
        _require_new(ids, category_id, i, "categories", where, source)
    return set(ids)


def _check_annotations(annotations: list, image_ids: set, category_ids: set, source: str) -> None:
    ids: dict[int, int] = {}
    renumber = False
    for i, ann in enumerate(annotations):
        where = _entry("annotations", i, ann)
        _require_object(ann, where, source)
        if "id" in ann:
            ann_id = _require_int(ann, "id", where, source)
            _require_new(ids, ann_id, i, "annotations", where, source)
            renumber = renumber or ann_id == 0
        else:
            renumber = True
        if _require_int(ann, "image_id", where, source) not in image_ids:
            _fail(source, where, f"image_id {ann['image_id']} is not in 'images'")
        if _require_int(ann, "category_id", where, source) not in category_ids:
            _fail(source, where, f"category_id {ann['category_id']} is not in 'categories'")
        _check_box(ann, where, source)
        _clean_crowd_and_area(ann, where, source)
    if renumber:
        for i, ann in enumerate(annotations):
            ann["id"] = i + 1


def _check_box(ann: dict, where: str, source: str) -> None:
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        _fail(source, where, f"bbox must be 4 numbers [x, y, width, height], got {_show(box)}")
    if box[2] < 0 or box[3] < 0:
        _fail(source, where, f"bbox has a negative width or height: {_show(box)}")


def _clean_crowd_and_area(ann: dict, where: str, source: str) -> None:
    crowd = ann.get("iscrowd", 0)
    if not (type(crowd) is bool or _is_int(crowd)):
        _fail(source, where, f"iscrowd must be 0, 1 or a boolean, got {_show(crowd)}")
    ann["iscrowd"] = int(bool(crowd))
    if "area" not in ann:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    elif not (_is_number(ann["area"]) and ann["area"] >= 0):
        _fail(source, where, f"area must be a number >= 0, got {_show(ann['area'])}")


def _entry(key: str, index: int, entry) -> str:
    """`annotations[17] (id 42)`: where an entry is, and its id when it has a readable one."""
    if isinstance(entry, dict) and _is_int(entry.get("id")):
        return f"{key}[{index}] (id {entry['id']})"
    return f"{key}[{index}]"


def _require_object(entry, where: str, source: str) -> None:
    if not isinstance(entry, dict):
        _fail(source, where, f"must be an object, got {_show(entry)}")


def _require_int(entry: dict, key: str, where: str, source: str) -> int:
    if key not in entry:
        _fail(source, where, f"missing '{key}'")
    if not _is_int(entry[key]):
        _fail(source, where, f"{key} must be an integer, got {_show(entry[key])}")
    return entry[key]


def _require_new(seen: dict, entry_id: int, index: int, key: str, where: str, source: str) -> None:
    if entry_id in seen:
        _fail(source, where, f"duplicate {_SINGULAR[key]} id {entry_id} (also {key}[{seen[entry_id]}])")
    seen[entry_id] = index


def _is_int(value) -> bool:
    return type(value) is int and _INT64[0] <= value <= _INT64[1]


def _is_number(value) -> bool:
    if type(value) is int:
        return abs(value) < 1e308
    return type(value) is float and math.isfinite(value)


def _show(value, limit: int = 60) -> str:
    """`value` as JSON, cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(source: str, where: str, problem: str):
    raise UserError(f"{source}: {where}: {problem}")
