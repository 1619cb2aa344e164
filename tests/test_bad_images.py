"""Damaged and unusual image files through the real loader path (issue 14).

Each case asserts the exact outcome: loaded like Pillow, a one-line DataError naming the file, or a
counted skip. The corpus is written by Pillow at test time (`bad_inputs.py`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from bad_inputs import (
    noise,
    write_coco,
    write_cut_jpeg,
    write_exif_rotated,
    write_extreme,
    write_forged_jpeg,
    write_forged_png,
    write_gray16_png,
)
from model_helpers import one_thread as one_thread
from model_helpers import tiny_config
from PIL import Image

from ddetr_cli import _loader
from ddetr_cli.data import DEFAULT_MAX_PIXELS, CocoLoader, DataError, ImageListLoader, scan_images


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def coco_loader(root, files, **kwargs) -> CocoLoader:
    """A val CocoLoader over `files`, one image per batch; val_size equal to an image's shorter side
    leaves it unresized (official `get_size_with_aspect_ratio`)."""
    images_dir, ann = write_coco(root, files)
    settings = dict(train=False, batch_size=1, workers=1, val_size=64, max_size=100000)
    return CocoLoader(images_dir, ann, **{**settings, **kwargs})


def only_error(loader) -> str:
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_forged_header_is_refused_from_the_header_naming_the_file(images, suffix):
    writer = write_forged_jpeg if suffix == "jpg" else write_forged_png
    forged = writer(images / f"forged.{suffix}")
    assert forged.stat().st_size < 40_000  # a small file claiming 30000 x 30000 (2.7 GB as RGB)
    message = only_error(coco_loader(images.parent, [forged.name]))
    assert message == (
        f"{forged}: cannot decode image: 30000x30000 pixels exceed the budget of {DEFAULT_MAX_PIXELS} "
        "pixels (raise max_pixels to read it)"
    )
    # With the skip policy it is one counted skip among good images.
    Image.fromarray(noise(40, 50)).save(images / "good.png")
    loader = coco_loader(images.parent, ["good.png", forged.name], on_bad_image="skip")
    assert [t["image_id"].item() for _, _, targets in loader for t in targets] == [1]
    assert loader.skipped == [(str(forged), message.split(": ", 1)[1])]
    listed = ImageListLoader([images / "good.png", forged], batch_size=2, workers=1)
    assert [info["path"] for _, _, infos in listed for info in infos] == [str(images / "good.png")]
    assert [path for path, _ in listed.skipped] == [str(forged)]


def test_the_pixel_budget_is_an_option(images):
    Image.fromarray(noise(200, 300)).save(images / "photo.png")
    refused = only_error(coco_loader(images.parent, ["photo.png"], max_pixels=300 * 200 - 1))
    assert "300x200 pixels exceed the budget of 59999" in refused
    loader = coco_loader(images.parent, ["photo.png"], max_pixels=300 * 200, val_size=200)
    assert next(iter(loader))[0].shape == (1, 3, 200, 300)


def run_capped(code: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python whose address space is capped by `prlimit --as`."""
    return subprocess.run(
        ["prlimit", f"--as={limit_bytes}", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_forged_header_under_a_memory_cap_never_aborts(images, suffix):
    """Under `prlimit --as` a 2.7 GB allocation fails: it must be an error, not an abort. With the
    default budget the header is refused first; with the budget raised past it, the fallible
    allocation of the pixel buffer reports the failure."""
    writer = write_forged_jpeg if suffix == "jpg" else write_forged_png
    forged = writer(images / f"forged.{suffix}")
    code = f"""
        from ddetr_cli import _loader
        for budget in (_loader.DEFAULT_MAX_PIXELS, 30000 * 30000):
            core = _loader.ImageListCore([{str(forged)!r}], 1, workers=1, max_pixels=budget)
            assert list(core.epoch()) == []
            print(core.skipped()[0][1])
    """
    result = run_capped(code, 1536 << 20)
    assert result.returncode == 0, result.stderr[-2000:]
    budget, allocation = result.stdout.splitlines()
    assert "30000x30000 pixels exceed the budget" in budget
    assert allocation == "cannot decode image: out of memory for 2700000000 bytes of pixels"


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cut_short_with_an_end_marker_is_an_error(images, progressive):
    """Pillow (libjpeg) only warns about such a file and fills the rest with grey; the loader
    refuses it, so nothing trains on the garbage below the cut."""
    cut = write_cut_jpeg(images / "cut.jpg", progressive=progressive)
    message = only_error(coco_loader(images.parent, [cut.name]))
    assert message == f"{cut}: cannot decode image: JPEG: image data ends early (file cut short?)"
    listed = ImageListLoader([cut], batch_size=1, workers=1)
    assert list(listed) == []
    assert listed.skipped == [(str(cut), message.split(": ", 1)[1])]


@pytest.mark.parametrize("full_range", [False, True])
def test_16bit_grayscale_png_decodes_like_pillow(images, full_range):
    path = write_gray16_png(images / "gray16.png", full_range)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        expected = np.asarray(im.convert("RGB"))
    assert expected.max() == 255 and expected[0, 1, 0] > 0  # neither black nor all clipped
    sample = coco_loader(images.parent, [path.name], val_size=48).sample(0)
    np.testing.assert_array_equal(sample["image"], expected)


@pytest.mark.parametrize("size", [(3000, 1), (1, 3000), (3000, 2), (1, 1)])
def test_extreme_aspect_ratios_load_and_run_through_the_model(images, size):
    """Every side stays >= 1 pixel (officially round(1333 / 3000) = 0), batched with a normal
    image, and a tiny model runs on the batch, smallest feature maps included."""
    from ddetr_cli.model import build_model

    w, h = size
    odd = write_extreme(images / f"odd_{w}x{h}.png", w, h)
    normal = write_extreme(images / "normal.jpg", 60, 40)
    loader = ImageListLoader([odd, normal], batch_size=2, workers=1, val_size=32, max_size=64)
    batches = list(loader)
    assert loader.skipped == [] and len(batches) == 1
    batch, mask, infos = batches[0]
    out_h, out_w = (int(v) for v in infos[0]["size"])
    assert out_h >= 1 and out_w >= 1
    assert tuple(int(v) for v in infos[0]["orig_size"]) == (h, w)
    assert batch.shape[2:] == mask.shape[1:] and (~mask[0]).sum() == out_h * out_w
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    with torch.no_grad():
        out = model(batch, mask)
    assert torch.isfinite(out["pred_boxes"]).all() and torch.isfinite(out["pred_logits"]).all()
    # Training transforms (crop branch included) on the same file.
    train = coco_loader(images.parent, [odd.name], train=True, batch_size=1, crop_prob=1.0, max_size=64)
    train.set_epoch(0)
    images_batch, train_mask, _ = next(iter(train))
    assert min(images_batch.shape[2:]) >= 1 and train_mask.shape[1:] == images_batch.shape[2:]


def test_exif_orientation_is_ignored_by_every_reader(images):
    """The loader and the drawing reader see the stored pixels (as the official code and COCO
    boxes do), not the EXIF-rotated view that cv2.imread gives by default."""
    import cv2

    from ddetr_cli.plots import read_image_raw

    path = write_exif_rotated(images / "rotated.jpg")
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == 6
        raw = np.asarray(im.convert("RGB"))
    assert raw.shape == (64, 96, 3)
    assert cv2.imread(str(path), cv2.IMREAD_COLOR).shape == (96, 64, 3)  # OpenCV's default rotates
    drawn_on = read_image_raw(path)
    assert drawn_on.shape == raw.shape
    assert np.abs(drawn_on[..., ::-1].astype(int) - raw).mean() < 2
    loaded = coco_loader(images.parent, [path.name]).sample(0)["image"]
    assert loaded.shape == raw.shape and np.abs(loaded.astype(int) - raw).mean() < 2
    assert read_image_raw(images / "missing.jpg") is None


def test_scan_images_reads_headers_only(images):
    good = write_extreme(images / "good.jpg", 40, 30)
    forged = write_forged_png(images / "forged.png")
    cut = write_cut_jpeg(images / "cut.jpg")
    text = images / "notes.png"
    text.write_text("not an image")
    rows = scan_images([good, forged, cut, text, images / "missing.jpg"], workers=2)
    assert [(r.width, r.height, r.format, r.error, r.file_size) for r in rows[:1]] == [
        (40, 30, "jpeg", None, good.stat().st_size)
    ]
    assert (rows[1].width, rows[1].height, rows[1].format) == (30000, 30000, "png")
    assert "exceed the budget" in rows[1].error
    assert rows[2].error is None and (rows[2].width, rows[2].height) == (128, 128)  # header intact
    assert rows[3].error == "cannot decode image: unsupported format (only JPEG and PNG are read)"
    assert rows[4].error.startswith("cannot read file") and rows[4].file_size == 0
    assert [r.path for r in rows] == [str(p) for p in (good, forged, cut, text, images / "missing.jpg")]
    assert _loader.scan_images([str(forged)], 30000 * 30000)[0][3] is None
    # Headers longer than the 16 KB read first: the whole file is read.
    Image.fromarray(noise(30, 40)).save(images / "commented.jpg", comment=b"c" * 40_000)
    assert scan_images([images / "commented.jpg"])[0][1:5] == (40, 30, "jpeg", None)
