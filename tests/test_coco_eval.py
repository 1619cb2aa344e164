"""Evaluation backends: hotcoco (the default) and faster-coco-eval give pycocotools' numbers (the
oracle) to 1e-9 on a realistic ground truth: crowd boxes, empty images, detections on images
without ground truth, non-contiguous category ids listed out of order, one category without ground
truth, mask areas smaller than the boxes, polygons and RLE, tied scores, a few hundred images and a
detections file of middling AP; also when the evaluation is restricted to some images."""

from __future__ import annotations

import copy
import json
import random
import re

import numpy as np
import pytest

from ddetr_cli import coco_eval
from ddetr_cli.annotations import validate_coco
from ddetr_cli.console import UserError
from ddetr_cli.eval_synth import synthetic_evaluation

ORACLE = "pycocotools"
FAST_BACKENDS = [b for b in coco_eval.BACKENDS if b != ORACLE]


@pytest.fixture(scope="module")
def realistic():
    """(validated ground-truth dict, detections) shaped like COCO's val set: `area` is a mask's
    area (below the box's), boxes carry a polygon, crowds an RLE, categories are out of order."""
    gt, detections = synthetic_evaluation(300, detections_per_image=40, seed=3)
    rng = random.Random(3)
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["area"] = round(w * h * rng.uniform(0.4, 1.0), 2)
        if ann["iscrowd"]:
            ann["segmentation"] = {"counts": [int(x), int(w * h), 10], "size": [2000, 2000]}
        else:
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    gt["categories"].reverse()
    return validate_coco(gt, "synthetic"), detections


def checked(detections: list, index):
    """COCO results dicts as the columns that `evaluate_detections` takes (as a model's are made)."""
    return coco_eval.model_detections(detections, index)


@pytest.fixture(scope="module")
def oracle(realistic):
    gt, detections = realistic
    index = coco_eval.index_ground_truth(gt, ORACLE)
    return coco_eval.evaluate_detections(index, checked(detections, index), ORACLE)


def assert_same_metrics(metrics: dict, expected: dict) -> None:
    """The 12 numbers and the per-class AP (same classes, same order) agree to 1e-9."""
    for name in coco_eval.STAT_NAMES:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-9), name
    assert list(metrics["per_class"]) == list(expected["per_class"])
    for name, value in expected["per_class"].items():
        assert metrics["per_class"][name] == pytest.approx(value, abs=1e-9), name


def test_the_ground_truth_is_realistic(realistic, oracle):
    gt, detections = realistic
    annotated = {a["image_id"] for a in gt["annotations"]}
    assert len(gt["images"]) - len(annotated) >= 10  # empty images
    assert len({d["image_id"] for d in detections} - annotated) >= 10  # detections there too
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 20  # crowd boxes
    assert [c["id"] for c in gt["categories"]] == [90, 41, 40, 12, 7, 3, 1]
    scores = [d["score"] for d in detections]
    assert len(set(scores)) < len(scores) / 5  # many tied scores
    assert 0.1 < oracle["AP"] < 0.9  # neither empty nor perfect
    assert all(0 <= oracle[name] <= 1 for name in coco_eval.STAT_NAMES)
    assert list(oracle["per_class"]) == [f"class{c}" for c in (1, 3, 7, 12, 40, 41, 90)]  # id order
    assert oracle["per_class"]["class41"] == -1  # a category without ground truth
    assert sum(v > 0 for v in oracle["per_class"].values()) == 6


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_agrees_with_pycocotools_to_1e_9(realistic, oracle, backend):
    gt, detections = realistic
    index = coco_eval.index_ground_truth(gt, backend)
    assert isinstance(index, coco_eval._api(backend)[0])
    assert_same_metrics(coco_eval.evaluate_detections(index, checked(detections, index), backend), oracle)


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
def test_a_results_file_evaluates_as_the_same_detections_in_memory(realistic, oracle, backend, tmp_path):
    """`ddetr eval --predictions` (the Rust reader's columns) and a model's detections (dicts made
    into columns in Python) are the same input to every backend."""
    gt, detections = realistic
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(detections))
    index = coco_eval.index_ground_truth(gt, backend)
    from_file = coco_eval.load_detections(path, index)
    in_memory = checked(detections, index)
    for column in ("image_id", "category_id", "bbox", "score"):
        assert np.array_equal(getattr(from_file, column), getattr(in_memory, column)), column
    assert json.dumps(from_file.to_dicts()) == json.dumps(detections)  # what --save-detections writes
    assert_same_metrics(coco_eval.evaluate_detections(index, from_file, backend), oracle)


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
def test_image_ids_restrict_the_evaluation_to_those_images(realistic, oracle, backend):
    """Evaluating some images (those a model could read) scores as if the others did not exist:
    their ground truth is not missed and their detections are not false positives."""
    gt, detections = realistic
    annotated = {a["image_id"] for a in gt["annotations"]}
    image_ids = [image["id"] for image in gt["images"][::3]]
    assert len(set(image_ids) - annotated) >= 3  # some empty images among them
    kept = set(image_ids)
    subset = {
        "images": [image for image in gt["images"] if image["id"] in kept],
        "categories": gt["categories"],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in kept],
    }
    subset_detections = [d for d in detections if d["image_id"] in kept]
    subset_index = coco_eval.index_ground_truth(subset, ORACLE)
    expected = coco_eval.evaluate_detections(subset_index, checked(subset_detections, subset_index), ORACLE)

    index = coco_eval.index_ground_truth(gt, backend)
    restricted = coco_eval.evaluate_detections(
        index, checked(detections, index), backend, image_ids=image_ids[::-1]
    )
    assert_same_metrics(restricted, expected)
    assert restricted["AP"] != pytest.approx(oracle["AP"], abs=1e-4)


def test_empty_results_and_empty_ground_truth(realistic):
    gt, _ = realistic
    for backend in coco_eval.BACKENDS:
        index = coco_eval.index_ground_truth(gt, backend)
        metrics = coco_eval.evaluate_detections(index, checked([], index), backend)
        assert all(metrics[name] == 0 for name in coco_eval.STAT_NAMES), backend
    no_objects = {"images": gt["images"][:5], "categories": gt["categories"], "annotations": []}
    for backend in coco_eval.BACKENDS:
        index = coco_eval.index_ground_truth(no_objects, backend)
        metrics = coco_eval.evaluate_detections(index, checked([], index), backend)
        assert all(metrics[name] == -1 for name in coco_eval.STAT_NAMES), backend


@pytest.mark.parametrize(
    "indexed_by, evaluated_by", [(ORACLE, coco_eval.DEFAULT_BACKEND), ("hotcoco", ORACLE)]
)
def test_ground_truth_of_any_library_and_detections_untouched(realistic, indexed_by, evaluated_by):
    gt, detections = realistic
    index = coco_eval.index_ground_truth(gt, indexed_by)
    some = checked(detections[:4000], index)
    before = copy.deepcopy(some)
    other = coco_eval.evaluate_detections(index, some, evaluated_by)  # re-indexed for its library
    same = coco_eval.evaluate_detections(index, some, indexed_by)
    assert some.to_dicts() == before.to_dicts()
    assert_same_metrics(other, same)


def test_default_backend_and_unknown_backend(realistic):
    assert coco_eval.BACKENDS[0] == coco_eval.DEFAULT_BACKEND == "hotcoco"
    index = coco_eval.index_ground_truth(realistic[0])
    assert isinstance(index, coco_eval._api("hotcoco")[0])
    with pytest.raises(UserError, match="unknown evaluation backend 'fast'.*hotcoco, faster, pycocotools"):
        coco_eval.evaluate_detections(index, checked([], index), backend="fast")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_ground_truth_index_can_be_reused(realistic, backend):
    """Training evaluates every epoch against one cached index: evaluations must not leave state."""
    gt, detections = realistic
    index = coco_eval.index_ground_truth(gt, backend)
    first = coco_eval.evaluate_detections(index, checked(detections[:3000], index), backend)
    other = coco_eval.evaluate_detections(index, checked(detections[3000:9000], index), backend)
    again = coco_eval.evaluate_detections(index, checked(detections[:3000], index), backend)
    assert again == first and other != first


SMALL_GT = {
    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
    "categories": [{"id": 1}, {"id": 2, "name": "b"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 30, 30], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 40, 20]},
    ],
}
SMALL_DETECTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 9], "score": 0.9},
    {"image_id": 1, "category_id": 2, "bbox": [22, 20, 10, 10], "score": 0.8},
    {"image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 20], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.7},
]


def small_index(backend: str = coco_eval.DEFAULT_BACKEND):
    return coco_eval.index_ground_truth(validate_coco(copy.deepcopy(SMALL_GT), "small"), backend)


def test_hotcoco_takes_every_file_pycocotools_takes(tmp_path, capfd):
    """Fields box evaluation never reads, in types hotcoco refuses (a text width, a text
    segmentation), a nameless category (per-class key: its id) and negative annotation ids."""
    gt = copy.deepcopy(SMALL_GT)
    gt["images"][0]["width"] = "640px"
    gt["annotations"][0]["segmentation"] = "n/a"
    for ann in gt["annotations"]:
        ann["id"] = -ann["id"]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(gt))
    oracle_index, index = coco_eval.load_ground_truth(path, ORACLE), coco_eval.load_ground_truth(path)
    expected = coco_eval.evaluate_detections(oracle_index, checked(SMALL_DETECTIONS, oracle_index), ORACLE)
    metrics = coco_eval.evaluate_detections(index, checked(SMALL_DETECTIONS, index))
    assert_same_metrics(metrics, expected)
    assert list(metrics["per_class"]) == ["1", "b"] and 0 < metrics["AP"] < 1
    assert capfd.readouterr().err == ""


def test_negative_image_or_category_ids_are_evaluated_by_faster_coco_eval(tmp_path, capfd):
    """hotcoco takes ids >= 0 only: such a file is evaluated by faster-coco-eval, said once."""
    image, category = {1: 1, 2: -2}, {1: -1, 2: 2}
    gt = {
        "images": [{**e, "id": image[e["id"]]} for e in SMALL_GT["images"]],
        "categories": [{**e, "id": category[e["id"]]} for e in SMALL_GT["categories"]],
        "annotations": [
            {**e, "image_id": image[e["image_id"]], "category_id": category[e["category_id"]]}
            for e in SMALL_GT["annotations"]
        ],
    }
    detections = [
        {**e, "image_id": image[e["image_id"]], "category_id": category[e["category_id"]]}
        for e in SMALL_DETECTIONS
    ]
    path = tmp_path / "negative.json"
    path.write_text(json.dumps(gt))
    oracle_index = coco_eval.load_ground_truth(path, ORACLE)
    expected = coco_eval.evaluate_detections(oracle_index, checked(detections, oracle_index), ORACLE)
    index = coco_eval.load_ground_truth(path)
    assert "negative image or category ids" in capfd.readouterr().err
    assert isinstance(index, coco_eval._api("faster")[0])
    assert coco_eval.backend_for(gt, "hotcoco") == "faster" and coco_eval.backend_for(gt, ORACLE) == ORACLE
    for _ in range(2):  # the faster-coco-eval index is used as it is, quietly
        assert_same_metrics(coco_eval.evaluate_detections(index, checked(detections, index)), expected)
        assert capfd.readouterr().err == ""
    assert_same_metrics(
        coco_eval.evaluate_detections(oracle_index, checked(detections, oracle_index)), expected
    )
    assert 0 < expected["AP"] < 1 and list(expected["per_class"]) == ["-1", "b"]


GOOD = {"image_id": 1, "category_id": 2, "bbox": [1, 2.5, 3, 4], "score": 0.5}
BAD_DETECTIONS = [
    ([1, 2], "detection 5 is not an object"),
    ({k: v for k, v in GOOD.items() if k != "score"}, "detection 5 has no 'score'"),
    ({**GOOD, "image_id": 1.0}, "detection 5: image_id must be an integer"),
    ({**GOOD, "image_id": True}, "detection 5: image_id must be an integer"),
    ({**GOOD, "image_id": 7}, "detection 5: image_id 7 is not an image of the ground truth"),
    ({**GOOD, "image_id": 2**63}, f"detection 5: image_id {2**63} is not an image of the ground truth"),
    ({**GOOD, "image_id": 2**64}, "detection 5: image_id must be an integer"),  # serde_json: a float
    ({**GOOD, "category_id": True}, "detection 5: category_id must be an integer"),
    ({**GOOD, "category_id": [2]}, "detection 5: category_id must be an integer"),
    ({**GOOD, "bbox": [1, 2, 3]}, r"detection 5: bbox must be \[x, y, width, height\] numbers"),
    ({**GOOD, "bbox": [1, 2, "3", 4]}, "detection 5: bbox must be"),
    ({**GOOD, "bbox": [1, 2, 3, 4, 5]}, "detection 5: bbox must be"),
    ({**GOOD, "bbox": [1, 2, 3, float("nan")]}, r"not valid JSON \(NaN or Infinity at line 1, column \d+: "),
    ({**GOOD, "bbox": [1, 2, 10**400, 4]}, r"not valid JSON \(number out of range at line 1, column \d+\)"),
    ({**GOOD, "bbox": [1, 2, 3, -0.5]}, "detection 5: bbox has a negative width or height"),
    ({**GOOD, "score": None}, "detection 5: score must be a finite number"),
    ({**GOOD, "score": "0.5"}, "detection 5: score must be a finite number"),
    ({**GOOD, "score": float("inf")}, r"not valid JSON \(NaN or Infinity at line 1, column \d+: "),
    ({**GOOD, "score": float("-inf")}, r"not valid JSON \(NaN or Infinity at line 1, column \d+: "),
    ({**GOOD, "score": True}, "detection 5: score must be a finite number"),
]


@pytest.mark.parametrize("bad, message", BAD_DETECTIONS)
def test_a_malformed_detection_is_named(bad, message, tmp_path):
    """The error names the first bad detection of a results file; NaN and Infinity, which Python's
    json writes but JSON has not, are named where they are."""
    gt = small_index()
    detections = [GOOD] * 5 + [bad] + [{**GOOD, "score": "bad"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(detections))
    with pytest.raises(UserError, match=f"^{path}: {message}"):
        coco_eval.load_detections(path, gt)


def test_a_diverged_models_detections_are_named():
    """A model's detections skip the reader: only a NaN or infinite box or score can be wrong."""
    gt = small_index()
    nan = float("nan")
    for bad, message in [
        ({**GOOD, "score": nan, "bbox": [1, 2, nan, 4]}, "bbox must be [x, y, width, height] numbers"),
        ({**GOOD, "score": float("-inf")}, "score must be a finite number"),
    ]:
        with pytest.raises(UserError, match=re.escape(f"model: detection 2: {message}")):
            coco_eval.model_detections([GOOD, GOOD, bad, bad], gt)
    assert len(coco_eval.model_detections([], gt)) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not valid JSON (EOF while parsing a value at line 1, column 0)"),
        (
            '[{"image_id": 1,\n "bbox": [1, 2 3]}]',
            "not valid JSON (expected `,` or `]` at line 2, column 16)",
        ),
        ('{"image_id": 1}', "a COCO results file must be a JSON list of detections"),
    ],
)
def test_a_results_file_that_is_not_a_json_list_is_one_line(text, message, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(UserError, match=f"^{path}: {re.escape(message)}$"):
        coco_eval.load_detections(path, small_index())
    with pytest.raises(UserError, match="predictions file not found"):
        coco_eval.load_detections(tmp_path / "none.json", small_index())


def test_well_formed_detections_unknown_categories_dropped(capfd, tmp_path):
    gt = small_index()
    detections = [
        GOOD,
        {**GOOD, "category_id": 1.0, "score": 1},
        {**GOOD, "category_id": 5},
        {**GOOD, "image_id": 2, "category_id": 2.5},
        {**GOOD, "image_id": 2},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(detections))
    kept = coco_eval.load_detections(path, gt)
    assert kept.to_dicts() == [detections[i] for i in (0, 1, 4)]
    assert kept.category_id.dtype == np.float64 and kept.image_id.dtype == np.int64
    assert kept.bbox.shape == (3, 4)
    assert f"{path}: 2 detections have category ids not in the ground truth" in capfd.readouterr().err
    from_model = coco_eval.model_detections(detections, gt)
    assert capfd.readouterr().err == ""  # a model's extra classes are not the user's mistake
    assert from_model.to_dicts() == kept.to_dicts() and from_model.bbox.dtype == np.float64


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_result_fields_that_box_evaluation_overwrites_are_ignored(backend):
    """pycocotools' loadRes sets a box result's id, area and iscrowd itself and never reads its
    mask: such fields, even in types hotcoco refuses, change nothing."""
    extra = [{"id": -1, "iscrowd": 1}, {"area": 1.0, "segmentation": "n/a"}, {"ignore": 1}, {}]
    detections = [{**det, **fields} for det, fields in zip(SMALL_DETECTIONS, extra)]
    oracle_index = small_index(ORACLE)
    expected = coco_eval.evaluate_detections(oracle_index, checked(SMALL_DETECTIONS, oracle_index), ORACLE)
    gt = small_index(backend)
    assert_same_metrics(coco_eval.evaluate_detections(gt, checked(detections, gt), backend), expected)
    assert_same_metrics(coco_eval.evaluate_detections(gt, checked(detections, gt), ORACLE), expected)
