"""COCO box results as columns, read and checked by the Rust reader (rust_loader/src/results.rs).

A results file is parsed into `Detections` with the GIL released and no Python object per entry;
detections in memory (a model's) go through the same reader as JSON text, so both are checked
alike: a file that is not JSON or not a list, the first malformed entry, or one naming an image
that the ground truth lacks is a one-line UserError naming the source and the entry, e.g.
"det.json: detection 7: bbox must be [x, y, width, height] numbers".
"""

from __future__ import annotations

import json
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


def detections_from_dicts(entries: list, image_ids, source: str) -> Detections:
    """COCO results entries in memory, checked as a file would be (errors name `source`)."""
    from ddetr_cli._loader import DataError, parse_detections

    try:
        text = json.dumps(entries).encode()
    except (TypeError, ValueError) as e:  # a value JSON cannot hold (a tensor, a cycle, ...)
        raise UserError(f"{source}: detections are not COCO results entries ({e})") from None
    try:
        return Detections(*parse_detections(text, source, _int64_ids(image_ids)))
    except DataError as e:
        raise UserError(str(e)) from None


def _int64_ids(image_ids) -> list[int]:
    """The ids that a detection's int64 `image_id` can name (the COCO validator takes any int)."""
    return [i for i in image_ids if _INT64.min <= i <= _INT64.max]
