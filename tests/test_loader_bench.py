"""`ddetr bench loader`: the benchmark runs end to end on tiny inputs and its generated COCO-shaped
annotation file parses identically with the Rust parser, json and pycocotools."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ddetr_cli import _loader
from ddetr_cli.commands.bench_loader import bench_loader_report, write_coco_like_annotations


def test_generated_annotation_file_parses_identically(tmp_path):
    path = tmp_path / "big.json"
    counts = write_coco_like_annotations(path, size_mb=0.5, seed=1)
    assert 0.4 < counts["mb"] < 0.6
    data = json.loads(path.read_text())
    assert len(data["images"]) == counts["images"] and len(data["annotations"]) == counts["annotations"]
    assert _loader.parse_annotations(str(path)) == {
        "images": counts["images"],
        "annotations": counts["annotations"],
        "categories": 80,
    }
    assert any(a["iscrowd"] for a in data["annotations"])


def test_bench_loader_report_runs_end_to_end(synthetic_coco):
    report = bench_loader_report(
        data=synthetic_coco, workers=1, batch_size=2, images=4, repeats=1, parse_size_mb=0.2, warmup_s=0.1
    )
    assert report["warmup_s"] == 0.1
    assert set(report["images_per_s"]) == {"decode-only", "rust", "pillow"}
    assert all(rate > 0 for rate in report["images_per_s"].values())
    assert report["rust_vs_pillow"] > 0 and report["rust_vs_decode_only"] > 0
    for parser in ("rust", "pycocotools"):
        assert report["parse"][parser]["seconds"] > 0 and report["parse"][parser]["peak_mb"] > 0


def test_cli_registers_bench_loader():
    from ddetr_cli.cli import app

    result = CliRunner().invoke(app, ["bench", "loader", "--help"])
    assert result.exit_code == 0, result.output
    assert "--parse-size-mb" in result.output and "--workers" in result.output
