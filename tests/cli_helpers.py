"""Helpers shared by the CLI tests (tests/test_cli.py, tests/test_cli_train.py): running `ddetr`
in-process, its error line, and pycocotools' own evaluation to compare `ddetr eval` with."""

from __future__ import annotations

import contextlib
import io
import json

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from ddetr_cli.cli import app

runner = CliRunner()

# A tiny model: the "tiny" backbone, width 32, one encoder layer (commands add decoder layers, queries).
TINY_MODEL = ["--backbone", "tiny", "--hidden-dim", "32", "--enc-layers", "1"]


def ddetr(*args):
    """`ddetr ARGS...` through the real app (the console script's entry point); any arg type."""
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The red error line: exactly one non-empty line, starting with 'Error:'."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def pycocotools_reference(ann_file, dets):
    """pycocotools' COCOeval (bbox) of `dets` against `ann_file`, run the documented way."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev
