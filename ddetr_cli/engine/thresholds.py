"""The score threshold at which a detector's pictures are most believable: the one maximising F1.

A detection is a true positive when it overlaps a not-yet-matched ground-truth box of its class in
its image with IoU >= 0.5 (crowd boxes are neither matched nor counted), matching greedily from the
highest score down, as COCO does per image. Keeping the top n detections gives
F1(n) = 2 TP(n) / (n + #GT); the threshold is the score of the best n.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class F1Threshold:
    threshold: float  # keep detections with score >= threshold
    f1: float
    precision: float
    recall: float


def best_f1_threshold(ground_truth: dict, detections: list[dict], iou: float = 0.5) -> F1Threshold:
    """COCO ground truth dict + COCO results entries ([x, y, w, h] pixels) -> the best-F1 threshold."""
    boxes: dict[tuple, list[list[float]]] = {}
    for ann in ground_truth["annotations"]:
        if not ann.get("iscrowd", 0):
            boxes.setdefault((ann["image_id"], ann["category_id"]), []).append(ann["bbox"])
    num_gt = sum(len(b) for b in boxes.values())
    matched: dict[tuple, set[int]] = {}
    best = F1Threshold(threshold=1.0, f1=0.0, precision=0.0, recall=0.0)
    tp = 0
    for n, det in enumerate(sorted(detections, key=lambda d: -d["score"]), start=1):
        key = (det["image_id"], det["category_id"])
        taken = matched.setdefault(key, set())
        free = [
            (box_iou_xywh(det["bbox"], gt), i) for i, gt in enumerate(boxes.get(key, [])) if i not in taken
        ]
        overlap, index = max(free, default=(0.0, -1))
        if overlap >= iou:
            taken.add(index)
            tp += 1
        f1 = 2 * tp / (n + num_gt) if num_gt else 0.0
        if f1 > best.f1:
            best = F1Threshold(det["score"], f1, tp / n, tp / num_gt)
    return best


def box_iou_xywh(a: list[float], b: list[float]) -> float:
    """IoU of two [x, y, w, h] boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
