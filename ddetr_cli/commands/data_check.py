"""`ddetr data check`: read a dataset as training would and report what it finds.

The Typer face of `ddetr_cli.engine.data_check.check_dataset`; exits 2 when training would fail.
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the command working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ddetr_cli.commands.options import MAX_PIXELS_OPTION
from ddetr_cli.console import console, error, warn
from ddetr_cli.engine.data_check import check_dataset

EXAMPLES = [
    "ddetr data check --data data/coco",
    "ddetr data check --data dataset.yaml --split train --json",
    "ddetr data check --data data/coco --max-pixels 200000000   # very large photos",
]


def data_check(
    data: str = typer.Option(..., "--data", help="COCO-layout ROOT folder or dataset.yaml."),
    split: str = typer.Option("all", "--split", help="train, val or all (the splits that exist)."),
    max_pixels: Optional[int] = MAX_PIXELS_OPTION,
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Header-reading threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Read the split(s) with the validation training uses, open every image header and report:
    images, annotations, classes, boxes without area or outside the image, crowd boxes,
    unreadable or oversized files, sizes. Exits 2 when training would fail."""
    report = check_dataset(data, split, max_pixels=max_pixels, workers=workers)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        for split_report in report["splits"].values():
            _print_split(split_report)
    if not report["ok"]:
        if not as_json:
            problems = [p for r in report["splits"].values() for p in r["problems"]]
            error(f"training would fail: {problems[0]}")
        raise typer.Exit(2)


def _print_split(r: dict) -> None:
    table = Table(title=f"{r['split']}: {escape(r['annotation_file'])}", show_header=False)
    rows = [
        ("images", r["images"]),
        ("annotations", r["annotations"]),
        ("classes", ", ".join(f"{escape(k)} {v}" for k, v in r["classes"].items()) or "-"),
        ("images without boxes", r["images_without_boxes"]),
        ("crowd boxes", r["crowd_boxes"]),
        ("empty boxes (dropped)", r["degenerate_boxes"]),
        ("boxes past the image (clipped)", r["boxes_outside_image"]),
        ("unreadable images (skipped)", r["unreadable_count"]),
    ]
    for name in ("width", "height", "aspect"):
        if r[name]:
            rows.append((f"{name} min / median / max", " / ".join(f"{v:.4g}" for v in r[name].values())))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    for path, reason in r["unreadable"]:
        warn(f"{path}: {reason}")
    if r["unreadable_count"] > len(r["unreadable"]):
        warn(f"... and {r['unreadable_count'] - len(r['unreadable'])} more unreadable images")
