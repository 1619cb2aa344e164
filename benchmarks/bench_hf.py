"""ddetr (fused for inference), ddetr as trained (unfused) and Hugging Face transformers'
`DeformableDetrForObjectDetection` on the same weights and input, interleaved in one run: the
before / after / reference figures of BENCHMARKS.md "Model inference".

    python benchmarks/bench_hf.py --imgsz 800x1066 --iters 4 [--threads 2]

A random R50 plain Deformable DETR (91 classes, every weight randomised so that the detections
compared are not trivial), batch 1, fp32, forward + top-100 post-processing each side. `ddetr bench
--compare-hf` times the first and the last alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ddetr_cli.engine.hf_compare import compare_hf
from ddetr_cli.engine.inference import parse_imgsz
from ddetr_cli.model import DeformableDetrConfig, build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import randomise  # noqa: E402 - the checkpoint tests' randomisation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", default="800x1066")
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = parse_imgsz(args.imgsz)
    torch.manual_seed(0)
    model = build_model(DeformableDetrConfig(backbone="resnet50", num_classes=91)).eval()
    randomise(model)
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    load_before = os.getloadavg()[0]
    report = compare_hf(model, images, mask, torch.device("cpu"), args.warmup, args.iters, unfused=True)
    report["load_average"] = [load_before, os.getloadavg()[0]]
    print(json.dumps(report, indent=1))
    p50 = {side: report[side]["latency_ms"]["p50"] / 1000 for side in ("ddetr", "ddetr_unfused", "hf")}
    rounds = ", ".join(f"{r:.2f}" for r in report["round_speedups"])
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    print(
        f"| {height}x{width} | {args.iters} | {load} | {p50['ddetr']:.2f} s "
        f"| {p50['ddetr_unfused']:.2f} s | {p50['hf']:.2f} s | **{report['speedup']:.2f}x** "
        f"| {report['speedup_unfused']:.2f}x | {rounds} |"
    )


if __name__ == "__main__":
    main()
