"""COCO evaluation benchmark: every backend (hotcoco, ddetr's default; faster-coco-eval) against
pycocotools, in the same run.

python benchmarks/bench_eval.py [--images 5000] [--objects 7] [--detections 100] [--seed 0] [--json out.json]

A synthetic ground truth and detections file (`ddetr_cli.eval_synth`: crowd boxes, empty images,
non-contiguous category ids) are written as JSON, then each backend runs what `ddetr eval
--predictions` runs: read + validate the ground truth, read + check the detections (ddetr's Rust
reader, `load_detections`), evaluate. Reported per backend: reading the detections, the evaluation
alone (`evaluate_detections`: loadRes, evaluate, accumulate, summarize) and the whole command path,
and their speed-ups over pycocotools; the 12 numbers and the per-class AP must agree to 1e-9.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ddetr_cli import coco_eval
from ddetr_cli.eval_synth import synthetic_evaluation


def run_backend(backend: str, ann_file: Path, det_file: Path) -> dict:
    """Times `ddetr eval --predictions`' steps with `backend`; returns seconds and metrics."""
    start = time.perf_counter(), time.process_time()
    gt = coco_eval.load_ground_truth(ann_file, backend=backend)
    indexed = time.perf_counter(), time.process_time()
    detections = coco_eval.load_detections(det_file, gt)  # Rust: read, parse, check into columns
    loaded = time.perf_counter(), time.process_time()
    metrics = coco_eval.evaluate_detections(gt, detections, backend=backend)
    end = time.perf_counter(), time.process_time()
    return {
        "detections_s": loaded[0] - indexed[0],
        "detections_cpu_s": loaded[1] - indexed[1],
        "evaluate_s": end[0] - loaded[0],
        "evaluate_cpu_s": end[1] - loaded[1],
        "total_s": end[0] - start[0],
        "total_cpu_s": end[1] - start[1],
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--objects", type=float, default=7.0)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    gt, detections = synthetic_evaluation(args.images, args.objects, args.detections, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ann_file, det_file = Path(tmp) / "instances_val.json", Path(tmp) / "detections.json"
        ann_file.write_text(json.dumps(gt))
        det_file.write_text(json.dumps(detections))
        del gt, detections
        results = {backend: run_backend(backend, ann_file, det_file) for backend in coco_eval.BACKENDS}

    oracle = results["pycocotools"]
    timings = ("detections_s", "detections_cpu_s", "evaluate_s", "evaluate_cpu_s", "total_s", "total_cpu_s")
    compared = timings[2:]  # every backend reads the detections with the same reader
    report = {
        "images": args.images,
        "annotations_per_image": args.objects,
        "detections_per_image": args.detections,
        "backends": {b: {k: r[k] for k in timings} for b, r in results.items()},
        "speedup": {
            b: {k: oracle[k] / r[k] for k in compared} for b, r in results.items() if r is not oracle
        },
        "max_abs_diff": {
            b: _differences(r["metrics"], oracle["metrics"]) for b, r in results.items() if r is not oracle
        },
        "metrics": {name: oracle["metrics"][name] for name in coco_eval.STAT_NAMES},
    }
    print(f"{'':22s} {'read detections':>18s} {'evaluate':>18s} {'whole eval path':>18s}   (wall s / CPU s)")
    rows = [*report["backends"].items(), *((f"speed-up {b}", r) for b, r in report["speedup"].items())]
    for name, r in rows:
        read = f"{r['detections_s']:8.2f} / {r['detections_cpu_s']:7.2f}" if "detections_s" in r else ""
        print(
            f"{name:22s} {read:>18s} {r['evaluate_s']:8.2f} / {r['evaluate_cpu_s']:7.2f} "
            f"{r['total_s']:8.2f} / {r['total_cpu_s']:7.2f}"
        )
    for backend, (worst, worst_class) in report["max_abs_diff"].items():
        print(f"max |difference| {backend}: 12 numbers {worst:.1e}, per-class AP {worst_class:.1e}")
    print("AP {AP:.4f}  AP50 {AP50:.4f}  AP75 {AP75:.4f}  AR100 {AR100:.4f}".format(**report["metrics"]))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _differences(metrics: dict, oracle: dict) -> tuple[float, float]:
    """(largest |difference| over the 12 numbers, over the per-class AP) from the oracle's."""
    worst = max(abs(metrics[name] - oracle[name]) for name in coco_eval.STAT_NAMES)
    worst_class = max(abs(metrics["per_class"][k] - v) for k, v in oracle["per_class"].items())
    return worst, worst_class


if __name__ == "__main__":
    main()
