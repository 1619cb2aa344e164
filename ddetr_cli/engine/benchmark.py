"""Model inference speed (the engine behind `ddetr bench`): images/s, latency percentiles,
per-stage times, and the multi-scale deformable attention backend in use against the PyTorch
reference, in one run.

Python API:
    bench(weights=None, variant="plain", imgsz="800x1333", batch_size=1, device=None, amp="off",
          warmup=3, iters=10, compare_hf=False, json_out="bench.json") -> report dict

The model runs as inference does: its fused copy (ddetr_cli.model.fused). `compare_hf` adds Hugging
Face transformers' DeformableDetrForObjectDetection on the same weights, timed interleaved with ours
(ddetr_cli.engine.hf_compare).

Timing: `warmup` untimed forward passes, then `iters` timed ones (forward + post-processing), with a
CUDA synchronise before each clock read. The per-stage breakdown is a separate pass with forward
hooks on the stage modules (exclusive times: a head called inside the decoder counts as head only),
so its synchronisation does not slow the throughput figures.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ddetr_cli.benchmarking import device_name, latency_summary, synchronize
from ddetr_cli.console import UserError, console, info, warn
from ddetr_cli.engine.inference import is_onnx, parse_imgsz
from ddetr_cli.engine.settings import variant_config
from ddetr_cli.runs import write_json


@contextlib.contextmanager
def msda_backend(name: str | None):
    """Force the MSDA backend (DDETR_MSDA) inside the block; None leaves the automatic choice."""

    def force(backend: str | None) -> None:
        if backend is None:
            os.environ.pop("DDETR_MSDA", None)
        else:
            os.environ["DDETR_MSDA"] = backend

    old = os.environ.get("DDETR_MSDA")
    force(name)
    try:
        yield
    finally:
        force(old)


def time_inference(model, images, mask, device, amp, warmup: int, iters: int) -> dict:
    """Latency statistics (ms) and images/s of forward + post-processing."""
    import torch

    from ddetr_cli.distributed import autocast
    from ddetr_cli.model import postprocess

    sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=device)

    def forward_and_postprocess():
        with torch.no_grad(), autocast(device, amp):
            postprocess(model(images, mask), sizes)

    return time_calls(forward_and_postprocess, images.shape[0], device, warmup, iters)


def time_calls(run, batch_size: int, device, warmup: int, iters: int) -> dict:
    """`run()` `warmup` times untimed, then `iters` times timed -> latency (ms) and images/s."""
    latencies = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if i >= warmup:
            latencies.append((time.perf_counter() - start) * 1000)
    return latency_summary(latencies, batch_size)


def stage_modules(model) -> dict[str, list]:
    """Stage name -> the modules whose forward time belongs to it."""
    import torch.nn as nn

    def called(module):
        # ModuleLists are never called themselves; their members are.
        return list(module) if isinstance(module, nn.ModuleList) else [module]

    stages = {"backbone": [model.backbone], "input_proj": called(model.input_proj)}
    stages["encoder"] = [model.transformer.encoder]
    stages["decoder"] = [model.transformer.decoder]
    stages["heads"] = called(model.class_embed) + called(model.bbox_embed)
    return stages


def time_stages(model, images, mask, device, amp, iters: int) -> dict:
    """Mean exclusive milliseconds per stage (backbone, input_proj, encoder, decoder, heads,
    postprocess, other) over `iters` forward passes, measured with forward hooks."""
    import torch

    from ddetr_cli.distributed import autocast
    from ddetr_cli.model import postprocess

    totals: dict[str, float] = {}
    stack: list[list] = []  # [stage, start, time spent in nested stages]
    handles = []

    def pre_hook(stage):
        def hook(module, args):
            synchronize(device)
            stack.append([stage, time.perf_counter(), 0.0])

        return hook

    def post_hook(module, args, output):
        synchronize(device)
        stage, start, nested = stack.pop()
        elapsed = time.perf_counter() - start
        totals[stage] = totals.get(stage, 0.0) + elapsed - nested
        if stack:
            stack[-1][2] += elapsed

    seen = set()
    for stage, modules in stage_modules(model).items():
        for module in modules:
            if id(module) in seen:  # shared heads (plain variant) are hooked once
                continue
            seen.add(id(module))
            handles.append(module.register_forward_pre_hook(pre_hook(stage)))
            handles.append(module.register_forward_hook(post_hook))
    sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=device)
    forward_total = 0.0
    try:
        with torch.no_grad():
            for _ in range(iters):
                synchronize(device)
                start = time.perf_counter()
                with autocast(device, amp):
                    out = model(images, mask)
                synchronize(device)
                forward_total += time.perf_counter() - start
                start = time.perf_counter()
                postprocess(out, sizes)
                synchronize(device)
                totals["postprocess"] = totals.get("postprocess", 0.0) + time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    staged = sum(v for k, v in totals.items() if k != "postprocess")
    totals["other"] = max(0.0, forward_total - staged)
    order = ("backbone", "input_proj", "encoder", "decoder", "heads", "other", "postprocess")
    return {k: totals.get(k, 0.0) * 1000 / iters for k in order}


def bench(
    weights: str | Path | None = None,
    variant: str = "plain",
    imgsz: str = "800x1333",
    batch_size: int = 1,
    device: str | None = None,
    amp: str = "off",
    warmup: int = 3,
    iters: int = 10,
    backbone: str = "resnet50",
    model_options: dict | None = None,
    compare_reference: bool = True,
    compare_hf: bool = False,
    json_out: str | Path | None = None,
    show: bool = True,
) -> dict:
    """Benchmark inference of `weights` (or a randomly initialised `variant`) -> report dict."""
    import torch

    from ddetr_cli import ops
    from ddetr_cli.distributed import resolve_device
    from ddetr_cli.model.fused import fuse_for_inference

    height, width = parse_imgsz(imgsz)
    if batch_size < 1 or warmup < 0 or iters < 1:
        raise UserError("--batch-size and --iters must be >= 1, --warmup >= 0")
    dev = resolve_device(device)
    if compare_hf and (is_onnx(weights) or amp != "off"):
        raise UserError("--compare-hf compares PyTorch models in fp32: drop --amp and .onnx weights")
    if compare_hf:
        from ddetr_cli.engine.hf_compare import compare_hf as compare
        from ddetr_cli.engine.hf_compare import hf_twin, require_transformers

        require_transformers()  # before anything is built
    if is_onnx(weights):
        report = bench_onnx(weights, dev, height, width, batch_size, warmup, iters)
        return _finish(report, json_out, show)
    if weights is not None:
        from ddetr_cli.engine.inference import load_weights

        model = load_weights(weights, dev)
        source = str(weights)
    else:
        from ddetr_cli.model import DeformableDetrConfig, build_model

        try:
            fields = {"backbone": backbone, **(model_options or {}), **variant_config(variant)}
            config = DeformableDetrConfig(**fields)
        except ValueError as e:
            raise UserError(str(e)) from e
        model = build_model(config).to(dev)
        source = f"random {variant} {backbone}"
    model.eval()
    original, model = model, fuse_for_inference(model)
    twin = hf_twin(original) if compare_hf else None  # (refused before any timing)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(dev)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=dev)

    info(f"Benchmarking {source} on {dev} at {height}x{width}, batch {batch_size}, amp {amp} ...")
    with msda_backend(None):
        timing = time_inference(model, images, mask, dev, amp, warmup, iters)
        backend = ops.backend()
        stages = time_stages(model, images, mask, dev, amp, max(1, min(iters, 5)))
    backends = {backend: timing}
    if compare_reference and backend != "reference":
        with msda_backend("reference"):
            backends["reference"] = time_inference(model, images, mask, dev, amp, warmup, iters)
            if ops.backend() != "reference":
                warn("could not switch the MSDA op to the reference backend; comparison dropped")
                backends.pop("reference")

    report = {
        "model": {
            "source": source,
            "variant": "two-stage"
            if config.two_stage
            else ("box-refine" if config.with_box_refine else "plain"),
            "backbone": config.backbone,
            "num_queries": config.num_queries,
            "parameters": sum(p.numel() for p in original.parameters()),
        },
        "fused_for_inference": True,
        "device": str(dev),
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "imgsz": [height, width],
        "batch_size": batch_size,
        "amp": amp,
        "warmup": warmup,
        "iters": iters,
        "msda_backend": backend,
        **timing,
        "backends": backends,
        "stages_ms": stages,
    }
    if "reference" in backends and backend != "reference":
        report["speedup_vs_reference"] = (
            backends["reference"]["latency_ms"]["mean"] / timing["latency_ms"]["mean"]
        )
    if compare_hf:
        info("Against Hugging Face transformers on the same weights (interleaved) ...")
        report["hf_comparison"] = compare(original, images, mask, dev, warmup, iters, twin=twin)
    return _finish(report, json_out, show)


def bench_onnx(weights, device, height: int, width: int, batch_size: int, warmup: int, iters: int) -> dict:
    """Detections per second of a `ddetr export` file through onnxruntime (pre- and post-processing
    in the graph, as deployed)."""
    import torch

    from ddetr_cli.engine.onnx_detector import OnnxDetector

    detector = OnnxDetector(weights, device)
    info(f"Benchmarking {weights} (onnxruntime) on {device} at {height}x{width}, batch {batch_size} ...")
    images = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    sizes = torch.tensor([[height, width]] * batch_size)
    timing = time_calls(lambda: detector(images, mask, sizes), batch_size, device, warmup, iters)
    config = detector.config
    return {
        "model": {
            "source": str(weights),
            "variant": detector.metadata["variant"],
            "backbone": config.backbone,
            "num_queries": config.num_queries,
        },
        "device": str(device),
        "device_name": device_name(device),
        "imgsz": [height, width],
        "batch_size": batch_size,
        "warmup": warmup,
        "iters": iters,
        "msda_backend": "onnxruntime",
        **timing,
        "backends": {"onnxruntime": timing},
        "stages_ms": {},
    }


def _finish(report: dict, json_out, show: bool) -> dict:
    if json_out is not None:
        write_json(json_out, report)
    if show:
        _print_report(report)
        if json_out is not None:
            info(f"JSON: {json_out}")
    return report


def _print_report(report: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"Inference: {report['model']['source']} on {report['device_name']}", header_style="bold"
    )
    for col in ("MSDA backend", "images/s", "mean ms", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col, justify="right" if col != "MSDA backend" else "left")
    for name, t in report["backends"].items():
        lat = t["latency_ms"]
        label = f"{name} (in use)" if name == report["msda_backend"] else name
        table.add_row(
            label,
            f"{t['images_per_s']:.2f}",
            f"{lat['mean']:.1f}",
            f"{lat['p50']:.1f}",
            f"{lat['p90']:.1f}",
            f"{lat['p99']:.1f}",
        )
    console.print(table)
    if not report["stages_ms"]:  # onnxruntime runs the graph as one call
        return
    stages = Table(title="Per-stage time (ms per batch, exclusive)", header_style="bold")
    stages.add_column("stage")
    stages.add_column("ms", justify="right")
    stages.add_column("share", justify="right")
    total = sum(report["stages_ms"].values()) or 1.0
    for name, ms in report["stages_ms"].items():
        stages.add_row(name, f"{ms:.2f}", f"{100 * ms / total:.0f}%")
    console.print(stages)
    if "speedup_vs_reference" in report:
        console.print(
            f"MSDA {report['msda_backend']} vs reference: {report['speedup_vs_reference']:.2f}x end to end"
        )
    if "hf_comparison" in report:
        _print_hf(report["hf_comparison"])


def _print_hf(hf: dict) -> None:
    from rich.table import Table

    table = Table(title=f"ddetr vs transformers {hf['transformers']} (interleaved)", header_style="bold")
    for col in ("model", "images/s", "mean ms", "p50 ms"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, label in (("ddetr", "ddetr (fused)"), ("hf", "DeformableDetrForObjectDetection")):
        lat = hf[name]["latency_ms"]
        table.add_row(label, f"{hf[name]['images_per_s']:.2f}", f"{lat['mean']:.1f}", f"{lat['p50']:.1f}")
    console.print(table)
    det = hf["detections"]
    console.print(
        f"ddetr vs Hugging Face: {hf['speedup']:.2f}x (median latencies); same detections: scores within "
        f"{det['max_score_diff']:.1e}, boxes within {det['max_box_diff_px']:.1e} px, "
        f"{det['unmatched']} unmatched"
    )
