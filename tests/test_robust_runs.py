"""Real data, bad data (issue #14) through train, eval and predict: nothing lost, nothing silent.

Each test feeds the real bad input (files on disk, real JPEGs, real checkpoints) through the real
command and asserts the exact outcome: a one-line error naming the cause, or a counted skip.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import ddetr, error_line
from model_helpers import one_thread as one_thread
from model_helpers import tiny_config
from test_cli_train import train_args

from ddetr_cli import coco_eval, runs
from ddetr_cli.engine.evaluation import score_run
from ddetr_cli.engine.inference import DatasetDetections
from ddetr_cli.model import build_model, model_checkpoint


def _copy(synthetic_coco, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_coco, root)
    return root


def _break(images):
    for path in images:
        path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")


def _tiny_weights(path, num_classes=5, category_ids=(1, 2, 3, 5, 7)):
    config = tiny_config(num_classes=num_classes, category_ids=list(category_ids))
    return runs.atomic_save(model_checkpoint(build_model(config)), path)


def test_checkpoint_is_written_before_evaluation(synthetic_coco, tmp_path, monkeypatch):
    """An evaluation that fails after an epoch leaves that epoch's last.pt behind."""
    import ddetr_cli.engine.evaluation as evaluation

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(evaluation, "score_run", failing_evaluation)
    result = ddetr(*train_args(synthetic_coco, tmp_path, "run", epochs=1))
    assert result.exit_code == 1 and "evaluation exploded" in result.stderr
    last = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["batch_in_epoch"] == 0


def test_no_readable_training_image_is_one_line_naming_files(synthetic_coco, tmp_path):
    root = _copy(synthetic_coco, tmp_path)
    train_images = sorted((root / "train").glob("*.jpg"))
    _break(train_images)
    result = ddetr(*train_args(root, tmp_path / "runs", "run", epochs=1))
    assert result.exit_code == 2
    line = error_line(result)
    assert "no training image could be read" in line and "8 unreadable training images skipped" in line
    assert train_images[0].name in line and "train/loss" not in result.output


def test_unreadable_val_images_are_left_out_of_the_score(synthetic_coco):
    """Perfect detections on the 3 images seen score AP 1, not the 0.75 of counting the 4th as missed."""
    ann = synthetic_coco / "annotations" / "instances_val.json"
    gt = coco_eval.load_ground_truth(ann)
    seen = sorted(gt.getImgIds())[:3]
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
        if a["image_id"] in seen
    ]
    run = DatasetDetections(perfect, seen, [("val/missing.jpg", "no such file")])
    _, metrics = score_run(gt, run, ann)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["images"] == 3 and metrics["skipped_images"] == 1
    with pytest.raises(Exception, match="none of the 4 images could be read"):
        score_run(gt, DatasetDetections([], [], [("a.jpg", "bad")] * 4), ann)


def test_training_with_every_val_image_unreadable_stops_with_the_cause(synthetic_coco, tmp_path):
    root = _copy(synthetic_coco, tmp_path)
    _break((root / "val").glob("*.jpg"))
    result = ddetr(*train_args(root, tmp_path / "runs", "run", epochs=1))
    assert result.exit_code == 2
    assert "none of the 4 images could be read" in error_line(result)
    assert (tmp_path / "runs" / "run" / "weights" / "last.pt").is_file()  # the epoch is kept


@pytest.mark.parametrize(
    "option", [["--lr", "1e-3"], ["--batch-size", "4"], ["--variant", "two-stage"], ["--data", "x"]]
)
def test_resume_refuses_settings_it_would_ignore(tmp_path, option):
    result = ddetr("train", "--resume", tmp_path / "last.pt", *option)
    assert result.exit_code == 2
    line = error_line(result)
    assert f"{option[0]} cannot change when resuming" in line and "--epochs" in line


def test_resume_of_an_empty_or_truncated_file_is_one_line(synthetic_coco, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty.pt: empty file" in error_line(ddetr("train", "--resume", empty))
    truncated = tmp_path / "cut.pt"
    torch.save({"x": torch.zeros(100_000)}, tmp_path / "full.pt")
    truncated.write_bytes((tmp_path / "full.pt").read_bytes()[:50_000])
    evaluation = ("eval", "--weights", truncated, "--data", synthetic_coco)
    for args in (("train", "--resume", truncated), evaluation):
        line = error_line(ddetr(*args))
        assert "cut.pt: truncated or damaged" in line and "If you are seeing" not in line


def test_eval_refuses_weights_whose_classes_do_not_fit(synthetic_coco, tmp_path):
    weights = _tiny_weights(tmp_path / "w.pt", num_classes=3, category_ids=(10, 11, 12))
    result = ddetr("eval", "--weights", weights, "--data", synthetic_coco, "--device", "cpu")
    assert result.exit_code == 2
    assert "do not cover the categories" in error_line(result)


def test_eval_needs_data(tmp_path):
    result = ddetr("eval", "--weights", tmp_path / "w.pt")
    assert result.exit_code == 2 and "--data" in error_line(result)


def test_predict_checks_out_before_running_the_model(synthetic_coco, tmp_path, monkeypatch):
    import ddetr_cli.engine.prediction as prediction

    def never(*args, **kwargs):
        raise AssertionError("the model ran before --out was checked")

    monkeypatch.setattr(prediction, "load_detector", never)
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker / "results.json", tmp_path):
        result = ddetr("predict", synthetic_coco / "val", "--weights", tmp_path / "w.pt", "--out", out)
        assert result.exit_code == 2 and "--out" in error_line(result)


def test_training_skips_some_unreadable_images_with_one_summary(synthetic_coco, tmp_path):
    root = _copy(synthetic_coco, tmp_path)
    broken = sorted((root / "train").glob("*.jpg"))[:2]
    _break(broken)
    # Width 64: a batch left with one image must not meet GroupNorm(32, 32) on a 1x1 map (one value).
    result = ddetr(*train_args(root, tmp_path / "runs", "run", epochs=1), "--hidden-dim", "64")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "unreadable training images" in line]
    assert len(warnings) == 1 and "2 unreadable training images skipped" in warnings[0]
    assert broken[0].name in warnings[0]


def test_training_on_ground_truth_without_area_or_iscrowd(synthetic_coco, tmp_path):
    """Converted datasets often lack area/iscrowd: training and its evaluation fill them, no KeyError."""
    root = _copy(synthetic_coco, tmp_path)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        dataset = json.loads(path.read_text())
        for ann in dataset["annotations"]:
            ann.pop("area", None)
            ann.pop("iscrowd", None)
        path.write_text(json.dumps(dataset))
    result = ddetr(*train_args(root, tmp_path / "runs", "run", epochs=1))
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "runs" / "run" / "metrics.csv").read_text().splitlines()
    assert "val/AP" in rows[0] and len(rows) == 2


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_skipped_images_are_left_out_with_either_backend(synthetic_coco, backend):
    ann = synthetic_coco / "annotations" / "instances_val.json"
    gt = coco_eval.load_ground_truth(ann, backend)
    seen = sorted(gt.getImgIds())[:3]
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
        if a["image_id"] in seen
    ]
    _, metrics = score_run(gt, DatasetDetections(perfect, seen, [("x.jpg", "bad")]), ann, backend)
    assert metrics["AP"] == pytest.approx(1.0)


def test_max_pixels_option_reaches_the_loader(synthetic_coco, tmp_path):
    """--max-pixels below the images' size: every image is a named skip, so predict has nothing."""
    weights = _tiny_weights(tmp_path / "w.pt")
    result = ddetr(
        "predict", synthetic_coco / "val", "-w", weights, "--max-pixels", "100", "--out", tmp_path / "r.json"
    )
    assert result.exit_code == 2 and "none of the images could be read" in error_line(result)
    assert "exceed the budget of 100 pixels" in result.stderr
    report = json.loads(
        ddetr("data", "check", "--data", synthetic_coco, "--max-pixels", "100", "--json").stdout
    )
    assert report["splits"]["val"]["unreadable_count"] == 4 and not report["ok"]
