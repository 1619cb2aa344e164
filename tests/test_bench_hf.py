"""`ddetr bench --compare-hf`: ddetr against Hugging Face transformers on the same weights and input."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_helpers import ddetr, error_line
from hf_reference import randomise
from model_helpers import one_thread as one_thread  # autouse: one intra-op thread
from model_helpers import tiny_config

from ddetr_cli.engine.hf_compare import compare_hf, detection_difference
from ddetr_cli.model import build_model

pytest.importorskip("transformers")
pytest.importorskip("timm")

SMALL = ["--backbone", "resnet18", "--hidden-dim", "32", "--enc-layers", "1", "--dec-layers", "2"]


def test_compare_hf_times_both_on_the_same_detections():
    """Randomised weights (box head included), a padded batch: both sides find the same detections."""
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone="resnet18", num_queries=20)).eval()
    randomise(model)
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 40:] = True
    report = compare_hf(model, images, mask, torch.device("cpu"), warmup=0, iters=2, unfused=True)
    det = report["detections"]
    assert det["unmatched"] == 0 and det["max_score_diff"] < 1e-5 and det["max_box_diff_px"] < 1e-2
    assert det["max_box_diff_px"] > 0 or det["max_score_diff"] > 0 or report["hf"]  # computed, not skipped
    for side in ("ddetr", "ddetr_unfused", "hf"):
        assert report[side]["images_per_s"] > 0
    assert report["speedup"] > 0 and report["speedup_unfused"] > 0 and len(report["round_speedups"]) == 2


def test_detection_difference_sees_a_moved_box_and_tolerates_swapped_ties():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]])
    ours = [{"scores": torch.tensor([0.9, 0.5, 0.5]), "labels": torch.tensor([1, 2, 3]), "boxes": boxes}]
    swapped = [{k: v[[0, 2, 1]] for k, v in ours[0].items()}]
    assert detection_difference(ours, swapped) == {
        "max_score_diff": 0.0,
        "max_box_diff_px": 0.0,
        "unmatched": 0,
    }
    moved = [{**ours[0], "boxes": boxes + torch.tensor([[0.0, 0, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0]])}]
    assert detection_difference(ours, moved)["max_box_diff_px"] == 3.0
    relabelled = [{**ours[0], "labels": torch.tensor([1, 2, 4])}]
    assert detection_difference(ours, relabelled)["unmatched"] == 1


def test_bench_compare_hf_cli(tmp_path):
    out = tmp_path / "bench.json"
    args = [*SMALL, "--num-queries", "10", "--imgsz", "64x80", "--device", "cpu", "--warmup", "0"]
    result = ddetr("bench", *args, "--iters", "2", "--no-reference", "--compare-hf", "--json", out)
    assert result.exit_code == 0, result.output
    assert "ddetr vs Hugging Face" in result.output
    report = json.loads(out.read_text())
    hf = report["hf_comparison"]
    assert report["fused_for_inference"] and hf["speedup"] > 0 and hf["detections"]["unmatched"] == 0
    assert hf["detections"]["max_score_diff"] < 1e-5


def test_compare_hf_without_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    result = ddetr("bench", *SMALL, "--imgsz", "64x80", "--device", "cpu", "--compare-hf")
    assert result.exit_code != 0
    assert "--compare-hf needs transformers" in error_line(result)


def test_compare_hf_refuses_the_tiny_backbone():
    result = ddetr("bench", "--backbone", "tiny", "--imgsz", "64x80", "--device", "cpu", "--compare-hf")
    assert result.exit_code != 0
    assert "Hugging Face" in error_line(result)
