"""COCO box results as columns: a results file read and checked by the Rust reader
(rust_loader/src/results.rs), or a model's detections made into columns directly.

A results file is parsed with the GIL released and no Python object per entry; a file that is not
JSON or not a list, the first malformed entry, or one naming an image that the ground truth lacks
is a one-line UserError naming the file and the entry, e.g.
"det.json: detection 7: bbox must be [x, y, width, height] numbers". The text must be strict JSON:
NaN and Infinity, which Python's json writes, are refused where they stand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddetr_cli.console import UserError

_INT64 = np.iinfo(np.int64)


@dataclass(frozen=True, eq=False)  # arrays: no elementwise ==
class Detections:
    """N box detections: image_id int64 [N], category_id float64 [N] (pycocotools takes 3.0 for 3),
    bbox float64 [N, 4] (x, y, width, height in pixels), score float64 [N]."""

    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.image_id)

    def select(self, keep: np.ndarray) -> Detections:
        """The detections where the bool [N] `keep` is true."""
        return Detections(self.image_id[keep], self.category_id[keep], self.bbox[keep], self.score[keep])

    def rows(self) -> np.ndarray:
        """float64 [N, 7]: image_id, x, y, width, height, score, category_id (pycocotools'
        `loadNumpyAnnotations` layout, which hotcoco's `loadRes` takes)."""
        return np.column_stack([self.image_id, self.bbox, self.score, self.category_id])  # upcast: float64

    def to_dicts(self) -> list[dict]:
        """COCO results entries, as ddetr writes them (an integral category id as an int)."""
        categories = [int(c) if c.is_integer() else c for c in self.category_id.tolist()]
        return [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(self.image_id.tolist(), categories, self.bbox.tolist(), self.score.tolist())
        ]


def read_detections(path: str | Path, image_ids) -> Detections:
    """The COCO results file `path`, checked; every detection must name one of `image_ids`."""
    from ddetr_cli._loader import DataError, read_detections

    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file not found: {path}")
    try:
        return Detections(*read_detections(str(path), _int64_ids(image_ids)))
    except DataError as e:
        raise UserError(str(e)) from None


def model_columns(entries: list[dict], source: str = "model") -> Detections:
    """A model's COCO results entries (`engine.inference.coco_detections`) as columns, without a
    JSON round trip: they are well-formed by construction and name the loader's images, so only a
    box or score that is not finite (a diverged model) is refused, named as the reader would."""
    n = len(entries)
    detections = Detections(
        np.fromiter((e["image_id"] for e in entries), np.int64, n),
        np.fromiter((e["category_id"] for e in entries), np.float64, n),
        np.array([e["bbox"] for e in entries], np.float64).reshape(n, 4),
        np.fromiter((e["score"] for e in entries), np.float64, n),
    )
    bad_box = ~np.isfinite(detections.bbox).all(axis=1)
    bad = np.flatnonzero(bad_box | ~np.isfinite(detections.score))
    if len(bad):
        i = bad[0]
        what = "bbox must be [x, y, width, height] numbers" if bad_box[i] else "score must be a finite number"
        raise UserError(f"{source}: detection {i}: {what}")
    return detections


def _int64_ids(image_ids) -> list[int]:
    """The ids that a detection's int64 `image_id` can name (the COCO validator takes any int)."""
    return [i for i in image_ids if _INT64.min <= i <= _INT64.max]
