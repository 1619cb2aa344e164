"""Evaluation backends: faster-coco-eval (the default) gives pycocotools' numbers (the oracle) on a
realistic ground truth: crowd boxes, empty images, non-contiguous category ids, one category
without ground truth, tied scores, a few hundred images and a detections file of middling AP."""

from __future__ import annotations

import copy

import pytest

from ddetr_cli import coco_eval
from ddetr_cli.annotations import validate_coco
from ddetr_cli.console import UserError
from ddetr_cli.eval_synth import synthetic_evaluation


@pytest.fixture(scope="module")
def realistic():
    gt, detections = synthetic_evaluation(300, detections_per_image=40, seed=3)
    return validate_coco(gt, "synthetic"), detections


def test_the_ground_truth_is_realistic(realistic):
    gt, detections = realistic
    annotated = {a["image_id"] for a in gt["annotations"]}
    assert len(gt["images"]) - len(annotated) >= 10  # empty images
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 20  # crowd boxes
    assert [c["id"] for c in gt["categories"]] == [1, 3, 7, 12, 40, 41, 90]
    scores = [d["score"] for d in detections]
    assert len(set(scores)) < len(scores) / 5  # many tied scores


def test_backends_agree_to_1e_9(realistic):
    gt, detections = realistic
    results = {
        backend: coco_eval.evaluate_detections(coco_eval.index_ground_truth(gt, backend), detections, backend)
        for backend in coco_eval.BACKENDS
    }
    faster, oracle = results["faster"], results["pycocotools"]
    assert 0.1 < oracle["AP"] < 0.9  # neither empty nor perfect
    for name in coco_eval.STAT_NAMES:
        assert faster[name] == pytest.approx(oracle[name], abs=1e-9), name
        assert 0 <= oracle[name] <= 1, name
    assert list(faster["per_class"]) == list(oracle["per_class"])
    for name, value in oracle["per_class"].items():
        assert faster["per_class"][name] == pytest.approx(value, abs=1e-9), name
    assert oracle["per_class"]["class41"] == -1  # a category without ground truth
    assert sum(v > 0 for v in oracle["per_class"].values()) == 6


def test_empty_results_and_empty_ground_truth(realistic):
    gt, _ = realistic
    for backend in coco_eval.BACKENDS:
        metrics = coco_eval.evaluate_detections(coco_eval.index_ground_truth(gt, backend), [], backend)
        assert all(metrics[name] == 0 for name in coco_eval.STAT_NAMES), backend
    no_objects = {"images": gt["images"][:5], "categories": gt["categories"], "annotations": []}
    for backend in coco_eval.BACKENDS:
        index = coco_eval.index_ground_truth(no_objects, backend)
        metrics = coco_eval.evaluate_detections(index, [], backend)
        assert all(metrics[name] == -1 for name in coco_eval.STAT_NAMES), backend


def test_ground_truth_of_either_library_and_detections_untouched(realistic):
    gt, detections = realistic
    some = detections[:4000]
    before = copy.deepcopy(some)
    pycoco_gt = coco_eval.index_ground_truth(gt, "pycocotools")
    default = coco_eval.evaluate_detections(pycoco_gt, some)  # re-indexed for the default backend
    oracle = coco_eval.evaluate_detections(pycoco_gt, some, backend="pycocotools")
    assert some == before
    for name in coco_eval.STAT_NAMES:
        assert default[name] == pytest.approx(oracle[name], abs=1e-9)


def test_default_backend_and_unknown_backend(realistic):
    assert coco_eval.BACKENDS[0] == coco_eval.DEFAULT_BACKEND == "faster"
    with pytest.raises(UserError, match="unknown evaluation backend 'fast'.*faster, pycocotools"):
        coco_eval.evaluate_detections(coco_eval.index_ground_truth(realistic[0]), [], backend="fast")


def test_a_ground_truth_index_can_be_reused(realistic):
    """Training evaluates every epoch against one cached index: evaluations must not leave state."""
    gt, detections = realistic
    index = coco_eval.index_ground_truth(gt)
    first = coco_eval.evaluate_detections(index, detections[:3000])
    other = coco_eval.evaluate_detections(index, detections[3000:9000])
    again = coco_eval.evaluate_detections(index, detections[:3000])
    assert again == first and other != first
