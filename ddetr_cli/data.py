"""The Python face of ddetr's Rust data pipeline (`ddetr_cli._loader`).

    CocoLoader(images_dir, annotation_file, train, batch_size, workers=2, seed=0, rank=0, world_size=1, ...)
        iterable of (images [B, 3, H, W] float32 ImageNet-normalised, mask [B, H, W] bool True on padding,
        targets: list of {"boxes" [N, 4] cxcywh in [0, 1], "labels" [N] int64, "image_id" int64,
        "orig_size" [2] (h, w), "size" [2] (h, w)})
    ImageListLoader(paths, batch_size, workers=2, val_size=800, max_size=1333)
        iterable of (images, mask, infos: list of {"path", "orig_size", "size"})
    DataError
        bad input (annotation file, image); a ValueError whose one-line message names the file

Decoding, the official Deformable DETR augmentations, normalisation and padding all run in Rust
worker threads with the GIL released; batches arrive as NumPy arrays that own the Rust buffers and
are wrapped by `torch.from_numpy` without a copy. Augmentation is a pure function of
(seed, epoch, image index), so results do not depend on the number of workers; call `set_epoch(n)`
before each epoch (as with `DistributedSampler`) to get a new shuffle and new augmentations;
`set_epoch(n, start_batch=k)` resumes an epoch at batch k without decoding the batches before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any, NamedTuple, Union

import torch

from ddetr_cli import _loader

DataError = _loader.DataError
DataError.__module__ = __name__  # tracebacks read `ddetr_cli.data.DataError: <file>: <problem>`
DEFAULT_MAX_PIXELS: int = _loader.DEFAULT_MAX_PIXELS
"""Default pixel budget of one image (width x height): 8000 x 8000."""
PathArg = Union[str, "PathLike[str]"]

__all__ = ["CocoLoader", "ImageListLoader", "DataError", "DEFAULT_MAX_PIXELS", "ScannedImage", "scan_images"]


def _size_tensor(hw: tuple[int, int]) -> torch.Tensor:
    return torch.tensor(hw, dtype=torch.int64)


def _unpack(raw: tuple) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], tuple]:
    """Wraps the Rust arrays of one batch as tensors (no copies) and splits boxes/labels per image."""
    images, mask, boxes, labels, counts, *rest = raw
    boxes_t = torch.from_numpy(boxes).split(counts)
    labels_t = torch.from_numpy(labels).split(counts)
    return torch.from_numpy(images), torch.from_numpy(mask), list(boxes_t), list(labels_t), tuple(rest)


def batch_from_raw(raw: tuple) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """(images, mask, targets) from one raw batch tuple of `_loader` (see `_loader.pyi`)."""
    images, mask, boxes, labels, (image_ids, orig_sizes, sizes, _paths, _address) = _unpack(raw)
    targets = [
        {
            "boxes": b,
            "labels": lab,
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": _size_tensor(orig),
            "size": _size_tensor(size),
        }
        for b, lab, image_id, orig, size in zip(boxes, labels, image_ids, orig_sizes, sizes)
    ]
    return images, mask, targets


class CocoLoader:
    """Batches of a COCO detection dataset with the official Deformable DETR transforms.

    train=True: random horizontal flip, then either a multi-scale resize (shorter side in `scales`,
    longer side <= `max_size`) or resize to `crop_resize` + random crop in `crop_size` + multi-scale
    resize (that branch with probability `crop_prob`, officially 0.5); crowd boxes dropped.
    train=False: shorter side `val_size`, longer side <= `max_size`.
    Shuffling (default: train) and drop_last (default: train) follow the official main.py; with
    world_size > 1 every rank gets an equal-length shard, padded by repetition like
    `DistributedSampler`. label_mapping="compact" numbers categories 0..K-1 in sorted id order;
    "raw" uses the category ids themselves (official COCO: 91 classes). on_bad_image="skip" leaves
    unreadable images out of their batch and lists them in `.skipped`; "error" raises DataError.
    `workers` threads decode and augment; at most `prefetch` batches (default 2 x workers) are built
    ahead of the consumer, which bounds memory. An image whose header claims more than `max_pixels`
    (width x height, default 8000 x 8000) is refused before any pixel is allocated, like a corrupt
    one. Iterate after `set_epoch(epoch)`; `len()` counts batches on this rank (a batch whose every
    image was skipped is passed over).
    """

    def __init__(
        self,
        images_dir: PathArg,
        annotation_file: PathArg,
        train: bool,
        batch_size: int,
        workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        shuffle: bool | None = None,
        label_mapping: str = "compact",
        on_bad_image: str = "error",
        scales: Sequence[int] | None = None,
        max_size: int = 1333,
        val_size: int = 800,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
        prefetch: int | None = None,
        crop_prob: float = 0.5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._core = _loader.CocoLoaderCore(
            str(images_dir),
            str(annotation_file),
            bool(train),
            int(batch_size),
            workers=int(workers),
            seed=int(seed),
            rank=int(rank),
            world_size=int(world_size),
            drop_last=drop_last,
            shuffle=shuffle,
            label_mapping=label_mapping,
            on_bad_image=on_bad_image,
            scales=None if scales is None else [int(s) for s in scales],
            max_size=int(max_size),
            val_size=int(val_size),
            crop_resize=[int(s) for s in crop_resize],
            crop_size=(int(crop_size[0]), int(crop_size[1])),
            prefetch=prefetch,
            crop_prob=float(crop_prob),
            max_pixels=int(max_pixels),
        )
        self.train = bool(train)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the shuffle and augmentations of epoch `epoch` for the next iterations.

        `start_batch` (mid-epoch resume): iterations begin at batch `start_batch` of the epoch's
        plan and yield exactly the batches a full iteration yields from there on; the batches
        before it are not decoded. It counts planned batches, including any whose images were
        all skipped (`on_bad_image="skip"`). `len()` still counts the whole epoch."""
        if not 0 <= int(start_batch) <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._core)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]]:
        for raw in self._core.epoch(self.epoch, self.start_batch):
            yield batch_from_raw(raw)

    @property
    def num_images(self) -> int:
        """Images in the annotation file (all ranks)."""
        return self._core.num_images

    @property
    def num_classes(self) -> int:
        return self._core.num_classes

    @property
    def category_ids(self) -> list[int]:
        """Class index -> COCO category id."""
        return self._core.category_ids

    @property
    def class_names(self) -> list[str]:
        return self._core.class_names

    @property
    def image_ids(self) -> list[int]:
        """Dataset index -> image id (images sorted by id, as in the official dataset)."""
        return self._core.image_ids

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(file, reason) of every image skipped so far (on_bad_image="skip")."""
        return self._core.skipped()

    def batch_indices(self, epoch: int | None = None) -> list[list[int]]:
        """Dataset indices of every batch of an epoch on this rank (default: the current epoch)."""
        return self._core.plan(self.epoch if epoch is None else int(epoch))

    def sample(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """One transformed image (uint8 [H, W, 3], before normalisation) with its target and the
        augmentation decisions drawn for it (`flip`, `crop` = (pre_size, top, left, h, w) or None,
        `size`); the same draw the batches of that epoch use. For tests and debugging."""
        return self._core.sample(int(index), self.epoch if epoch is None else int(epoch))


class ImageListLoader:
    """Batches of image files resized for inference (shorter side `val_size`, longer <= `max_size`).

    Yields (images, mask, infos) with infos dicts {"path": str, "orig_size": [2] (h, w),
    "size": [2] (h, w)}. Unreadable files, and files over `max_pixels` (width x height), are skipped
    and listed in `.skipped` as (file, reason).
    """

    def __init__(
        self,
        paths: Sequence[PathArg],
        batch_size: int,
        workers: int = 2,
        val_size: int = 800,
        max_size: int = 1333,
        prefetch: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._core = _loader.ImageListCore(
            [str(p) for p in paths],
            int(batch_size),
            workers=int(workers),
            val_size=int(val_size),
            max_size=int(max_size),
            prefetch=prefetch,
            max_pixels=int(max_pixels),
        )

    def __len__(self) -> int:
        return len(self._core)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]]:
        for raw in self._core.epoch():
            images, mask, _, _, (_, orig_sizes, sizes, paths, _) = _unpack(raw)
            infos = [
                {"path": p, "orig_size": _size_tensor(o), "size": _size_tensor(s)}
                for p, o, s in zip(paths, orig_sizes, sizes)
            ]
            yield images, mask, infos

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self._core.skipped()


class ScannedImage(NamedTuple):
    """What the header of one image file says (see `scan_images`)."""

    path: str
    width: int
    height: int
    format: str  # "jpeg", "png", or "" when unknown
    error: str | None  # why the loader would refuse the file; None when it reads it
    file_size: int  # bytes


def scan_images(
    paths: Sequence[PathArg], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None
) -> list[ScannedImage]:
    """Reads the header of every file (no pixels decoded; Rust threads, GIL released), in order.

    Finds missing, unreadable, non-JPEG/PNG and oversized files (over `max_pixels`, with their
    size); data that is corrupt after the header shows only when the image is decoded."""
    names = [str(p) for p in paths]
    rows = _loader.scan_images(names, int(max_pixels), workers)
    return [ScannedImage(name, *row) for name, row in zip(names, rows)]
