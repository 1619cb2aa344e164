"""The Rust data pipeline (`ddetr_cli.data`) against a Pillow/torchvision reference of the official
transforms (`ddetr_cli.loader_reference`), plus sharding, determinism, batching and bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr_cli import _loader
from ddetr_cli import loader_reference as ref
from ddetr_cli.data import CocoLoader, DataError, ImageListLoader, batch_from_raw


def _split(root: Path, name: str) -> tuple[Path, Path]:
    return root / name, root / "annotations" / f"instances_{name}.json"


def _reference_for(loader: CocoLoader, root: Path, split: str) -> ref.ReferenceCocoDataset:
    images_dir, ann = _split(root, split)
    return ref.ReferenceCocoDataset(images_dir, ann, train=split == "train")


def _mad255(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in units of 1/255."""
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- faithfulness -----------------------------------------------------------------------------


def test_train_augmentation_replays_identically_in_reference(synthetic_coco):
    loader = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=2, seed=3)
    reference = _reference_for(loader, synthetic_coco, "train")
    seen = {"flip": 0, "crop": 0, "plain": 0}
    for epoch in range(3):
        for index in range(loader.num_images):
            sample = loader.sample(index, epoch)
            d = sample["decisions"]
            seen["flip"] += d["flip"]
            seen["crop" if d["crop"] is not None else "plain"] += 1
            image, target = reference.load(index)
            assert sample["orig_size"] == (image.height, image.width)
            out, out_target = ref.apply_decisions(image, target, d)
            assert sample["size"] == (out.height, out.width)
            expected = ref.normalized_boxes(out_target, out.width, out.height)
            assert torch.equal(torch.from_numpy(sample["boxes"]), expected), (index, epoch, d)
            assert sample["labels"].tolist() == out_target["labels"].tolist()
            assert _mad255(sample["image"], np.asarray(out)) <= 1.0, (index, epoch, d)
    assert min(seen.values()) >= 3, seen


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_crop_prob_switches_the_crop_branch_off_and_on(synthetic_coco, crop_prob):
    kwargs = {"train": True, "batch_size": 2, "seed": 3}
    loader = CocoLoader(*_split(synthetic_coco, "train"), crop_prob=crop_prob, **kwargs)
    official = CocoLoader(*_split(synthetic_coco, "train"), **kwargs)
    for index in range(loader.num_images):
        d, o = loader.sample(index)["decisions"], official.sample(index)["decisions"]
        assert (d["crop"] is not None) == (crop_prob == 1.0)
        assert d["flip"] == o["flip"]  # the other draws are those of the official 0.5


def test_crop_prob_out_of_range_is_a_value_error(synthetic_coco):
    with pytest.raises(ValueError, match="crop_prob"):
        CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=2, crop_prob=1.5)


def test_val_batches_match_reference_pipeline(synthetic_coco):
    loader = CocoLoader(*_split(synthetic_coco, "val"), train=False, batch_size=3)
    reference = _reference_for(loader, synthetic_coco, "val")
    order = [i for batch in loader.batch_indices() for i in batch]
    assert order == list(range(loader.num_images))  # eval: no shuffle
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 4 images, batch 3, no drop_last at eval
    k = 0
    for images, _mask, targets in batches:
        for b, target in enumerate(targets):
            ref_image, ref_target = reference[k]
            h, w = target["size"].tolist()
            assert ref_image.shape[1:] == (h, w)
            assert min(h, w) == 800 or max(h, w) >= 1330
            diff = (images[b, :, :h, :w] - ref_image).abs() * torch.tensor(ref.STD).view(3, 1, 1)
            assert diff.mean().item() <= 1.0 / 255, k
            assert torch.equal(target["boxes"], ref_target["boxes"])
            assert torch.equal(target["labels"], ref_target["labels"])
            assert target["image_id"].item() == ref_target["image_id"].item()
            assert target["orig_size"].tolist() == ref_target["orig_size"].tolist()
            k += 1


def test_batch_pixels_are_imagenet_normalisation_of_sample(synthetic_coco):
    loader = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=4, seed=1)
    images, mask, targets = next(iter(loader))
    first = loader.batch_indices()[0]
    for b, index in enumerate(first):
        sample = loader.sample(index, 0)
        expected = ref.to_normalized_tensor(Image.fromarray(sample["image"]))
        h, w = targets[b]["size"].tolist()
        # Same u8 pixels; normalised as `v * a + b` (within 1e-6 of torchvision's two divisions).
        assert (images[b, :, :h, :w] - expected).abs().max().item() <= 1e-5


# -- batching -----------------------------------------------------------------------------------


def test_padding_is_zero_and_mask_marks_it(synthetic_coco):
    loader = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=4, seed=0)
    for images, mask, targets in loader:
        assert images.dtype == torch.float32 and mask.dtype == torch.bool
        assert images.shape[0] == mask.shape[0] == len(targets) == 4
        assert images.shape[2:] == mask.shape[1:]
        hs, ws = zip(*(t["size"].tolist() for t in targets))
        assert images.shape[2:] == (max(hs), max(ws))
        for b, t in enumerate(targets):
            h, w = t["size"].tolist()
            assert not mask[b, :h, :w].any()
            assert mask[b].sum().item() == mask.shape[1] * mask.shape[2] - h * w
            assert (images[b][:, mask[b]] == 0).all()
            boxes = t["boxes"]
            assert boxes.dtype == torch.float32 and t["labels"].dtype == torch.int64
            assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()


def test_batches_are_handed_over_without_copies(synthetic_coco):
    loader = CocoLoader(*_split(synthetic_coco, "val"), train=False, batch_size=2)
    raw = next(iter(loader._core.epoch(0)))
    images_np, address = raw[0], raw[-1]
    assert images_np.ctypes.data == address  # the NumPy array views the Rust allocation
    assert not images_np.flags.owndata and images_np.base is not None
    images, mask, _ = batch_from_raw(raw)
    assert images.data_ptr() == address and mask.data_ptr() == raw[1].ctypes.data


# -- order, determinism, sharding ----------------------------------------------------------------


def _all_batches(loader: CocoLoader) -> list:
    return [(imgs, [t["image_id"].item() for t in tg], [t["boxes"] for t in tg]) for imgs, _, tg in loader]


def test_same_seed_and_epoch_give_identical_batches_whatever_the_workers(synthetic_coco):
    a = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=2, seed=7, workers=1)
    b = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=2, seed=7, workers=2, prefetch=1)
    a.set_epoch(4)
    b.set_epoch(4)
    for (ia, ida, ba), (ib, idb, bb) in zip(_all_batches(a), _all_batches(b)):
        assert ida == idb and torch.equal(ia, ib)
        assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    assert a.batch_indices(4) != a.batch_indices(5)  # a new epoch reshuffles
    c = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=2, seed=8)
    assert c.batch_indices(4) != a.batch_indices(4)


def test_start_batch_resumes_mid_epoch_with_the_full_epochs_tail(synthetic_coco):
    loader = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=2, seed=3)
    loader.set_epoch(2)
    full = [(imgs, mask, tg) for imgs, mask, tg in loader]
    assert len(full) == len(loader) == 4
    loader.set_epoch(2, start_batch=1)
    tail = list(loader)
    assert len(tail) == 3 and len(loader) == 4  # len() still counts the whole epoch
    for (ia, ma, ta), (ib, mb, tb) in zip(full[1:], tail):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
        for a, b in zip(ta, tb):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loader.set_epoch(2, start_batch=4)
    assert list(loader) == []
    loader.set_epoch(3)
    assert [t["image_id"].item() for _, _, tg in loader for t in tg] == [
        loader.image_ids[i] for batch in loader.batch_indices() for i in batch
    ]
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(2, start_batch=5)


def test_start_batch_does_not_decode_the_batches_before_it(synthetic_coco, tmp_path):
    """An unreadable image in a skipped batch is never opened, so it is never reported."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_coco, root)
    loader = CocoLoader(*_split(root, "train"), train=True, batch_size=2, seed=3, on_bad_image="skip")
    loader.set_epoch(1)
    first = loader.batch_indices()[0]
    records = json.loads(_split(root, "train")[1].read_text())["images"]
    by_id = {im["id"]: im["file_name"] for im in records}
    (root / "train" / by_id[loader.image_ids[first[0]]]).write_bytes(b"not an image")
    loader.set_epoch(1, start_batch=1)
    assert len(list(loader)) == 3 and loader.skipped == []
    loader.set_epoch(1)
    assert len(list(loader)) == 4 and len(loader.skipped) == 1


def test_shards_are_disjoint_with_equal_lengths(synthetic_coco):
    n = 8
    for world in (2, 3):
        shards = []
        for rank in range(world):
            loader = CocoLoader(
                *_split(synthetic_coco, "train"),
                train=True,
                batch_size=1,
                seed=2,
                rank=rank,
                world_size=world,
            )
            loader.set_epoch(1)
            shards.append([i for batch in loader.batch_indices() for i in batch])
            assert len(loader) == -(-n // world)
        assert len({len(s) for s in shards}) == 1
        flat = [i for s in shards for i in s]
        assert set(flat) == set(range(n))
        assert len(flat) - n == (-n) % world  # only DistributedSampler's padding repeats
    with pytest.raises(ValueError, match="rank"):
        CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=1, rank=2, world_size=2)


def test_drop_last_defaults_follow_official_training(synthetic_coco):
    train = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=3)
    assert len(train) == 2 and len(list(train)) == 2  # 8 images: last partial batch dropped
    keep = CocoLoader(*_split(synthetic_coco, "train"), train=True, batch_size=3, drop_last=False)
    assert len(keep) == 3 and [len(t) for _, _, t in keep] == [3, 3, 2]


# -- annotation semantics -------------------------------------------------------------------------


CATEGORIES = [{"id": 3, "name": "a"}, {"id": 90, "name": "b"}, {"id": 11, "name": "c"}]


def _write_image(path: Path, size=(64, 48), color=(120, 30, 200), fmt="JPEG", **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt, **kwargs)


def _dataset(
    tmp_path: Path, images: list[dict], annotations: list[dict], categories=None
) -> tuple[Path, Path]:
    for im in images:
        if not (tmp_path / "img" / im["file_name"]).exists():
            _write_image(tmp_path / "img" / im["file_name"])
    ann = tmp_path / "ann.json"
    data = {
        "info": {"year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories or CATEGORIES,
    }
    ann.write_text(json.dumps(data))
    return tmp_path / "img", ann


def _ann(i, image_id, cat, bbox, **extra):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1.0, **extra}


def test_crowd_empty_images_and_category_mappings(tmp_path):
    images = [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 48}, {"id": 2, "file_name": "b.jpg"}]
    anns = [
        _ann(1, 5, 90, [10, 10, 20, 10], segmentation=[[10, 10, 30, 10, 30, 20]], iscrowd=0),
        _ann(2, 5, 3, [0, 0, 64, 48], segmentation={"counts": "xyz", "size": [48, 64]}, iscrowd=1),
        _ann(3, 5, 11, [5, 5, 0, 10], iscrowd=0),  # degenerate: removed
        _ann(4, 5, 11, [60, 40, 30, 30]),  # clipped to the image
    ]
    images_dir, ann = _dataset(tmp_path, images, anns)
    for mapping, expected_labels, num_classes in (("compact", [2, 1], 3), ("raw", [90, 11], 91)):
        loader = CocoLoader(images_dir, ann, train=False, batch_size=2, label_mapping=mapping, val_size=48)
        assert loader.num_classes == num_classes
        assert loader.image_ids == [2, 5]
        _, _, (t_empty, t) = next(iter(loader))
        assert t_empty["boxes"].shape == (0, 4) and t_empty["labels"].shape == (0,)
        assert t["labels"].tolist() == expected_labels
        assert torch.allclose(t["boxes"][1], torch.tensor([62 / 64, 44 / 48, 4 / 64, 8 / 48]))
    compact = CocoLoader(images_dir, ann, train=False, batch_size=1)
    assert compact.category_ids == [3, 11, 90] and compact.class_names == ["a", "c", "b"]
    raw = CocoLoader(images_dir, ann, train=False, batch_size=1, label_mapping="raw")
    assert raw.category_ids == list(range(91)) and raw.class_names[90] == "b" and raw.class_names[0] == "N/A"


# -- bad input --------------------------------------------------------------------------------------


def _one_image_dataset(tmp_path: Path, file_name="a.jpg") -> tuple[Path, Path]:
    return _dataset(tmp_path, [{"id": 1, "file_name": file_name}], [_ann(1, 1, 3, [1, 1, 5, 5])])


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "empty", "not_an_image"])
def test_bad_image_errors_or_is_skipped(tmp_path, damage):
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    images_dir, ann = _dataset(tmp_path, images, [_ann(1, 1, 3, [1, 1, 5, 5])])
    bad = images_dir / "2.jpg"
    data = bad.read_bytes()
    if damage == "missing":
        bad.unlink()
    elif damage == "corrupt":
        bad.write_bytes(data[:20] + bytes(range(256)) * 4 + data[20 + 1024 :])
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("hello")
    strict = CocoLoader(images_dir, ann, train=False, batch_size=3)
    with pytest.raises(DataError, match=r"2\.jpg"):
        list(strict)
    lenient = CocoLoader(images_dir, ann, train=True, batch_size=3, on_bad_image="skip")
    (images, mask, targets), *_ = list(lenient)
    assert [t["image_id"].item() for t in targets] in ([1, 3], [3, 1])
    assert [Path(p).name for p, _ in lenient.skipped] == ["2.jpg"]
    assert lenient.skipped[0][1]


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.jpg", "sub/../../x.jpg"])
def test_unsafe_file_names_are_rejected(tmp_path, name):
    images_dir, ann = _dataset(tmp_path, [{"id": 1, "file_name": "ok.jpg"}], [])
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = name
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unsafe file_name"):
        CocoLoader(images_dir, ann, train=False, batch_size=1)


def test_malformed_json_names_file_and_position(tmp_path):
    images_dir, ann = _one_image_dataset(tmp_path)
    ann.write_text('{\n  "images": [\n    {"id": 1, "file_name": "a.jpg",}\n  ]\n}')
    with pytest.raises(DataError, match=r"ann\.json.*line 3 column"):
        CocoLoader(images_dir, ann, train=False, batch_size=1)
    ann.write_text(
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 3}],\n'
        ' "annotations": [{"id": 1, "image_id": 1, "category_id": 3}]}'
    )
    with pytest.raises(DataError, match=r"ann\.json.*missing field `bbox`.*line 2"):
        CocoLoader(images_dir, ann, train=False, batch_size=1)
    ann.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}]}')
    with pytest.raises(DataError, match="missing field `categories`"):
        CocoLoader(images_dir, ann, train=False, batch_size=1)
    with pytest.raises(DataError, match="nope.json"):
        CocoLoader(images_dir, tmp_path / "nope.json", train=False, batch_size=1)
    with pytest.raises(DataError, match="images directory not found"):
        CocoLoader(tmp_path / "nodir", ann, train=False, batch_size=1)
    with pytest.raises(ValueError, match="label_mapping"):
        CocoLoader(images_dir, ann, train=False, batch_size=1, label_mapping="dense")
    assert issubclass(DataError, ValueError)


# -- decoding ------------------------------------------------------------------------------------


def _pattern(w=40, h=30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 8, 255 - x * 3], -1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "name, make",
    [
        ("gray.jpg", lambda p: Image.fromarray(_pattern()[..., 0]).save(p, quality=90)),
        ("cmyk.jpg", lambda p: Image.fromarray(_pattern()).convert("CMYK").save(p, quality=95)),
        ("progressive.jpg", lambda p: Image.fromarray(_pattern()).save(p, quality=90, progressive=True)),
        ("exif_rotated.jpg", lambda p: _save_with_orientation(p)),
        ("palette.png", lambda p: Image.fromarray(_pattern()).quantize(12).save(p)),
        ("rgba.png", lambda p: Image.fromarray(np.dstack([_pattern(), _pattern()[..., :1]])).save(p)),
        ("la.png", lambda p: Image.fromarray(np.dstack([_pattern()[..., 1]] * 2), "LA").save(p)),
        ("one_bit.png", lambda p: Image.fromarray(_pattern()[..., 0] > 100).save(p)),
    ],
)
def test_decoder_matches_pillow_convert_rgb(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    ours = _loader.decode_file(str(path))
    pil = np.asarray(Image.open(path).convert("RGB"))
    assert ours.shape == pil.shape  # EXIF orientation ignored, as Pillow/torchvision do
    assert _mad255(ours, pil) <= (1.0 if name.endswith(".jpg") else 0.0)


def _save_with_orientation(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" — ignored by the official pipeline
    Image.fromarray(_pattern()).save(path, quality=90, exif=exif)


def test_sixteen_bit_gray_png_is_clipped_like_pillow(tmp_path):
    # Pillow reads mode I;16 and convert("RGB") clips to 255 (issue 14; tests/test_bad_images.py).
    gray16 = (_pattern()[..., 0].astype(np.uint16) * 257) + 1
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    ours = _loader.decode_file(str(tmp_path / "g16.png"))
    assert np.array_equal(ours, np.repeat(np.minimum(gray16, 255).astype(np.uint8)[..., None], 3, -1))
    assert np.array_equal(ours, np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")))


# -- image lists -------------------------------------------------------------------------------------


def test_image_list_loader_resizes_and_skips_unreadable(tmp_path):
    paths = []
    for i, size in enumerate([(64, 48), (30, 60)]):
        _write_image(tmp_path / f"{i}.jpg", size=size)
        paths.append(str(tmp_path / f"{i}.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths.insert(1, str(tmp_path / "bad.jpg"))
    loader = ImageListLoader(paths, batch_size=2, workers=1, val_size=96, max_size=200)
    assert len(loader) == 2
    out = list(loader)
    infos = [i for _, _, batch in out for i in batch]
    assert [i["path"] for i in infos] == [paths[0], paths[2]]
    assert infos[0]["orig_size"].tolist() == [48, 64] and infos[0]["size"].tolist() == [96, 128]
    assert infos[1]["size"].tolist() == [192, 96]
    assert [p for p, _ in loader.skipped] == [paths[1]]


def test_reference_baseline_dataset_runs(synthetic_coco):
    random.seed(0)
    dataset = ref.ReferenceCocoDataset(*_split(synthetic_coco, "train"), train=True)
    images, mask, targets = ref.collate([dataset[0], dataset[1]])
    assert images.shape[0] == 2 and mask.shape == (2, *images.shape[2:]) and len(targets) == 2


def test_copying_a_dataset_keeps_results(synthetic_coco, tmp_path):
    # Paths are resolved against images_dir, so a moved dataset loads identically.
    shutil.copytree(synthetic_coco, tmp_path / "copy")
    a = CocoLoader(*_split(synthetic_coco, "val"), train=False, batch_size=4)
    b = CocoLoader(*_split(tmp_path / "copy", "val"), train=False, batch_size=4)
    (ia, _, _), (ib, _, _) = next(iter(a)), next(iter(b))
    assert torch.equal(ia, ib)


_GIL_SCRIPT = """
import sys, threading
from ddetr_cli.data import ImageListLoader

fifo, jpeg = sys.argv[1], open(sys.argv[2], "rb").read()
loader = ImageListLoader([fifo], batch_size=1, workers=1)
out = {}
reader = threading.Thread(target=lambda: out.setdefault("batch", next(iter(loader))))
reader.start()
# The reader thread now waits inside Rust for a worker blocked on the FIFO. Only if that wait
# released the GIL can this thread run Python and feed the image.
with open(fifo, "wb") as f:
    f.write(jpeg)
reader.join()
print(tuple(out["batch"][0].shape))
"""


def test_gil_is_released_while_waiting_for_a_batch(tmp_path):
    import os
    import subprocess
    import sys

    _write_image(tmp_path / "a.jpg", size=(32, 24))
    os.mkfifo(tmp_path / "fifo.jpg")
    result = subprocess.run(
        [sys.executable, "-c", _GIL_SCRIPT, str(tmp_path / "fifo.jpg"), str(tmp_path / "a.jpg")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 800, 1066)"
