"""A synthetic COCO ground truth and detections file shaped like real ones, for the evaluator's tests
and benchmark (no dataset can be downloaded here).

`synthetic_evaluation(num_images, ...)` -> (ground-truth dict, detections list):
- image ids not contiguous and listed out of order, sizes 320..1024 px, about 8% images empty;
- category ids not contiguous (1, 3, 7, 12, 40, 41, 90); id 41 has no ground truth at all;
- `objects_per_image` objects on average (Poisson), sizes spread over COCO's small, medium and
  large buckets, about 3% crowd boxes; `area` is the box area;
- per image: a detection near most objects (box jitter, sometimes the wrong class), some on crowd
  regions, the rest false positives, `detections_per_image` in all, scores rounded to 3 decimals
  so that ties occur. The AP is far from 0 and from 1.
"""

from __future__ import annotations

import numpy as np

CATEGORY_IDS = (1, 3, 7, 12, 40, 41, 90)
_EMPTY_CATEGORY = 41


def synthetic_evaluation(
    num_images: int, objects_per_image: float = 7.0, detections_per_image: int = 100, seed: int = 0
) -> tuple[dict, list]:
    """(COCO ground-truth dict, COCO results list); see the module doc."""
    rng = np.random.default_rng(seed)
    image_ids = (1000 + 3 * rng.permutation(num_images)).tolist()
    labelled = [c for c in CATEGORY_IDS if c != _EMPTY_CATEGORY]
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS],
    }
    detections = []
    for image_id in image_ids:
        width, height = (int(v) for v in rng.integers(320, 1025, size=2))
        gt["images"].append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height}
        )
        count = 0 if rng.random() < 0.08 else int(rng.poisson(objects_per_image))
        objects = [_object(rng, width, height, labelled) for _ in range(count)]
        for box, category, crowd in objects:
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": crowd,
                }
            )
        detections += _detections(rng, image_id, width, height, objects, labelled, detections_per_image)
    return gt, detections


def _object(rng, width: int, height: int, categories: list) -> tuple[list, int, int]:
    """(box [x, y, w, h], category id, iscrowd) of one object inside a width x height image."""
    side = float(np.exp(rng.uniform(np.log(8), np.log(0.9 * min(width, height)))))
    w = min(side * float(rng.uniform(0.6, 1.6)), width - 1.0)
    h = min(side * float(rng.uniform(0.6, 1.6)), height - 1.0)
    x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
    crowd = int(rng.random() < 0.03)
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], int(rng.choice(categories)), crowd


def _detections(rng, image_id: int, width: int, height: int, objects: list, categories: list, total: int):
    """`total` detections for one image: near the objects first, then false positives."""
    results = []
    for box, category, _crowd in objects:
        if rng.random() < 0.15 or len(results) >= total:
            continue
        x, y, w, h = box
        jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        if rng.random() < 0.1:
            category = int(rng.choice(categories))
        results.append(
            _result(
                image_id,
                category,
                [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                rng.beta(5, 2),
            )
        )
    while len(results) < total:
        w, h = (float(v) for v in rng.uniform(4, 0.5 * min(width, height), size=2))
        x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
        results.append(_result(image_id, int(rng.choice(categories)), [x, y, w, h], rng.beta(1.2, 5)))
    return results


def _result(image_id: int, category: int, box: list, score: float) -> dict:
    x, y, w, h = (max(float(v), 0.0) for v in box)
    return {
        "image_id": image_id,
        "category_id": category,
        "bbox": [round(x, 2), round(y, 2), round(max(w, 1.0), 2), round(max(h, 1.0), 2)],
        "score": round(float(score), 3),
    }
