"""Synthetic COCO-format detection data: coloured shapes on cluttered backgrounds.

`make_synthetic_coco(out_dir, num_train, num_val, image_size, seed)` writes

    out_dir/train/000000000001.jpg ...          real JPEG files
    out_dir/val/000000001001.jpg ...
    out_dir/annotations/instances_train.json    real COCO "instances" JSON
    out_dir/annotations/instances_val.json

so that every part of ddetr (loader, training, COCO evaluation, prediction) can run end to end
without a download. The data is meant to be learnable by a small model in minutes but not trivial:

- five shape classes with deliberately non-contiguous COCO category ids (as in real COCO, whose 80
  classes use ids 1..90), so the class index <-> category id mapping is exercised:
  1 circle, 2 square, 3 triangle, 5 star, 7 cross (`CATEGORIES`);
- every object gets a random colour, aspect ratio (0.75..1.33), rotation and texture (solid,
  stripes, noise or gradient), drawn anti-aliased;
- object sizes are drawn per size class so that COCO's small (area < 32^2), medium and large
  (area > 96^2) buckets are all populated and APs/APm/APl mean something (large objects need
  images of about 150 px or more);
- objects may overlap (each box may be covered by at most `max_overlap` of its area by other boxes);
  annotations are amodal: the box and polygon of a partly hidden object are those of the whole shape;
- backgrounds have a colour gradient, low-frequency blotches, pixel noise and distractor lines and
  arcs that belong to no class.

Annotation conventions: `bbox` is [x, y, w, h] in pixels (the tight box of the shape's polygon),
`segmentation` is one polygon [[x1, y1, x2, y2, ...]], `area` is that polygon's area (COCO's area is
the mask area, and COCOeval buckets objects by it), `iscrowd` is 0. Image ids are unique across the
two splits (train 1.., val 1001.. or after the last train id). Each image is generated from its own
random stream (seed, split, index), so the splits are deterministic and independent of each other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import cv2
import numpy as np

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 5, "name": "star", "supercategory": "shape"},
    {"id": 7, "name": "cross", "supercategory": "shape"},
]

# COCO size buckets on the object's area (pixels^2): small < 32^2 <= medium < 96^2 <= large.
SMALL_AREA, LARGE_AREA = 32**2, 96**2
TEXTURES = ("solid", "stripes", "noise", "gradient")

ImageSize = Union[int, Sequence[int]]


def make_synthetic_coco(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: ImageSize = (160, 224),
    seed: int = 0,
    objects_per_image: tuple[int, int] = (2, 6),
    train_objects_per_image: tuple[int, int] | None = None,
    size_mix: tuple[float, float, float] = (0.35, 0.40, 0.25),
    max_overlap: float = 0.3,
    clutter: float = 1.0,
    jpeg_quality: int = 92,
) -> Path:
    """Write a synthetic COCO dataset under `out_dir` and return `out_dir` as a Path.

    image_size: an int (every image is square of that side) or a (lo, hi) pair (height and width
        are each drawn uniformly from [lo, hi]).
    objects_per_image: inclusive (min, max) number of shapes per image (fewer when they do not fit).
    train_objects_per_image: the same for the train split only (None: `objects_per_image`). Denser
        training images give more supervision per pixel, the cost of a training step; the val split
        (each image drawn from its own random stream) is the same whatever this is.
    size_mix: probabilities of drawing a small, medium or large object (large ones are only drawn
        when the image can hold them).
    max_overlap: the largest fraction of an object's box that other boxes may cover.
    clutter: scales the amount of background clutter (0 = plain gradient background).
    """
    out = Path(out_dir)
    lo, hi = _size_range(image_size)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    train_objects = objects_per_image if train_objects_per_image is None else train_objects_per_image
    for name, value in (("objects_per_image", objects_per_image), ("train_objects_per_image", train_objects)):
        if value[0] < 0 or value[1] < value[0]:
            raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {value}")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    first_val_id = max(1001, num_train + 1)
    splits = (("train", num_train, 1, train_objects), ("val", num_val, first_val_id, objects_per_image))
    for split_index, (split, count, first_id, objects_range) in enumerate(splits):
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            height, width = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            image, objects = _render_image(rng, height, width, objects_range, size_mix, max_overlap, clutter)
            image_id = first_id + i
            file_name = f"{image_id:012d}.jpg"
            if not cv2.imwrite(str(split_dir / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
                raise OSError(f"{split_dir / file_name}: could not write the JPEG file")
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1}
            )
            for obj in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, obj))
        coco = {
            "info": {
                "description": "ddetr synthetic shapes (ddetr_cli.synth)",
                "version": "1.0",
                "year": 2026,
                "contributor": "ddetr",
                "date_created": "",
                "seed": seed,
            },
            "licenses": [
                {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
            ],
            "images": images,
            "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES],
        }
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)
    return out


def _size_range(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        lo = hi = int(image_size)
    else:
        sizes = [int(s) for s in image_size]
        if len(sizes) != 2:
            raise ValueError(f"image_size must be an int or a (lo, hi) pair, got {image_size!r}")
        lo, hi = min(sizes), max(sizes)
    if lo < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size!r}")
    return lo, hi


def _annotation(ann_id: int, image_id: int, obj: dict) -> dict:
    poly = obj["polygon"]
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category_id"],
        "bbox": [
            round(float(x0), 2),
            round(float(y0), 2),
            round(float(x1 - x0), 2),
            round(float(y1 - y0), 2),
        ],
        "area": round(float(_polygon_area(poly)), 2),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
    }


# ---------------------------------------------------------------------------------------------
# Rendering


def _render_image(rng, height, width, objects_per_image, size_mix, max_overlap, clutter):
    """Returns (BGR uint8 image [H, W, 3], list of {"category_id", "polygon" [N, 2] float})."""
    image = _background(rng, height, width, clutter)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    wanted = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    placed_boxes: list[np.ndarray] = []
    objects = []
    for _ in range(wanted):
        obj = _place_object(rng, height, width, size_mix, placed_boxes, max_overlap)
        if obj is None:
            continue
        placed_boxes.append(obj["box"])
        colour = _object_colour(rng, background_mean)
        _draw_shape(rng, image, obj["polygon"], colour)
        objects.append({"category_id": obj["category_id"], "polygon": obj["polygon"]})
    return image, objects


def _place_object(rng, height, width, size_mix, placed_boxes, max_overlap, tries=30):
    """Draws a shape, size, pose and position; retries until it fits the image and the overlap rule."""
    short = min(height, width)
    # Bounding-box side ranges giving areas in each COCO bucket (polygon area is about 0.4..1 of
    # the box area depending on the shape, so the ranges are chosen with some margin).
    side_ranges = [(10.0, 28.0), (44.0, 96.0), (124.0, 0.95 * short)]
    probs = np.asarray(size_mix, dtype=np.float64)
    if side_ranges[2][1] <= side_ranges[2][0]:
        probs[2] = 0.0  # the image cannot hold a large object
    if probs.sum() <= 0:
        raise ValueError(f"size_mix {size_mix} leaves no object size that fits a {height}x{width} image")
    probs /= probs.sum()
    # The size bucket is drawn once so that hard-to-place large objects are not silently replaced
    # by small ones when retrying.
    lo, hi = side_ranges[int(rng.choice(3, p=probs))]
    hi = min(hi, 0.95 * short)
    for _ in range(tries):
        side = float(rng.uniform(lo, hi))
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        unit = _unit_shape(category["name"], rng)
        aspect = float(math.exp(rng.uniform(math.log(0.75), math.log(1.33))))
        unit = unit * np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)])
        angle = (
            float(rng.uniform(-math.pi, math.pi))
            if category["name"] in ("triangle", "star")
            else float(rng.uniform(-0.5, 0.5))
        )
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shape = unit @ rot.T
        extent = shape.max(axis=0) - shape.min(axis=0)
        shape = shape * (side / float(extent.max()))
        extent = shape.max(axis=0) - shape.min(axis=0)
        if extent[0] > width - 2 or extent[1] > height - 2:
            continue
        x = rng.uniform(1.0, width - 1.0 - extent[0])
        y = rng.uniform(1.0, height - 1.0 - extent[1])
        polygon = shape - shape.min(axis=0) + np.array([x, y])
        box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
        if all(
            _covered_fraction(box, other) <= max_overlap and _covered_fraction(other, box) <= max_overlap
            for other in placed_boxes
        ):
            return {"category_id": category["id"], "polygon": polygon, "box": box}
    return None


def _unit_shape(name: str, rng) -> np.ndarray:
    """The outline of a shape centred at the origin with radius about 1, as [N, 2] (x, y)."""
    if name == "circle":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if name == "triangle":
        t = np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "star":
        inner = float(rng.uniform(0.38, 0.5))
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if name == "cross":
        a = float(rng.uniform(0.28, 0.4))  # half the arm width
        return np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown shape {name!r}")


def _covered_fraction(box: np.ndarray, other: np.ndarray) -> float:
    """Fraction of `box` (xyxy) covered by `other`."""
    iw = min(box[2], other[2]) - max(box[0], other[0])
    ih = min(box[3], other[3]) - max(box[1], other[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return float(iw * ih / max((box[2] - box[0]) * (box[3] - box[1]), 1e-6))


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _background(rng, height, width, clutter):
    """Gradient + low-frequency blotches + pixel noise + distractor lines/arcs; BGR uint8."""
    c0 = rng.uniform(30, 225, size=3)
    c1 = np.clip(c0 + rng.uniform(-70, 70, size=3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / float(max(height, width))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    if clutter > 0:
        blotches = rng.normal(0, 18 * clutter, size=(4, 4, 3)).astype(np.float32)
        image += cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
        image += rng.normal(0, 6 * clutter, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if clutter > 0:
        for _ in range(int(rng.integers(2, 7) * clutter)):
            colour = tuple(int(v) for v in rng.uniform(0, 255, size=3))
            thickness = int(rng.integers(1, 3))
            if rng.random() < 0.6:
                p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                cv2.line(image, p0, p1, colour, thickness, cv2.LINE_AA)
            else:  # an open arc: round like a circle but not one
                centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                axes = (int(rng.integers(8, max(9, width // 3))), int(rng.integers(8, max(9, height // 3))))
                start = float(rng.uniform(0, 360))
                cv2.ellipse(
                    image,
                    centre,
                    axes,
                    float(rng.uniform(0, 180)),
                    start,
                    start + float(rng.uniform(60, 200)),
                    colour,
                    thickness,
                    cv2.LINE_AA,
                )
    return image


def _object_colour(rng, background_mean, tries=10):
    """A saturated colour that stands out from the image's mean background colour."""
    best, best_distance = None, -1.0
    for _ in range(tries):
        hsv = np.array(
            [[[rng.integers(0, 180), rng.integers(110, 256), rng.integers(90, 256)]]], dtype=np.uint8
        )
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
        distance = float(np.abs(colour - background_mean).sum())
        if distance > 150:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _draw_shape(rng, image, polygon, colour):
    """Composites a textured shape into `image` (in place) through an anti-aliased polygon mask."""
    height, width = image.shape[:2]
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    h, w = y1 - y0, x1 - x0
    mask = np.zeros((h, w), dtype=np.uint8)
    shift = 4  # sub-pixel vertex precision for cv2.fillPoly
    pts = np.round((polygon - np.array([x0, y0])) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA, shift)
    texture = _texture(rng, h, w, colour)
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    region = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = np.clip(region * (1 - alpha) + texture * alpha, 0, 255).astype(np.uint8)


def _texture(rng, h, w, colour):
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    base = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    if kind == "solid":
        return base
    if kind == "noise":
        return base + rng.normal(0, 28, size=(h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    other = colour * rng.uniform(0.45, 0.75)  # a darker shade of the same hue
    if kind == "stripes":
        period = float(rng.uniform(3, 8))
        on = ((proj / period) % 2.0 < 1.0)[..., None]
        return np.where(on, base, other[None, None, :]).astype(np.float32)
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    return base * (1 - t[..., None]) + other[None, None, :] * t[..., None]
