"""`ddetr bench op`: the multi-scale deformable attention op alone, every available backend side by
side (PyTorch reference, compiled CPU kernel, compiled CUDA kernel) at the standard shapes.

Python API:
    bench_op_report(shapes=("encoder", "decoder"), batches=(1, 2), dtypes=None, device=None,
                    backends=None, warmup=1, repeats=5, backward=True, locations="uniform") -> report dict

Timing: `warmup` untimed rounds, then the median of `repeats` timed ones; a round times every
backend once in turn (interleaved, so that a shared machine's load drifts hit all backends alike),
with a CUDA synchronise before each clock read. "forward" runs under no_grad (inference);
"fwd+bwd" is a forward with gradients followed by the backward for value, sampling locations and
attention weights. Speed-ups are against the reference at the same shape, batch and dtype,
measured in the same run. Sampling locations are uniform over the maps (scattered reads: the
default) or, with locations="local", model-like (each point within 4 pixels of its query).
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.benchmarking import device_name
from ddetr_cli.console import UserError, console, info

EXAMPLES = [
    "ddetr bench op",
    "ddetr bench op --shapes encoder --batch 1 --dtypes float32 --repeats 3 --json op.json",
    "ddetr bench op --device cuda --dtypes float32,bfloat16 --repeats 20",
    "ddetr bench op --backends cpu,reference --no-backward",
    "ddetr bench op --shapes encoder --batch 1 --locations local",
]
SHAPES = ("encoder", "decoder")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}
DTYPES.update({"bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"})
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "float16", "bfloat16")}
LOCATIONS = ("uniform", "local")


def _op_for(backend: str):
    """A callable (value, shapes, starts, loc, attn) -> out that runs exactly `backend`."""
    import torch

    from ddetr_cli import ops

    return ops.ms_deform_attn_reference if backend == "reference" else torch.ops.ddetr.ms_deform_attn_forward


def _time_backends(backends: list[str], inputs, device, warmup: int, repeats: int, backward: bool) -> dict:
    """{backend: {"forward_ms"[, "forward_backward_ms"]}}: medians over `repeats` rounds, each round
    timing every backend once in turn, so that a shared machine's changing load hits all alike."""
    import statistics
    import time

    import torch

    from ddetr_cli.benchmarking import synchronize

    value, spatial, starts, loc, attn = inputs
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]

    def forward(op):
        with torch.no_grad():
            op(*inputs)

    def forward_backward(op):
        out = op(leaves[0], spatial, starts, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    steps = {"forward_ms": forward} | ({"forward_backward_ms": forward_backward} if backward else {})
    times = {b: {key: [] for key in steps} for b in backends}
    for round_ in range(warmup + repeats):
        for backend in backends:
            for key, step in steps.items():
                synchronize(device)
                start = time.perf_counter()
                step(_op_for(backend))
                synchronize(device)
                if round_ >= warmup:
                    times[backend][key].append(time.perf_counter() - start)
    return {b: {key: statistics.median(t) * 1e3 for key, t in by_key.items()} for b, by_key in times.items()}


def available_backends(device) -> list[str]:
    """The reference plus the compiled kernel for `device`, if it builds here."""
    from ddetr_cli import ops

    return ["reference"] + ([device.type] if ops.kernel_available(device.type) else [])


def bench_op_report(
    shapes=SHAPES,
    batches=(1, 2),
    dtypes=None,
    device: Optional[str] = None,
    backends=None,
    warmup: int = 1,
    repeats: int = 5,
    backward: bool = True,
    locations: str = "uniform",
) -> dict:
    """Time every (shape, batch, dtype, backend); see the module docstring for the method."""
    import torch

    from ddetr_cli.ops_inputs import make_inputs, standard_shapes

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if dev.type not in DEVICE_DTYPES:
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    for name in shapes:
        if name not in SHAPES:
            raise UserError(f"--shapes: unknown shape {name!r}; expected {', '.join(SHAPES)}")
    dtype_names = [DTYPES.get(d, d) for d in (dtypes or DEVICE_DTYPES[dev.type])]
    for name in dtype_names:
        if name not in DTYPES.values():
            expected = "float32, float16, bfloat16 or float64"
            raise UserError(f"--dtypes: unknown dtype {name!r}; expected {expected}")
    if locations not in LOCATIONS:
        raise UserError(f"--locations must be {' or '.join(LOCATIONS)}, got {locations!r}")
    usable = available_backends(dev)
    chosen = list(backends or usable)
    for name in chosen:
        if name not in ("reference", "cpu", "cuda"):
            raise UserError(f"--backends: unknown backend {name!r}; expected reference, cpu or cuda")
        if name not in usable:
            raise UserError(f"--backends: {name} is not available on {dev.type} here (available: {usable})")
    if "reference" in chosen:  # the baseline runs first so its time is at hand for the speed-ups
        chosen = ["reference"] + [b for b in chosen if b != "reference"]

    rows = []
    for batch in batches:
        for shape in (s for s in standard_shapes(batch) if s.name in shapes):
            for dtype_name in dtype_names:
                dtype = getattr(torch, dtype_name)
                inputs = make_inputs(shape, dtype, device=dev, locations=locations)
                baseline = {}
                info(f"{shape.name} batch {batch} {dtype_name}: {', '.join(chosen)}...")
                timings = _time_backends(chosen, inputs, dev, warmup, repeats, backward)
                for backend in chosen:
                    row = {"shape": shape.name, "batch": batch, "queries": shape.queries, "dtype": dtype_name}
                    row["backend"] = backend
                    row.update(timings[backend])
                    for key in ("forward_ms", "forward_backward_ms"):
                        if key not in row:
                            continue
                        if backend == "reference":
                            baseline[key] = row[key]
                        if key in baseline:
                            row[key.replace("_ms", "_speedup")] = baseline[key] / row[key]
                    rows.append(row)
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "locations": locations,
        "results": rows,
    }


def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "-"


def _print_report(report: dict) -> None:
    from rich import box
    from rich.table import Table

    details = f"{report['threads']} threads, torch {report['torch']}, {report['locations']} locations"
    where = f"{report['device']} ({details})"
    table = Table(title=f"Deformable attention op - {where}", box=box.SIMPLE_HEAD)
    for column in ("shape", "B", "dtype", "backend"):
        table.add_column(column, no_wrap=True)
    # "x ref": speed-up over the reference at the same shape, batch and dtype.
    for column in ("fwd ms", "x ref", "fwd+bwd ms", "x ref"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in report["results"]:
        table.add_row(
            r["shape"],
            str(r["batch"]),
            r["dtype"],
            r["backend"],
            _cell(r, "forward_ms", "{:.2f}"),
            _cell(r, "forward_speedup", "{:.2f}x"),
            _cell(r, "forward_backward_ms", "{:.2f}"),
            _cell(r, "forward_backward_speedup", "{:.2f}x"),
        )
    console.print(table)


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [p.strip().lower() for p in text.split(",") if p.strip()] if text else None


def bench_op(
    shapes: str = typer.Option("encoder,decoder", "--shapes", help="Comma-separated: encoder, decoder."),
    batch: str = typer.Option("1,2", "--batch", help="Comma-separated batch sizes."),
    dtypes: Optional[str] = typer.Option(
        None,
        "--dtypes",
        help="Comma-separated dtypes. Default: cpu float32,bfloat16; cuda float32,float16,bfloat16.",
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    backends: Optional[str] = typer.Option(
        None, "--backends", help="Comma-separated subset of reference,cpu,cuda (default: all available)."
    ),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed calls first."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed calls; the median is reported."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Also time forward+backward."),
    locations: str = typer.Option(
        "uniform",
        "--locations",
        help="Sampling locations: uniform over the maps, or local (model-like: within 4 px of each query).",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this path."),
) -> None:
    """Benchmark the deformable attention op: forward and forward+backward time of every available
    backend (reference, CPU kernel, CUDA kernel) at the 800x1333 encoder shape (22,223 queries,
    levels 100x167/50x84/25x42/13x21, M=8, D=32, L=4, K=4) and the 300-query decoder shape, with
    the speed-up over the PyTorch reference measured in the same run.
    """
    try:
        batches = [int(b) for b in _split(batch) or []]
    except ValueError:
        raise UserError(f"--batch must be comma-separated integers, got {batch!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch must hold positive integers, got {batch!r}")
    report = bench_op_report(
        shapes=_split(shapes) or list(SHAPES),
        batches=batches,
        dtypes=_split(dtypes),
        device=device,
        backends=_split(backends),
        warmup=warmup,
        repeats=repeats,
        backward=backward,
        locations=locations.lower(),
    )
    _print_report(report)
    if json_out is not None:
        from ddetr_cli.runs import write_json

        write_json(json_out, report)
        console.print(f"Wrote {json_out}")
