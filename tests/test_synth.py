"""Tests for the synthetic COCO generator (ddetr_cli.synth)."""

import hashlib
import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from ddetr_cli.synth import CATEGORIES, LARGE_AREA, SMALL_AREA, make_synthetic_coco


def _load(root, split):
    with open(root / "annotations" / f"instances_{split}.json") as f:
        return json.load(f)


def test_layout_and_coco_json_loads_in_pycocotools(synthetic_coco):
    for split, count in (("train", 8), ("val", 4)):
        coco = COCO(str(synthetic_coco / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == [1, 2, 3, 5, 7]
        assert len(coco.getAnnIds()) > 0
        data = coco.dataset
        assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
            assert ann["iscrowd"] == 0
            assert ann["category_id"] in {c["id"] for c in CATEGORIES}
        assert sorted(p.name for p in (synthetic_coco / split).glob("*.jpg")) == sorted(
            im["file_name"] for im in data["images"]
        )


def test_image_and_annotation_ids_are_unique_across_splits(synthetic_coco):
    train, val = _load(synthetic_coco, "train"), _load(synthetic_coco, "val")
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    assert len(set(image_ids)) == len(image_ids)
    for data in (train, val):
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)


def test_jpegs_decode_with_the_declared_sizes_and_sizes_vary(synthetic_coco):
    shapes = set()
    for split in ("train", "val"):
        for im in _load(synthetic_coco, split)["images"]:
            with open(synthetic_coco / split / im["file_name"], "rb") as f:
                assert f.read(2) == b"\xff\xd8"  # a real JPEG, not a PNG with a .jpg name
            image = cv2.imread(str(synthetic_coco / split / im["file_name"]))
            assert image is not None and image.shape == (im["height"], im["width"], 3)
            assert 96 <= im["height"] <= 160 and 96 <= im["width"] <= 160
            shapes.add(image.shape)
    assert len(shapes) > 1


def test_boxes_lie_inside_images_and_match_their_polygons(synthetic_coco):
    for split in ("train", "val"):
        coco = COCO(str(synthetic_coco / "annotations" / f"instances_{split}.json"))
        for ann in coco.dataset["annotations"]:
            im = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            assert np.allclose(poly.min(0), [x, y], atol=0.02)
            assert np.allclose(poly.max(0), [x + w, y + h], atol=0.02)
            # The polygon area is the COCO area; the rasterised mask agrees with it.
            assert 0 < ann["area"] <= w * h + 1e-6
            assert abs(coco.annToMask(ann).sum() - ann["area"]) <= 0.2 * ann["area"] + 4 * (w + h)


def test_objects_are_drawn_where_annotated(synthetic_coco):
    """The pixels of a mostly unoccluded shape differ from the background ring around its box."""
    data = _load(synthetic_coco, "val")
    checked = 0
    for im in data["images"]:
        image = cv2.imread(str(synthetic_coco / "val" / im["file_name"])).astype(np.float32)
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        coco_mask = np.zeros(image.shape[:2], dtype=np.int32)
        for a in anns:
            pts = np.round(np.asarray(a["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
            cv2.fillPoly(coco_mask, [pts], 1)
        for a in anns[-1:]:  # the last drawn object is on top of the others
            pts = np.round(np.asarray(a["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
            inside = np.zeros(image.shape[:2], dtype=np.uint8)
            cv2.fillPoly(inside, [pts], 1)
            ring = cv2.dilate(inside, np.ones((5, 5), np.uint8)) - inside
            ring = ring.astype(bool) & (coco_mask == 0)
            if inside.sum() < 30 or ring.sum() < 30:
                continue
            contrast = np.abs(image[inside.astype(bool)].mean(0) - image[ring].mean(0)).sum()
            assert contrast > 30, (im["file_name"], a["bbox"], contrast)
            checked += 1
    assert checked >= 2


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", 3, 2, 96, seed=7)
    b = make_synthetic_coco(tmp_path / "b", 3, 2, 96, seed=7)
    c = make_synthetic_coco(tmp_path / "c", 3, 2, 96, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # Each image has its own random stream: more training images leave the first ones and val alone.
    d = make_synthetic_coco(tmp_path / "d", 5, 2, 96, seed=7)
    assert (a / "train" / "000000000001.jpg").read_bytes() == (d / "train" / "000000000001.jpg").read_bytes()
    assert _load(a, "val")["annotations"] == _load(d, "val")["annotations"]


def test_all_coco_size_buckets_and_classes_are_populated(tmp_path):
    root = make_synthetic_coco(tmp_path / "sizes", 30, 0, (192, 256), seed=1)
    anns = _load(root, "train")["annotations"]
    areas = np.array([a["area"] for a in anns])
    small, large = (areas < SMALL_AREA).sum(), (areas >= LARGE_AREA).sum()
    medium = len(areas) - small - large
    assert small >= 0.1 * len(areas) and medium >= 0.1 * len(areas) and large >= 3, (small, medium, large)
    assert {a["category_id"] for a in anns} == {c["id"] for c in CATEGORIES}
    per_image = np.bincount([a["image_id"] for a in anns])[1:]
    assert per_image.max() >= 3  # several objects per image, so overlaps and crowding occur


def test_objects_overlap_sometimes(tmp_path):
    root = make_synthetic_coco(tmp_path / "overlap", 20, 0, 128, seed=2, objects_per_image=(4, 6))
    data = _load(root, "train")
    overlaps = 0
    for im in data["images"]:
        boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == im["id"]]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x0, y0, w0, h0), (x1, y1, w1, h1) = boxes[i], boxes[j]
                if min(x0 + w0, x1 + w1) > max(x0, x1) and min(y0 + h0, y1 + h1) > max(y0, y1):
                    overlaps += 1
    assert overlaps > 0


def test_denser_train_split_leaves_the_val_split_unchanged(tmp_path):
    plain = make_synthetic_coco(tmp_path / "plain", 12, 4, 160, seed=3)
    dense = make_synthetic_coco(tmp_path / "dense", 12, 4, 160, seed=3, train_objects_per_image=(6, 9))
    assert _load(plain, "val") == _load(dense, "val")
    for name in sorted(p.name for p in (plain / "val").iterdir()):
        assert (plain / "val" / name).read_bytes() == (dense / "val" / name).read_bytes()
    per_image = np.bincount([a["image_id"] for a in _load(dense, "train")["annotations"]])[1:]
    plain_count = len(_load(plain, "train")["annotations"])
    assert per_image.sum() > 1.3 * plain_count, (per_image, plain_count)


def test_fixed_int_image_size_gives_square_images(tmp_path):
    root = make_synthetic_coco(tmp_path / "sq", 2, 1, 64)
    for split in ("train", "val"):
        assert all(im["width"] == im["height"] == 64 for im in _load(root, split)["images"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 16}, "at least 32"),
        ({"image_size": (64, 96, 128)}, "pair"),
        ({"num_train": -1}, ">= 0"),
        ({"objects_per_image": (3, 1)}, "objects_per_image"),
        ({"train_objects_per_image": (-1, 4)}, "train_objects_per_image"),
    ],
)
def test_bad_arguments_raise_one_clear_error(tmp_path, kwargs, message):
    args = {"num_train": 1, "num_val": 1, "image_size": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        make_synthetic_coco(tmp_path / "bad", **args)


def test_data_synth_command_writes_a_dataset(tmp_path):
    from typer.testing import CliRunner

    from ddetr_cli.cli import app

    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--num-train", "3", "--num-val", "2", "--image-size", "64,80"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(_load(out, "train")["images"]) == 3 and len(_load(out, "val")["images"]) == 2
    assert all(64 <= im["width"] <= 80 for im in _load(out, "train")["images"])
    assert len(list((out / "val").glob("*.jpg"))) == 2


@pytest.mark.parametrize("size", ["big", "1,2,3", "16"])
def test_data_synth_command_rejects_bad_sizes_in_one_line(tmp_path, size):
    from typer.testing import CliRunner

    from ddetr_cli.cli import app

    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--image-size", size])
    assert result.exit_code == 2
    assert "image" in result.output.lower() and "Traceback" not in result.output
