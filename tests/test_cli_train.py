"""`ddetr train`, `eval --weights` and `predict` end to end on tiny models and the synthetic COCO
fixture (real JPEGs): the run directory, exact resume (epoch boundary and Ctrl-C mid-epoch),
divergence and crash safety, fine-tuning to another class count, 2-process DDP under torchrun,
evaluation against pycocotools and the predict output.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from cli_helpers import TINY_MODEL, ddetr, error_line, pycocotools_reference

from ddetr_cli.coco_eval import STAT_NAMES
from ddetr_cli.runs import read_metrics_csv

# A tiny but complete model (multi-scale, two decoder layers so auxiliary losses exist), small images.
TINY = [
    *TINY_MODEL,
    "--dec-layers",
    "2",
    "--num-queries",
    "20",
    "--imgsz",
    "64",
    "--workers",
    "1",
    "--log-interval",
    "1",
]


def train_args(data, project, name, epochs=2, batch_size=2):
    # The contract form scripts rely on, plus the tiny-model options.
    return [
        "train",
        "--data",
        data,
        "--epochs",
        epochs,
        "--batch-size",
        batch_size,
        "--device",
        "cpu",
        "--project",
        project,
        "--name",
        name,
        *TINY,
    ]


def iteration_losses(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(synthetic_coco, tmp_path_factory):
    project = tmp_path_factory.mktemp("runs")
    result = ddetr(*train_args(synthetic_coco, project, "ref"))
    assert result.exit_code == 0, result.output
    return project / "ref"


def test_train_writes_the_run_directory(trained_run):
    for name in (
        "weights/last.pt",
        "weights/best.pt",
        "metrics.csv",
        "results.png",
        "args.yaml",
        "train_log.jsonl",
    ):
        assert (trained_run / name).is_file(), name
    rows = read_metrics_csv(trained_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "lr",
        "train/loss",
        "train/loss_ce",
        "train/loss_bbox",
        "train/loss_giou",
        "train/loss_ce_0",
        *(f"val/{s}" for s in STAT_NAMES),
    ):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in rows), key
    assert rows[0]["lr"] == pytest.approx(2e-4)
    assert len(iteration_losses(trained_run)) == 8  # 8 train images, batch 2, 2 epochs
    args = yaml.safe_load((trained_run / "args.yaml").read_text())
    train = args["train"]
    assert (train["lr_backbone"], train["weight_decay"], train["lr_drop"], train["clip_max_norm"]) == (
        2e-5,
        1e-4,
        40,
        0.1,
    )
    ckpt = torch.load(trained_run / "weights" / "last.pt", weights_only=True)
    assert ckpt["format"] == "ddetr" and ckpt["epoch"] == 2 and ckpt["iteration"] == 8
    assert {"optimizer", "scheduler", "rng", "config", "model"} <= set(ckpt)
    assert ckpt["category_ids"] == [1, 2, 3, 5, 7]
    assert ckpt["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    from ddetr_cli.model import load_model

    model = load_model(trained_run / "weights" / "best.pt")
    assert model.config.num_classes == 5 and model.config.category_ids == [1, 2, 3, 5, 7]


def test_resume_reproduces_the_uninterrupted_losses(trained_run, synthetic_coco, tmp_path, monkeypatch):
    """1 epoch, resume to 2 with a Ctrl-C in the middle of epoch 2, resume again: same losses."""
    result = ddetr(*train_args(synthetic_coco, tmp_path, "half", epochs=1))
    assert result.exit_code == 0, result.output
    run = tmp_path / "half"

    import ddetr_cli.model as model_pkg

    real_build = model_pkg.build_criterion

    def build_interrupting(config):
        criterion = real_build(config)
        calls = {"n": 0}
        forward = criterion.forward

        def forward_then_ctrl_c(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the second iteration of the resumed run: epoch 2, batch 2
                os.kill(os.getpid(), signal.SIGINT)
            return forward(*args, **kwargs)

        criterion.forward = forward_then_ctrl_c
        return criterion

    monkeypatch.setattr(model_pkg, "build_criterion", build_interrupting)
    result = ddetr("train", "--resume", run / "weights" / "last.pt", "--epochs", "2")
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "--resume" in result.stderr
    ckpt = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["iteration"]) == (1, 2, 6)
    monkeypatch.undo()

    result = ddetr("train", "--resume", "--project", tmp_path)  # bare --resume: the latest last.pt
    assert result.exit_code == 0, result.output
    reference = iteration_losses(trained_run)
    resumed = iteration_losses(run)
    assert len(resumed) == len(reference) == 8
    for ref, got in zip(reference, resumed):
        for key in ("iteration", "loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "lr"):
            assert got[key] == ref[key], (ref["iteration"], key)  # exact on the CPU
    ref_rows, rows = read_metrics_csv(trained_run / "metrics.csv"), read_metrics_csv(run / "metrics.csv")
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
    assert [r["val/AR100"] for r in rows] == [r["val/AR100"] for r in ref_rows]


def _criterion_patch(monkeypatch, bad_call):
    import ddetr_cli.model as model_pkg

    real_build = model_pkg.build_criterion

    def build(config):
        criterion = real_build(config)
        forward, calls = criterion.forward, {"n": 0}

        def forward_nan(*args, **kwargs):
            calls["n"] += 1
            losses = forward(*args, **kwargs)
            if calls["n"] == bad_call:
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
                losses["loss"] = losses["loss"] + losses["loss_bbox"]
            return losses

        criterion.forward = forward_nan
        return criterion

    monkeypatch.setattr(model_pkg, "build_criterion", build)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_coco, tmp_path, monkeypatch):
    _criterion_patch(monkeypatch, bad_call=2)  # one batch of 8 per epoch: epoch 2's iteration
    result = ddetr(*train_args(synthetic_coco, tmp_path, "nan", epochs=3, batch_size=8))
    assert result.exit_code == 1
    line = error_line(result)
    assert "non-finite loss" in line and "epoch 2" in line and "loss_bbox" in line and "last.pt" in line
    ckpt = torch.load(tmp_path / "nan" / "weights" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_crash_while_writing_a_checkpoint_keeps_the_old_last_pt(synthetic_coco, tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def save_then_die(obj, f, *args, **kwargs):
        calls["n"] += 1
        real_save(obj, f, *args, **kwargs)
        # epoch 1 wrote last.pt before evaluating, then last.pt and best.pt with the metrics;
        # die half-way through epoch 2's last.pt
        if calls["n"] == 4:
            f.truncate(f.tell() // 3)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_die)
    result = ddetr(*train_args(synthetic_coco, tmp_path, "crash", epochs=2, batch_size=8))
    monkeypatch.undo()
    assert result.exit_code == 1 and "No space left" in error_line(result)
    weights = tmp_path / "crash" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]  # no temporary left
    assert torch.load(weights / "last.pt", weights_only=True)["epoch"] == 1
    result = ddetr("train", "--resume", weights / "last.pt")  # and the run continues from it
    assert result.exit_code == 0, result.output
    assert torch.load(weights / "last.pt", weights_only=True)["epoch"] == 2
    # epoch 2's iteration was logged before the crash and redone after it: logged once
    assert [r["iteration"] for r in iteration_losses(tmp_path / "crash")] == [1, 2]


def test_fine_tune_to_another_class_count(trained_run, synthetic_coco, tmp_path):
    root = tmp_path / "three"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(synthetic_coco / split, root / split)
    corrupt = sorted((root / "train").glob("*.jpg"))[0]
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # a truncated JPEG: reported and skipped
    for split in ("train", "val"):
        data = json.loads((synthetic_coco / "annotations" / f"instances_{split}.json").read_text())
        data["categories"] = [c for c in data["categories"] if c["id"] in (1, 2, 3)]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in (1, 2, 3)]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    args = train_args(root, tmp_path, "ft", epochs=1, batch_size=8)
    result = ddetr(*args, "--weights", trained_run / "weights" / "best.pt")
    assert result.exit_code == 0, result.output
    assert corrupt.name in result.stderr
    ckpt = torch.load(tmp_path / "ft" / "weights" / "best.pt", weights_only=True)
    assert ckpt["config"]["num_classes"] == 3 and ckpt["category_ids"] == [1, 2, 3]


@pytest.mark.slow
def test_two_process_ddp_under_torchrun(synthetic_coco, tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ddetr_cli.cli",
        *[str(a) for a in train_args(synthetic_coco, tmp_path, "ddp", epochs=1, batch_size=2)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 made no run directory of its own
    run = tmp_path / "ddp"
    assert yaml.safe_load((run / "args.yaml").read_text())["world_size"] == 2
    assert len(iteration_losses(run)) == 2  # 8 images / (2 ranks x batch 2)
    rows = read_metrics_csv(run / "metrics.csv")
    assert len(rows) == 1 and all(
        0 <= rows[0][f"val/{s}"] <= 1 or rows[0][f"val/{s}"] == -1 for s in STAT_NAMES
    )
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["train_args"]["world_size"] == 2


def test_eval_weights_equals_pycocotools(trained_run, synthetic_coco, tmp_path):
    out, det = tmp_path / "metrics.json", tmp_path / "det.json"
    result = ddetr(
        "eval",
        "--weights",
        trained_run / "weights" / "best.pt",
        "--data",
        synthetic_coco,
        "--split",
        "val",
        "--out",
        out,
        "--save-detections",
        det,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    metrics, detections = json.loads(out.read_text()), json.loads(det.read_text())
    assert len(detections) == 4 * 100  # 4 val images, top-100 each
    reference = pycocotools_reference(synthetic_coco / "annotations" / "instances_val.json", detections)
    for name, value in zip(STAT_NAMES, reference.stats):
        assert metrics[name] == pytest.approx(float(value), abs=1e-12), name
    assert set(metrics["per_class"]) == {"circle", "square", "triangle", "star", "cross"}
    from ddetr_cli.engine.inference import inference_size

    assert inference_size(trained_run / "weights" / "best.pt", None) == 64  # --imgsz of the training run
    # the same model, data and image size as the training run's last evaluation
    last_row = read_metrics_csv(trained_run / "metrics.csv")[-1]
    best_is_last = torch.load(trained_run / "weights" / "best.pt", weights_only=True)["epoch"] == 2
    if best_is_last:
        assert metrics["AR100"] == pytest.approx(last_row["val/AR100"], abs=1e-5)


def test_predict_output_and_visualisations(trained_run, synthetic_coco, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synthetic_coco / "val", src / "nested")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out, vis = tmp_path / "results.json", tmp_path / "vis"
    ann = synthetic_coco / "annotations" / "instances_val.json"
    result = ddetr(
        "predict",
        src,
        src / "notes.txt",
        "--weights",
        trained_run / "weights" / "best.pt",
        "--out",
        out,
        "--ann",
        ann,
        "--save-vis",
        vis,
        "--score-thr",
        "0.0",
        "--topk",
        "5",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "notes.txt" in result.stderr and "broken.jpg" in result.stderr  # reported and skipped
    results = json.loads(out.read_text())
    images = {i["file_name"]: i["id"] for i in json.loads(ann.read_text())["images"]}
    assert len(results) == 5 * len(images)
    for det in results:
        assert list(det) == ["image_id", "file_name", "category_id", "category_name", "bbox", "score"]
        assert det["image_id"] == images[os.path.basename(det["file_name"])]
        assert det["category_id"] in (1, 2, 3, 5, 7) and isinstance(det["category_name"], str)
        assert len(det["bbox"]) == 4 and det["bbox"][2] >= 0 and det["bbox"][3] >= 0
        assert 0 <= det["score"] <= 1
    drawn = sorted(p.name for p in (vis / "nested").iterdir())
    assert drawn == sorted(images)
    import cv2

    name = drawn[0]
    assert (cv2.imread(str(vis / "nested" / name)) != cv2.imread(str(src / "nested" / name))).any()

    # a glob source, a score threshold and no annotation file: no image_id
    result = ddetr(
        "predict",
        str(src / "nested" / "*.jpg"),
        "--weights",
        trained_run / "weights" / "best.pt",
        "--out",
        out,
        "--score-thr",
        "0.99",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert all("image_id" not in d and d["score"] >= 0.99 for d in json.loads(out.read_text()))


def test_bench_contract_form_with_weights(trained_run, tmp_path):
    out = tmp_path / "bench.json"
    weights = trained_run / "weights" / "best.pt"
    result = ddetr("bench", "--weights", weights, "--device", "cpu", "--imgsz", "64x96", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"]["source"] == str(weights) and report["model"]["backbone"] == "tiny"
    assert report["warmup"] == 3 and report["iters"] == 10 and report["images_per_s"] > 0


def test_predict_with_nothing_readable_is_a_user_error(trained_run, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = ddetr(
        "predict",
        broken,
        "--weights",
        trained_run / "weights" / "best.pt",
        "--device",
        "cpu",
        "--out",
        tmp_path / "r.json",
    )
    assert result.exit_code == 2
    assert "could be read" in error_line(result)
    assert not (tmp_path / "r.json").exists()


def test_eval_with_a_missing_image_names_it_and_evaluates_the_others(trained_run, synthetic_coco, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_coco, root)
    missing = sorted((root / "val").glob("*.jpg"))[1]
    missing.unlink()
    result = ddetr(
        "eval",
        "--weights",
        trained_run / "weights" / "best.pt",
        "--data",
        root,
        "--device",
        "cpu",
        "--out",
        tmp_path / "m.json",
    )
    assert result.exit_code == 0, result.output
    assert missing.name in result.stderr and "1 unreadable images skipped" in result.stderr
    assert "3 images, 1 unreadable skipped" in " ".join(result.stdout.split())  # the title may wrap
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 3 and metrics["skipped_images"] == 1
