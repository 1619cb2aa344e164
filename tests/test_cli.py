"""The `ddetr` CLI without training: help, version, error contract, COCO evaluation of results
files against pycocotools, crash-safe writes, bench JSON.

Commands run through `typer.testing.CliRunner` on the real app (the same entry point as the
`ddetr` console script) on the synthetic COCO fixture (real JPEGs, real instances JSON).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import TINY_MODEL, ddetr, error_line, pycocotools_reference, runner

from ddetr_cli import runs
from ddetr_cli.cli import app
from ddetr_cli.coco_eval import STAT_NAMES


def fake_detections(ann_file, seed=0):
    """Plausible detections: jittered ground-truth boxes (some dropped, some mislabelled) + noise."""
    rng = np.random.default_rng(seed)
    gt = json.loads(ann_file.read_text())
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
        box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
        dets.append(
            {
                "image_id": ann["image_id"],
                "category_id": cat,
                "bbox": [round(v, 2) for v in box],
                "score": round(float(rng.uniform(0.3, 1.0)), 4),
            }
        )
    for image in gt["images"]:
        for _ in range(3):
            w, h = rng.uniform(5, 40, 2)
            x, y = rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h)
            dets.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                    "score": round(float(rng.uniform(0.0, 0.5)), 4),
                }
            )
    return dets


# --- help, version, global flags -------------------------------------------------------------


def test_version_and_help_of_every_command():
    result = ddetr("--version")
    assert result.exit_code == 0 and result.stdout.startswith("ddetr ")
    commands = [
        "train",
        "eval",
        "predict",
        "bench",
        "demo",
        "build-ops",
        "data synth",
        "bench op",
        "bench loader",
    ]
    for command in commands:
        result = ddetr(*command.split(), "--help")
        assert result.exit_code == 0, (command, result.output)
        assert "Examples" in result.stdout and f"ddetr {command}" in result.stdout


def test_console_script_exit_codes(tmp_path):
    exe = shutil.which("ddetr") or os.path.join(os.path.dirname(sys.executable), "ddetr")
    ok = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ddetr ")
    bad = subprocess.run(
        [exe, "eval", "--predictions", str(tmp_path / "none.json"), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("Error:") and "Traceback" not in bad.stderr
    usage = subprocess.run([exe, "train", "--epochs", "many"], capture_output=True, text=True, timeout=60)
    assert (
        usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1 and "--epochs" in usage.stderr
    )


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_entry_point_makes_openmp_threads_wait_passively(monkeypatch, preset):
    from ddetr_cli import cli

    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    monkeypatch.setattr(sys, "argv", ["ddetr", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    assert os.environ["OMP_WAIT_POLICY"] == (preset or "PASSIVE")


def test_global_flags_anywhere(synthetic_coco, tmp_path):
    det_file = tmp_path / "det.json"
    det_file.write_text("[]")
    args = ["eval", "--predictions", det_file, "--data", synthetic_coco, "--out", tmp_path / "m.json"]
    quiet = ddetr(*args, "-q")
    assert quiet.exit_code == 0 and "Metrics:" not in quiet.stderr
    loud = ddetr("-v", *args)
    assert loud.exit_code == 0 and "Metrics:" in loud.stderr


def test_train_help_states_the_paper_defaults():
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).stdout
    for fragment in ("2e-4", "2e-5", "1e-4", "(default: 50)", "(default: 40)", "(default: 0.1)"):
        assert fragment in text, fragment


# --- eval of a results file --------------------------------------------------------------------


def test_eval_predictions_equal_pycocotools(synthetic_coco, tmp_path):
    ann = synthetic_coco / "annotations" / "instances_val.json"
    dets = fake_detections(ann)
    det_file = tmp_path / "det.json"
    det_file.write_text(json.dumps(dets))
    out = tmp_path / "metrics.json"
    result = ddetr(
        "eval", "--predictions", det_file, "--data", synthetic_coco, "--split", "val", "--out", out
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    reference = pycocotools_reference(ann, dets)
    for name, value in zip(STAT_NAMES, reference.stats):
        assert metrics[name] == pytest.approx(float(value), abs=1e-12), name
        assert metrics[name] == -1 or 0 <= metrics[name] <= 1
    assert 0.05 < metrics["AP"] < 1  # the detections are neither empty nor perfect
    # per-class AP: the mean of the precision array over IoUs and recall points, area all, 100 dets
    names = {c["id"]: c["name"] for c in json.loads(ann.read_text())["categories"]}
    precision = reference.eval["precision"]
    for k, cat_id in enumerate(reference.params.catIds):
        p = precision[:, :, k, 0, -1]
        expected = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        assert metrics["per_class"][names[cat_id]] == pytest.approx(expected, abs=1e-12)
    assert "AP50" in result.stdout and "circle" in result.stdout  # the Rich tables


def test_eval_empty_results_scores_zero(synthetic_coco, tmp_path):
    det_file = tmp_path / "det.json"
    det_file.write_text("[]")
    out = tmp_path / "m.json"
    result = ddetr("eval", "--predictions", det_file, "--data", synthetic_coco, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["AP"] == 0 and metrics["AR100"] == 0


def test_eval_with_dataset_yaml(synthetic_coco, tmp_path):
    yaml_file = tmp_path / "shapes.yaml"
    yaml_file.write_text(
        f"path: {synthetic_coco}\n"
        "train: {images: train, annotations: annotations/instances_train.json}\n"
        "val: {images: val, annotations: annotations/instances_val.json}\n"
        "names: [c0, c1, c2, c3, c4]\n"
    )
    det_file = tmp_path / "det.json"
    det_file.write_text(json.dumps(fake_detections(synthetic_coco / "annotations" / "instances_val.json")))
    out = tmp_path / "m.json"
    result = ddetr("eval", "--predictions", det_file, "--data", yaml_file, "--out", out)
    assert result.exit_code == 0, result.output
    assert list(json.loads(out.read_text())["per_class"]) == ["c0", "c1", "c2", "c3", "c4"]


def test_data_synthetic_is_generated_on_first_use(tmp_path, monkeypatch):
    from ddetr_cli import datasets

    monkeypatch.setattr(datasets, "SYNTHETIC_DIR", tmp_path / "synthetic")
    monkeypatch.setattr(
        datasets, "SYNTHETIC_ARGS", {"num_train": 2, "num_val": 2, "image_size": 64, "seed": 0}
    )
    monkeypatch.setattr(datasets.synthetic_root, "__defaults__", (tmp_path / "synthetic",))
    det_file = tmp_path / "det.json"
    det_file.write_text("[]")
    result = ddetr("eval", "--predictions", det_file, "--data", "synthetic", "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "synthetic" / "val").glob("*.jpg"))) == 2
    split = datasets.resolve_split("synthetic", "train")
    assert split.images_dir == tmp_path / "synthetic" / "train"


def test_settings_precedence_explicit_over_preset_over_paper():
    from ddetr_cli.engine.settings import TRAIN_DEFAULTS, resolve_settings

    model, settings = resolve_settings({})
    assert settings == {**TRAIN_DEFAULTS} and model == {}
    assert (settings["lr"], settings["lr_backbone"], settings["lr_drop"], settings["epochs"]) == (
        2e-4,
        2e-5,
        40,
        50,
    )
    model, settings = resolve_settings(
        {"preset": "tiny", "epochs": 3, "hidden_dim": 32, "variant": "two-stage"}
    )
    from ddetr_cli.presets import get_preset

    tiny = get_preset("tiny")
    assert settings["epochs"] == 3 and settings["batch_size"] == tiny["train"]["batch_size"]
    assert model["hidden_dim"] == 32 and model["backbone"] == tiny["model"]["backbone"]
    assert model["two_stage"] and model["with_box_refine"]
    _, settings = resolve_settings({"imgsz": 400})
    assert settings["val_size"] == 400 and max(settings["scales"]) == 400 and min(settings["scales"]) == 240


# --- user errors: one red line, exit 2 ---------------------------------------------------------


def test_bad_inputs_are_one_line_exit_2(synthetic_coco, tmp_path):
    det_file = tmp_path / "det.json"
    det_file.write_text(json.dumps(fake_detections(synthetic_coco / "annotations" / "instances_val.json")))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"image_id": 1,')
    wrong_image = tmp_path / "wrong.json"
    wrong_image.write_text(
        json.dumps([{"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    )
    no_bbox = tmp_path / "nobbox.json"
    no_bbox.write_text(json.dumps([{"image_id": 1001, "category_id": 1, "score": 0.5}]))
    broken_root = tmp_path / "broken"
    shutil.copytree(synthetic_coco / "annotations", broken_root / "annotations")
    (broken_root / "val").mkdir()
    (broken_root / "annotations" / "instances_val.json").write_text("{not json")
    cases = [
        (["eval", "--predictions", tmp_path / "missing.json", "--data", synthetic_coco], "missing.json"),
        (["eval", "--predictions", det_file, "--data", tmp_path / "nowhere"], "nowhere"),
        (["eval", "--predictions", det_file, "--data", synthetic_coco, "--split", "test"], "test"),
        (["eval", "--predictions", bad_json, "--data", synthetic_coco], "not valid JSON"),
        (["eval", "--predictions", wrong_image, "--data", synthetic_coco], "image_id 999999"),
        (["eval", "--predictions", no_bbox, "--data", synthetic_coco], "'bbox'"),
        (["eval", "--predictions", det_file, "--data", broken_root], "instances_val.json"),
        (["eval", "--data", synthetic_coco], "--weights"),
        (["eval", "--predictions", det_file, "--data", synthetic_coco, "--amp", "fp8"], "--amp"),
        (
            ["eval", "--predictions", det_file, "--data", synthetic_coco, "--batch-size", "zero"],
            "--batch-size",
        ),
        (["eval", "--no-such-option"], "--no-such-option"),
        (["eval", "--weights", tmp_path / "nothing.pt", "--data", synthetic_coco], "nothing.pt"),
        (["predict", tmp_path / "no_images_here", "--weights", tmp_path / "w.pt"], "no_images_here"),
        (["predict", str(tmp_path / "*.nomatch"), "--weights", tmp_path / "w.pt"], "*.nomatch"),
        (["bench", "--imgsz", "big", "--device", "cpu"], "--imgsz"),
        (["bench", "--device", "tpu"], "--device"),
        (["bench", "--variant", "fancy", "--device", "cpu"], "--variant"),
        (["train", "--data", tmp_path / "nowhere"], "nowhere"),
        (["train", "--resume", tmp_path / "gone.pt"], "gone.pt"),
        (["train", "--data", synthetic_coco, "--resume", tmp_path / "gone.pt"], "--data cannot change"),
        (["train", "--data", synthetic_coco, "--epochs", "0"], "--epochs"),
        (["train", "--data", synthetic_coco, "--crop-prob", "1.5"], "--crop-prob"),
        (
            ["train", "--data", synthetic_coco, "--batch-size", "64", "--backbone", "tiny"],
            "fewer than one batch",
        ),
        (["train", "--data", synthetic_coco, "--variant", "deformable"], "--variant"),
        (["train", "--data", synthetic_coco, "--preset", "huge"], "huge"),
        (["train", "--data", synthetic_coco, "--pretrained-backbone", tmp_path / "r50.pth"], "r50.pth"),
    ]
    for args, needle in cases:
        result = ddetr(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in error_line(result), (args, result.stderr)


def test_verbose_shows_the_traceback(synthetic_coco, tmp_path):
    result = ddetr("eval", "--predictions", tmp_path / "missing.json", "--data", synthetic_coco, "-v")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_runtime_failure_exits_1(synthetic_coco, tmp_path, monkeypatch):
    from ddetr_cli import coco_eval

    def explode(*args, **kwargs):
        raise RuntimeError("evaluation backend crashed")

    monkeypatch.setattr(coco_eval, "evaluate_detections", explode)
    det_file = tmp_path / "det.json"
    det_file.write_text("[]")
    result = ddetr("eval", "--predictions", det_file, "--data", synthetic_coco, "--out", tmp_path / "m.json")
    assert result.exit_code == 1
    assert "evaluation backend crashed" in error_line(result)


# --- run directories and crash-safe writes ------------------------------------------------------


def test_increment_path(tmp_path):
    assert runs.increment_path(tmp_path, "exp") == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    assert runs.increment_path(tmp_path, "exp") == tmp_path / "exp2"
    (tmp_path / "exp2").mkdir()
    (tmp_path / "exp7").mkdir()
    assert runs.increment_path(tmp_path, "exp") == tmp_path / "exp3"
    assert runs.increment_path(tmp_path, "exp", exist_ok=True) == tmp_path / "exp"


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "weights" / "last.pt"
    runs.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file on disk, then the "disk full" / kill
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        runs.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


# --- bench ----------------------------------------------------------------------------------------


def test_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    result = ddetr(
        "bench",
        *TINY_MODEL,
        "--dec-layers",
        "1",
        "--num-queries",
        "10",
        "--imgsz",
        "64x96",
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["imgsz"] == [64, 96] and report["batch_size"] == 1 and report["device"] == "cpu"
    assert report["images_per_s"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert set(report["stages_ms"]) == {
        "backbone",
        "input_proj",
        "encoder",
        "decoder",
        "heads",
        "other",
        "postprocess",
    }
    assert all(v >= 0 for v in report["stages_ms"].values()) and report["stages_ms"]["encoder"] > 0
    assert report["msda_backend"] in report["backends"]
    if report["msda_backend"] != "reference":  # the compiled op is compared with the reference
        assert "reference" in report["backends"] and report["speedup_vs_reference"] > 0


def test_predict_names_coco_classes_of_an_official_style_model(synthetic_coco, tmp_path):
    """A 91-class checkpoint without names or id mapping (official COCO layout): identity ids, COCO names."""
    from ddetr_cli.engine.prediction import COCO_CATEGORY_NAMES
    from ddetr_cli.model import DeformableDetrConfig, build_model, model_checkpoint

    torch.manual_seed(0)
    config = DeformableDetrConfig(backbone="tiny", hidden_dim=32, enc_layers=1, dec_layers=1, num_queries=30)
    weights = runs.atomic_save(model_checkpoint(build_model(config)), tmp_path / "coco91.pt")
    image = sorted((synthetic_coco / "val").glob("*.jpg"))[0]
    out = tmp_path / "r.json"
    result = ddetr(
        "predict",
        image,
        "--weights",
        weights,
        "--out",
        out,
        "--score-thr",
        "0",
        "--topk",
        "300",
        "--imgsz",
        "96",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    dets = json.loads(out.read_text())
    assert len(dets) == 300
    named = [d for d in dets if d["category_id"] in COCO_CATEGORY_NAMES]
    assert named and all(d["category_name"] == COCO_CATEGORY_NAMES[d["category_id"]] for d in named)
    assert all(d["category_name"] == str(d["category_id"]) for d in dets if d not in named)
