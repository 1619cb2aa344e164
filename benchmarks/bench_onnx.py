"""PyTorch (compiled MSDA kernel) against onnxruntime on the same exported model, same run.

    python benchmarks/bench_onnx.py --imgsz 800x1066 --iters 5 --variant plain

Builds the R50 Deformable DETR (random weights: speed does not depend on them), exports it with
`export_onnx` (`--input normalized`, fixed size, batch 1), then times, interleaved so that load on
the machine hits both alike: PyTorch forward + postprocess (MSDA on the compiled CPU kernel, as
`ddetr predict` runs), and onnxruntime on the CPU provider (MSDA as GridSample), same thread count.
`--reference` adds PyTorch with the grid_sample reference op (what the ONNX graph computes).
Prints one JSON line: medians (ms), ratios, max score difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", default="800x1066")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--variant", choices=["plain", "box-refine", "two-stage"], default="plain")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reference", action="store_true", help="also time PyTorch with the reference op")
    args = parser.parse_args()

    import onnxruntime as ort

    from ddetr_cli import ops
    from ddetr_cli.engine.export import export_onnx, parse_imgsz
    from ddetr_cli.model import DeformableDetrConfig, build_model, model_checkpoint, postprocess

    torch.set_num_threads(args.threads)
    h, w = parse_imgsz(args.imgsz)
    refine = args.variant != "plain"
    config = DeformableDetrConfig(with_box_refine=refine, two_stage=args.variant == "two-stage")
    torch.manual_seed(0)
    model = build_model(config).eval()
    images = torch.randn(1, 3, h, w)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    sizes = torch.tensor([[h, w]])

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "r50.pt"
        torch.save(model_checkpoint(model), weights)
        start = time.perf_counter()
        onnx_path = export_onnx(weights, Path(tmp) / "r50.onnx", imgsz=(h, w), input_form="normalized")
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run_torch():
        with torch.no_grad():
            return postprocess(model(images, mask), sizes)[0]["scores"]

    def run_reference():
        os.environ["DDETR_MSDA"] = "reference"
        try:
            return run_torch()
        finally:
            os.environ.pop("DDETR_MSDA")

    def run_onnx():
        return torch.from_numpy(session.run(None, {"images": images.numpy(), "mask": mask.numpy()})[0][0])

    runs = {"pytorch_kernel": run_torch, "onnxruntime": run_onnx}
    if args.reference:
        runs["pytorch_reference"] = run_reference
    outputs = {"pytorch_kernel": run_torch()}  # warm-up (and the kernel build, if any)
    backend = ops.backend()  # the one that call used
    outputs.update({name: fn() for name, fn in runs.items() if name != "pytorch_kernel"})
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.iters):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    medians = {name: round(statistics.median(t), 1) for name, t in times.items()}
    report = {
        "imgsz": f"{h}x{w}",
        "variant": args.variant,
        "threads": args.threads,
        "iters": args.iters,
        "msda_backend": backend,
        "export_s": round(export_s, 1),
        "median_ms": medians,
        "onnxruntime_over_pytorch": round(medians["onnxruntime"] / medians["pytorch_kernel"], 2),
        "max_score_diff": float((outputs["onnxruntime"] - outputs["pytorch_kernel"]).abs().max()),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
