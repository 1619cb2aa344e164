"""Type stubs of the Rust extension `ddetr_cli._loader` (rust_loader/src/python.rs).

Use `ddetr_cli.data` rather than this module directly.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
DEFAULT_MAX_PIXELS: int

class DataError(ValueError):
    """Bad input data (annotation file, image file); the message names the file."""

# (images f32 [B,3,H,W], mask bool [B,H,W], boxes f32 [M,4] cxcywh normalised, labels i64 [M],
#  counts (boxes per image), image_ids, orig_sizes (h, w), sizes (h, w), paths, images buffer address)
RawBatch = tuple[
    npt.NDArray[np.float32],
    npt.NDArray[np.bool_],
    npt.NDArray[np.float32],
    npt.NDArray[np.int64],
    list[int],
    list[int],
    list[tuple[int, int]],
    list[tuple[int, int]],
    list[str],
    int,
]

class BatchBuffer:
    """Owner of a recycled batch buffer; the base object of the images and mask arrays."""

class BatchIter:
    def __iter__(self) -> Iterator[RawBatch]: ...
    def __next__(self) -> RawBatch: ...
    def __len__(self) -> int: ...

class CocoLoaderCore:
    def __init__(
        self,
        images_dir: str,
        annotation_file: str,
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
        scales: list[int] | None = None,
        max_size: int = 1333,
        val_size: int = 800,
        crop_resize: list[int] | None = None,
        crop_size: tuple[int, int] = (384, 600),
        prefetch: int | None = None,
        crop_prob: float = 0.5,
        max_pixels: int = ...,
    ) -> None: ...
    def __len__(self) -> int: ...
    @property
    def num_images(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def category_ids(self) -> list[int]: ...
    @property
    def class_names(self) -> list[str]: ...
    @property
    def image_ids(self) -> list[int]: ...
    def skipped(self) -> list[tuple[str, str]]: ...
    def epoch(self, epoch: int, start_batch: int = 0) -> BatchIter: ...
    def plan(self, epoch: int) -> list[list[int]]: ...
    def sample(self, index: int, epoch: int) -> dict[str, Any]: ...

class ImageListCore:
    def __init__(
        self,
        paths: list[str],
        batch_size: int,
        workers: int = 2,
        val_size: int = 800,
        max_size: int = 1333,
        prefetch: int | None = None,
        max_pixels: int = ...,
    ) -> None: ...
    def __len__(self) -> int: ...
    def skipped(self) -> list[tuple[str, str]]: ...
    def epoch(self) -> BatchIter: ...

def decode_file(path: str, max_pixels: int = ...) -> npt.NDArray[np.uint8]: ...
def scan_images(
    paths: list[str], max_pixels: int = ..., workers: int | None = None
) -> list[tuple[int, int, str, str | None, int]]:
    """(width, height, format, error, file_size) per file from its header alone, in input order.

    format is "jpeg", "png" or "" (unknown); error is None when the loader would read the file,
    else the one-line reason (unreadable, not JPEG/PNG, corrupt header, over `max_pixels`); width
    and height are 0 when the header is unreadable. Runs on `workers` threads (default: one per
    CPU) with the GIL released; reads about 16 KB per file."""

def parse_annotations(path: str) -> dict[str, int]: ...

# (image_id int64 [N], category_id float64 [N], bbox float64 [N, 4] x y w h, score float64 [N])
DetectionColumns = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]
]

def read_detections(path: str, image_ids: list[int]) -> DetectionColumns:
    """The checked columns of a COCO results file, every detection naming one of `image_ids`;
    parsed by serde_json with the GIL released, the arrays over Rust's allocations. DataError names
    the file and the problem: not UTF-8, not valid JSON (serde_json's message, line, column; NaN
    and Infinity named as such), not a list, or the first bad entry ("detection 7: bbox must be
    [x, y, width, height] numbers"); a syntax error anywhere wins over a bad entry."""

def parse_detections(text: bytes, source: str, image_ids: list[int]) -> DetectionColumns:
    """`read_detections` of a results text in memory; errors name `source`."""

def _rust_owned_array(n: int) -> tuple[npt.NDArray[np.float32], int]: ...
