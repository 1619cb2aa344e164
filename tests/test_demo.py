"""The shortened demo (`ddetr demo --fast`): the whole pipeline trains a detector that beats chance."""

import json

import pytest
import torch

from ddetr_cli.engine.demo import FAST, run_demo


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    torch.manual_seed(0)
    # One torch thread: on shared CI runners two threads can be several times slower.
    return run_demo(
        tmp_path_factory.mktemp("demo"), fast=True, seed=0, device="cpu", workers=1, threads=1, show=False
    )


def _untrained_metrics(result, tmp_path):
    """Evaluate a freshly initialised model of the same configuration on the same val split."""
    from ddetr_cli.engine.evaluation import evaluate
    from ddetr_cli.model import DeformableDetrConfig, build_model, model_checkpoint

    trained = torch.load(result.weights, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    model = build_model(DeformableDetrConfig.from_dict(trained["config"]))
    checkpoint = model_checkpoint(model)
    checkpoint["imgsz"] = trained["imgsz"]
    path = tmp_path / "untrained.pt"
    torch.save(checkpoint, path)
    return evaluate(weights=path, data=str(result.data), split="val", out=None, device="cpu", show=False)


def test_fast_demo_learns_and_beats_an_untrained_model(fast_demo, tmp_path):
    result = fast_demo
    losses = [row["train/loss"] for row in result.history]
    assert len(losses) == FAST["epochs"]
    assert losses[-1] < 0.8 * losses[0], losses

    untrained = _untrained_metrics(result, tmp_path)
    assert result.metrics["AP50"] > untrained["AP50"] + 0.05, (result.metrics["AP50"], untrained["AP50"])
    assert result.metrics["AP"] > untrained["AP"], (result.metrics["AP"], untrained["AP"])


def test_fast_demo_leaves_metrics_pictures_and_run(fast_demo):
    result = fast_demo
    saved = json.loads(result.metrics_file.read_text())
    assert result.metrics_file == result.out / "metrics.json"
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "per_class"):
        assert key in saved
    assert saved["AP50"] == pytest.approx(result.metrics["AP50"])
    assert set(saved["per_class"]) == {"circle", "square", "triangle", "star", "cross"}
    pictures = sorted(result.vis_dir.glob("*.jpg"))
    assert len(pictures) >= 4
    assert (result.run_dir / "weights" / "last.pt").is_file()
    assert (result.run_dir / "metrics.csv").is_file()
    detections = json.loads((result.out / "detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 5, 7}  # dataset ids, not class indices


def test_demo_command_is_registered_with_its_options():
    from typer.testing import CliRunner

    from ddetr_cli.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--out", "--epochs", "--fast", "--seed", "--device", "--threads"):
        assert option in result.output


def test_demo_rejects_bad_epochs(tmp_path):
    from ddetr_cli.console import UserError

    with pytest.raises(UserError, match="--epochs"):
        run_demo(tmp_path / "bad", epochs=0, show=False)


def test_fast_demo_draws_at_the_best_f1_threshold(fast_demo):
    from ddetr_cli.engine.thresholds import best_f1_threshold

    result = fast_demo
    ground_truth = json.loads((result.data / "annotations" / "instances_val.json").read_text())
    expected = best_f1_threshold(ground_truth, json.loads((result.out / "detections.json").read_text()))
    assert result.picture_threshold == expected and 0 < expected.f1 <= 1
    drawn = json.loads((result.out / "predictions.json").read_text())
    assert drawn and min(d["score"] for d in drawn) >= expected.threshold
