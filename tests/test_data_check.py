"""`ddetr data check` on real and broken datasets (real JPEGs and JSON on disk)."""

from __future__ import annotations

import json
import shutil

from bad_inputs import write_forged_jpeg
from cli_helpers import ddetr, error_line


def _copy(synthetic_coco, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_coco, root)
    return root


def _edit(path, change):
    dataset = json.loads(path.read_text())
    change(dataset)
    path.write_text(json.dumps(dataset))


def test_a_clean_dataset_reports_its_contents(synthetic_coco):
    result = ddetr("data", "check", "--data", synthetic_coco, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and set(report["splits"]) == {"train", "val"}
    train = report["splits"]["train"]
    gt = json.loads((synthetic_coco / "annotations" / "instances_train.json").read_text())
    assert train["images"] == len(gt["images"]) == 8 and train["annotations"] == len(gt["annotations"])
    assert sum(train["classes"].values()) == len(gt["annotations"])
    assert train["unreadable_count"] == 0
    widths = [im["width"] for im in gt["images"]]
    assert train["width"]["min"] == min(widths) and train["width"]["max"] == max(widths)


def test_problems_training_survives_are_counted_by_name(synthetic_coco, tmp_path):
    root = _copy(synthetic_coco, tmp_path)
    val = sorted((root / "val").glob("*.jpg"))
    val[0].write_bytes(b"not an image")
    write_forged_jpeg(val[1])

    def damage(dataset):
        anns = dataset["annotations"]
        anns[0]["bbox"][2] = 0  # an empty box
        anns[1]["bbox"][0] = -5  # past the left border
        anns[2]["iscrowd"] = 1
        for ann in anns[3:]:
            ann.pop("area", None)  # converted datasets: the validator fills it

    _edit(root / "annotations" / "instances_val.json", damage)
    result = ddetr("data", "check", "--data", root, "--split", "val")
    assert result.exit_code == 0, result.output
    report = json.loads(ddetr("data", "check", "--data", root, "--split", "val", "--json").stdout)
    val_report = report["splits"]["val"]
    assert val_report["unreadable_count"] == 2
    reasons = dict(val_report["unreadable"])
    assert "exceed" in reasons[val[1].name] and val[0].name in reasons
    assert val_report["degenerate_boxes"] == 1 and val_report["boxes_outside_image"] >= 1
    assert val_report["crowd_boxes"] == 1
    assert val[0].name in result.stderr  # the table run names the files


def test_exit_2_when_training_would_fail(synthetic_coco, tmp_path):
    root = _copy(synthetic_coco, tmp_path)
    _edit(root / "annotations" / "instances_train.json", lambda d: d["annotations"][3].update(bbox=[1, 2, 3]))
    result = ddetr("data", "check", "--data", root)
    assert result.exit_code == 2
    line = error_line(result)
    assert "instances_train.json" in line and "bbox must be 4 numbers" in line

    root = _copy(synthetic_coco, tmp_path / "second")
    for image in (root / "val").glob("*.jpg"):
        image.write_bytes(b"")
    result = ddetr("data", "check", "--data", root, "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["splits"]["val"]["problems"] == ["none of the 4 images can be read"]
