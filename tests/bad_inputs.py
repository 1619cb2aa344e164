"""A corpus of damaged and unusual image files, written by Pillow at test time (issue 14).

Each writer returns the path it wrote. The files are real: forged headers are real JPEG/PNG files
whose size fields were rewritten (with a valid PNG CRC), cut files are real JPEGs cut short.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3] noise: many entropy-coded bytes per row, so a cut lands mid-image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg_bytes(rgb: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90, **save_args)
    return buffer.getvalue()


def write_forged_jpeg(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 64x64 JPEG (a few KB) whose SOF header claims `width x height`."""
    data = bytearray(jpeg_bytes(noise(64, 64)))
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def write_forged_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 64x64 PNG whose IHDR claims `width x height` (CRC recomputed, so only the size lies)."""
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def write_cut_jpeg(path: Path, progressive: bool = False) -> Path:
    """A 128x128 JPEG cut at half its length, with the end-of-image marker FF D9 appended."""
    data = jpeg_bytes(noise(128, 128, seed=1), progressive=progressive)
    path.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    return path


def write_gray16_png(path: Path, full_range: bool) -> Path:
    """A 16-bit grayscale PNG (Pillow mode I;16): values 0..255, or spread over 0..65535."""
    ramp = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64)
    values = ramp * 21 if full_range else ramp % 256
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def write_extreme(path: Path, width: int, height: int) -> Path:
    """A valid image `width x height` (JPEG or PNG by suffix), e.g. 3000x1."""
    Image.fromarray(noise(height, width, seed=2)).save(path)
    return path


def write_exif_rotated(path: Path, orientation: int = 6) -> Path:
    """A 96x64 (w x h) JPEG with an EXIF orientation tag (6: viewers rotate it to 64x96)."""
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :32] = (220, 30, 30)  # a red band on the left of the stored pixels
    rgb[:, 32:] = (30, 30, 220)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    return path


def write_coco(root: Path, files: list[str]) -> tuple[Path, Path]:
    """A COCO annotation file over `files` (in `root/images`), one box per image; sizes from the
    files where Pillow can read them, else 64x64. Returns (images_dir, annotation_file)."""
    images, annotations = [], []
    for k, name in enumerate(files, start=1):
        try:
            with Image.open(root / "images" / name) as im:
                w, h = im.size
        except Exception:  # the damaged files: their size is not needed by the loader
            w, h = 64, 64
        images.append({"id": k, "file_name": name, "width": w, "height": h})
        box = [0, 0, max(1, w // 2), max(1, h // 2)]
        annotations.append(
            {"id": k, "image_id": k, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    ann = root / "instances.json"
    ann.write_text(json.dumps(coco))
    return root / "images", ann
