"""Ground-truth validation (`ddetr_cli.annotations`): the same verdict as the Rust loader on every
JSON variant, the cleaning (area, iscrowd, ids), one-line errors through `ddetr eval`, and the raw
label mapping with huge category ids."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import ddetr, error_line

from ddetr_cli import coco_eval
from ddetr_cli.annotations import validate_ground_truth
from ddetr_cli.console import UserError
from ddetr_cli.data import CocoLoader, DataError

IMAGES = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}, {"id": 2, "file_name": "b.jpg"}]
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}]
GOOD = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0}


def coco_with(*annotations, images=IMAGES, categories=CATEGORIES) -> dict:
    return {"images": images, "categories": categories, "annotations": [GOOD, *annotations]}


def ann(**fields) -> dict:
    """An annotation with id 2 on image 2 (category 9) and the given fields changed (None: removed)."""
    base = {"id": 2, "image_id": 2, "category_id": 9, "bbox": [1.5, 2, 3, 4.25], "area": 12.75, "iscrowd": 0}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


MISSING = None
# (name, COCO JSON text or dict, expected fragment of the validator's error; None: valid)
VARIANTS = [
    ("valid", coco_with(ann()), None),
    ("no area", coco_with(ann(area=MISSING)), None),
    ("no iscrowd", coco_with(ann(iscrowd=MISSING)), None),
    ("boolean iscrowd", coco_with(ann(iscrowd=True)), None),
    ("no annotation id", coco_with(ann(id=MISSING)), None),
    ("annotation id 0", coco_with(ann(id=0)), None),
    ("no annotations key", {"images": IMAGES, "categories": CATEGORIES}, None),
    ("zero-size box", coco_with(ann(bbox=[5, 5, 0, 0])), None),
    ("huge ids", coco_with(ann(id=2**63 - 1), categories=[*CATEGORIES, {"id": 2**62}]), None),
    ("3-number box", coco_with(ann(bbox=[1, 2, 3])), "annotations[1] (id 2): bbox must be 4 numbers"),
    ("null box", coco_with(ann(bbox=None) | {"bbox": None}), "annotations[1] (id 2): bbox must be 4 numbers"),
    ("string in box", coco_with(ann(bbox=[1, 2, "3", 4])), "bbox must be 4 numbers"),
    ("negative width", coco_with(ann(bbox=[1, 2, -3, 4])), "negative width or height"),
    ("negative height", coco_with(ann(bbox=[1, 2, 3, -0.5])), "negative width or height"),
    ("box missing", coco_with(ann(bbox=MISSING)), "bbox must be 4 numbers"),
    ("null area", coco_with(ann() | {"area": None}), "area must be a number >= 0"),
    ("negative area", coco_with(ann(area=-1)), "area must be a number >= 0"),
    ("string iscrowd", coco_with(ann(iscrowd="no")), "iscrowd must be 0, 1 or a boolean"),
    ("float iscrowd", coco_with(ann(iscrowd=1.0)), "iscrowd must be 0, 1 or a boolean"),
    ("duplicate annotation id", coco_with(ann(id=1)), "duplicate annotation id 1 (also annotations[0])"),
    ("unknown image", coco_with(ann(image_id=77)), "annotations[1] (id 2): image_id 77 is not in 'images'"),
    ("unknown category", coco_with(ann(category_id=4)), "category_id 4 is not in 'categories'"),
    ("no image_id", coco_with(ann(image_id=MISSING)), "annotations[1] (id 2): missing 'image_id'"),
    ("no category_id", coco_with(ann(category_id=MISSING)), "missing 'category_id'"),
    ("float image_id", coco_with(ann(image_id=2.0)), "image_id must be an integer, got 2.0"),
    ("boolean category_id", coco_with(ann(category_id=True)), "category_id must be an integer"),
    ("string annotation id", coco_with(ann(id="2")), "id must be an integer"),
    ("id beyond int64", coco_with(ann(id=2**63)), "id must be an integer"),
    ("annotation not an object", coco_with([1, 2]), "annotations[1]: must be an object"),
    (
        "duplicate image id",
        coco_with(images=[*IMAGES, {"id": 1, "file_name": "c.jpg"}]),
        "duplicate image id 1",
    ),
    ("image without id", coco_with(images=[*IMAGES, {"file_name": "c.jpg"}]), "images[2]: missing 'id'"),
    ("image without file_name", coco_with(images=[*IMAGES, {"id": 5}]), "images[2] (id 5): file_name must"),
    (
        "absolute file_name",
        coco_with(images=[*IMAGES, {"id": 5, "file_name": "/etc/x.jpg"}]),
        "unsafe file_name",
    ),
    (
        "dotdot file_name",
        coco_with(images=[*IMAGES, {"id": 5, "file_name": "a/../../x.jpg"}]),
        "unsafe file_name",
    ),
    ("duplicate category id", coco_with(categories=[*CATEGORIES, {"id": 3}]), "duplicate category id 3"),
    (
        "category name null",
        coco_with(categories=[{"id": 3, "name": None}, {"id": 9}]),
        "name must be a string",
    ),
    ("no categories", {"images": IMAGES, "annotations": []}, "no 'categories' list"),
    ("no images", {"categories": CATEGORIES}, "no 'images' list"),
    (
        "annotations null",
        {"images": IMAGES, "categories": CATEGORIES, "annotations": None},
        "'annotations' must",
    ),
    ("top-level list", [], "the top level must be an object"),
    ("not JSON", '{"images": [', "not valid JSON"),
    (
        "NaN in box",
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}], "annotations": '
        '[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [NaN, 0, 1, 1]}]}',
        "bbox must be 4 numbers",
    ),
]


@pytest.mark.parametrize("name, content, expected", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_rust_loader_and_validator_give_the_same_verdict(tmp_path, name, content, expected):
    path = tmp_path / "instances.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "images").mkdir()
    try:
        validate_ground_truth(path)
        python_error = None
    except UserError as e:
        python_error = str(e)
    try:
        CocoLoader(tmp_path / "images", path, train=False, batch_size=1, workers=1)
        rust_error = None
    except DataError as e:
        rust_error = str(e)
    if expected is None:
        assert python_error is None and rust_error is None, (python_error, rust_error)
    else:
        assert python_error is not None and rust_error is not None, (python_error, rust_error)
        assert python_error.startswith(f"{path}: ") and expected in python_error, python_error
        assert rust_error.startswith(f"{path}: "), rust_error
        assert "\n" not in python_error and "\n" not in rust_error


def test_cleaning_fills_area_and_iscrowd_and_renumbers_id_0(tmp_path):
    path = tmp_path / "converted.json"
    annotations = [
        {"id": 0, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30]},
        {"id": 5, "image_id": 2, "category_id": 9, "bbox": [1, 1, 4, 2.5], "iscrowd": True, "area": 7},
    ]
    path.write_text(json.dumps({"images": IMAGES, "categories": CATEGORIES, "annotations": annotations}))
    cleaned = validate_ground_truth(path)["annotations"]
    assert [a["id"] for a in cleaned] == [1, 2]  # 0 is COCOeval's "unmatched" marker
    assert cleaned[0]["area"] == 600 and cleaned[0]["iscrowd"] == 0
    assert cleaned[1]["area"] == 7 and cleaned[1]["iscrowd"] == 1  # a given area is kept


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
def test_converted_ground_truth_evaluates_like_a_complete_one(tmp_path, backend):
    """No `area`, no `iscrowd`, annotation ids from 0: perfect detections score AP 1, and the
    buckets follow the box area (issue #14 item 1: this raised KeyError 'area' after an epoch)."""
    boxes = [[0, 0, 20, 20], [5, 5, 60, 50], [10, 20, 150, 120]]  # small, medium, large
    annotations = [{"id": i, "image_id": 1, "category_id": 3, "bbox": b} for i, b in enumerate(boxes)]
    path = tmp_path / "converted.json"
    path.write_text(json.dumps({"images": IMAGES, "categories": CATEGORIES, "annotations": annotations}))
    gt = coco_eval.load_ground_truth(path, backend=backend)
    detections = [{"image_id": 1, "category_id": 3, "bbox": b, "score": 0.9} for b in boxes]
    metrics = coco_eval.evaluate_detections(gt, coco_eval.model_detections(detections, gt), backend=backend)
    for name in ("AP", "APs", "APm", "APl", "AR100"):
        assert metrics[name] == pytest.approx(1.0), name


@pytest.mark.parametrize("category_id", [4_000_000_000, 2**63 - 1])
def test_raw_label_mapping_with_a_huge_category_id_is_a_data_error(tmp_path, category_id):
    """Raw mapping made a table of max id + 1 classes: 4e9 aborted the process, i64::MAX panicked."""
    path = tmp_path / "huge.json"
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "a"}, {"id": category_id, "name": "b"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": category_id, "bbox": [0, 0, 4, 4]}],
    }
    path.write_text(json.dumps(coco))
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as info:
        CocoLoader(tmp_path / "images", path, train=False, batch_size=1, label_mapping="raw")
    message = str(info.value)
    assert message.startswith(f"{path}: ") and f"category id {category_id} is too large" in message
    assert "label_mapping='compact'" in message and "\n" not in message
    compact = CocoLoader(tmp_path / "images", path, train=False, batch_size=1, label_mapping="compact")
    assert compact._core.category_ids == [1, category_id]


def _dataset_with_val_annotations(src, dst, edit) -> None:
    """A copy of the synthetic dataset at `dst` whose val annotations went through `edit(dict)`."""
    shutil.copytree(src, dst)
    ann_file = dst / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    edit(coco)
    ann_file.write_text(json.dumps(coco))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda c: c["annotations"][3].update(bbox=[1, 2, 3]),
            "annotations[3] (id {id}): bbox must be 4 numbers",
        ),
        (lambda c: c["annotations"][3].update(bbox=None), "annotations[3] (id {id}): bbox must be 4 numbers"),
        (lambda c: c["annotations"][3].update(id=c["annotations"][0]["id"]), "duplicate annotation id"),
        (lambda c: c["images"].append(dict(c["images"][0])), "duplicate image id"),
    ],
    ids=["3-number box", "null box", "duplicate annotation id", "duplicate image id"],
)
def test_eval_predictions_names_the_bad_ground_truth(synthetic_coco, tmp_path, edit, expected):
    """`ddetr eval --predictions` with a broken ground truth: one line naming the annotation file
    and its first bad entry, never the detections file."""
    data = tmp_path / "data"
    _dataset_with_val_annotations(synthetic_coco, data, edit)
    ann_file = data / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    det_file = tmp_path / "det.json"
    det_file.write_text(
        json.dumps(
            [{"image_id": coco["images"][0]["id"], "category_id": 1, "bbox": [0, 0, 9, 9], "score": 0.5}]
        )
    )
    result = ddetr("eval", "--predictions", det_file, "--data", data, "--split", "val")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert str(ann_file) in line and "det.json" not in line, line
    assert expected.format(id=coco["annotations"][3]["id"]) in line, line
