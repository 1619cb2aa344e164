"""A pure-Python reference of the data pipeline: Pillow + torchvision, written after the official
Deformable DETR `datasets/coco.py` (ConvertCocoPolysToMask, make_coco_transforms) and
`datasets/transforms.py`.

Two users: the tests replay the Rust loader's augmentation decisions here and compare outputs, and
`ddetr bench loader` runs it in a torch DataLoader as the baseline a user would otherwise have.
Boxes are float32 tensors, absolute xyxy while transforming (as in the official code).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as F
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALES = tuple(range(480, 801, 32))


def prepare(annotations: list[dict], w: int, h: int, class_of: dict[int, int]) -> dict[str, torch.Tensor]:
    """ConvertCocoPolysToMask: drop crowd, xywh -> xyxy, clamp to the image, drop empty boxes."""
    anns = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    labels = torch.tensor([class_of[a["category_id"]] for a in anns], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return {"boxes": boxes[keep], "labels": labels[keep]}


def get_size_with_aspect_ratio(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) for shorter side `size`, longer side capped near `max_size` (official rule)."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def hflip(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    w = image.width
    boxes = target["boxes"]
    flipped = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
    return F.hflip(image), {**target, "boxes": flipped}


def resize(image: Image.Image, target: dict, size: int, max_size: int | None) -> tuple[Image.Image, dict]:
    oh, ow = get_size_with_aspect_ratio(image.width, image.height, size, max_size)
    out = F.resize(image, [oh, ow])
    ratio_w, ratio_h = float(out.width) / float(image.width), float(out.height) / float(image.height)
    boxes = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    return out, {**target, "boxes": boxes}


def crop(image: Image.Image, target: dict, region: Sequence[int]) -> tuple[Image.Image, dict]:
    top, left, h, w = region
    boxes = target["boxes"] - torch.as_tensor([left, top, left, top])
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([w, h], dtype=torch.float32)).clamp(min=0)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    return F.crop(image, top, left, h, w), {
        **target,
        "boxes": boxes.reshape(-1, 4)[keep],
        "labels": target["labels"][keep],
    }


def normalized_boxes(target: dict, w: int, h: int) -> torch.Tensor:
    """Normalize: xyxy -> cxcywh / (w, h, w, h)."""
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)


def apply_decisions(image: Image.Image, target: dict, decisions: dict, max_size: int = 1333):
    """The train transform with explicit decisions {"flip", "crop": None | (pre, top, left, h, w), "size"}."""
    if decisions["flip"]:
        image, target = hflip(image, target)
    if decisions["crop"] is not None:
        pre_size, *region = decisions["crop"]
        image, target = resize(image, target, pre_size, None)
        image, target = crop(image, target, region)
    return resize(image, target, decisions["size"], max_size)


def draw_decisions(
    rng: random.Random,
    w: int,
    h: int,
    scales: Sequence[int] = SCALES,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
) -> dict:
    """The official train transform's random choices, drawn with Python's `random`."""
    flip = rng.random() < 0.5
    chosen_crop = None
    if rng.random() >= 0.5:
        pre_size = rng.choice(list(crop_resize))
        ph, pw = get_size_with_aspect_ratio(w, h, pre_size, None)
        cw = rng.randint(crop_size[0], min(pw, crop_size[1]))
        ch = rng.randint(crop_size[0], min(ph, crop_size[1]))
        chosen_crop = (pre_size, rng.randint(0, ph - ch), rng.randint(0, pw - cw), ch, cw)
    return {"flip": flip, "crop": chosen_crop, "size": rng.choice(list(scales))}


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    return F.normalize(F.to_tensor(image), MEAN, STD)


class ReferenceCocoDataset(torch.utils.data.Dataset):
    """The official CocoDetection + make_coco_transforms pipeline (Pillow decode, torchvision ops)."""

    def __init__(
        self, images_dir: str | Path, annotation_file: str | Path, train: bool, max_size: int = 1333
    ):
        with open(annotation_file) as f:
            data = json.load(f)
        self.images_dir = Path(images_dir)
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data.get("annotations", []):
            self.anns[ann["image_id"]].append(ann)
        ids = sorted(c["id"] for c in data["categories"])
        self.class_of = {cid: i for i, cid in enumerate(ids)}
        self.train, self.max_size = train, max_size

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, dict]:
        record = self.images[index]
        image = Image.open(self.images_dir / record["file_name"]).convert("RGB")
        target = prepare(self.anns[record["id"]], image.width, image.height, self.class_of)
        return image, {**target, "image_id": record["id"]}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load(index)
        orig = (image.height, image.width)
        if self.train:
            image, target = apply_decisions(image, target, draw_decisions(random, image.width, image.height))
        else:
            image, target = resize(image, target, 800, self.max_size)
        return to_normalized_tensor(image), {
            "boxes": normalized_boxes(target, image.width, image.height),
            "labels": target["labels"],
            "image_id": torch.tensor(target["image_id"]),
            "orig_size": torch.tensor(orig),
            "size": torch.tensor([image.height, image.width]),
        }


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """util.misc.nested_tensor_from_tensor_list: zero padding to the largest image, mask True on padding."""
    images, targets = zip(*batch)
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = torch.zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, list(targets)
