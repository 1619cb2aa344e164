"""The demo's picture threshold: the score that maximises F1 at IoU 0.5."""

from __future__ import annotations

import pytest

from ddetr_cli.engine.thresholds import best_f1_threshold, box_iou_xywh


def _gt(boxes, crowd=()):
    anns = [
        {"id": i, "image_id": img, "category_id": c, "bbox": b, "iscrowd": 0}
        for i, (img, c, b) in enumerate(boxes)
    ]
    anns += [
        {"id": 100 + i, "image_id": img, "category_id": c, "bbox": b, "iscrowd": 1}
        for i, (img, c, b) in enumerate(crowd)
    ]
    return {"annotations": anns}


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": box, "score": score}


def test_threshold_keeps_the_true_positives_and_stops_before_the_noise():
    gt = _gt([(1, 1, [0, 0, 10, 10]), (1, 2, [20, 20, 10, 10]), (2, 1, [5, 5, 10, 10])])
    dets = [
        _det(1, 1, [0, 0, 10, 10], 0.9),  # TP
        _det(1, 1, [0, 0, 10, 10], 0.85),  # duplicate of a matched box: FP
        _det(2, 1, [5, 5, 10, 11], 0.8),  # TP (IoU 0.91)
        _det(1, 2, [20, 20, 10, 10], 0.7),  # TP
        _det(2, 2, [5, 5, 10, 10], 0.3),  # wrong class: FP
        _det(1, 1, [50, 50, 5, 5], 0.2),  # FP
    ]
    best = best_f1_threshold(gt, dets)
    assert best.threshold == 0.7  # top 4: 3 TP of 4 detections, 3 of 3 GT -> F1 = 6/7
    assert best.f1 == pytest.approx(6 / 7) and best.precision == 0.75 and best.recall == 1.0


def test_crowd_boxes_are_not_counted_and_no_detection_gives_f1_zero():
    gt = _gt([(1, 1, [0, 0, 10, 10])], crowd=[(1, 1, [30, 30, 20, 20])])
    best = best_f1_threshold(gt, [_det(1, 1, [0, 0, 10, 10], 0.5), _det(1, 1, [30, 30, 20, 20], 0.4)])
    assert best.threshold == 0.5 and best.f1 == 1.0
    assert best_f1_threshold(gt, []).f1 == 0.0


def test_box_iou_xywh():
    assert box_iou_xywh([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert box_iou_xywh([0, 0, 1, 1], [2, 2, 1, 1]) == 0.0
    assert box_iou_xywh([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
