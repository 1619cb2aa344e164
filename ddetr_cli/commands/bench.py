"""`ddetr bench`: model inference speed, per-stage times and the MSDA backend against the reference.

The Typer face of `ddetr_cli.engine.benchmark.bench` (the Python API); `bench op` and `bench loader`
are subcommands in their own modules.
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.commands.options import AMP_OPTION, DEVICE_OPTION, HUB_HELP, ONNX_HELP
from ddetr_cli.distributed import Amp
from ddetr_cli.engine.benchmark import bench
from ddetr_cli.engine.settings import resolve_settings

HELP = (
    "Benchmark model inference: images/s, latency percentiles, per-stage breakdown, the MSDA "
    "backend against the PyTorch reference, and optionally Hugging Face transformers on the same "
    "weights. Subcommands benchmark the op and the data loader."
)
EXAMPLES = [
    "ddetr bench --variant plain --imgsz 800x1333 --device cuda --json bench.json",
    "ddetr bench --weights runs/train/exp/weights/best.pt --device cpu --imgsz 320x480 --iters 20",
    "ddetr bench --variant two-stage --amp bf16 --batch-size 2",
    "ddetr bench --preset tiny --imgsz 192x224 --device cpu",
    "ddetr bench --imgsz 800x1066 --device cpu --compare-hf --no-reference --iters 5",
]


def command(
    ctx: typer.Context,
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        "-w",
        help="Checkpoint to benchmark: a local file or folder" + HUB_HELP + ONNX_HELP,
    ),
    variant: str = typer.Option(
        "plain", "--variant", help="Without --weights: a random-weight model, plain, box-refine or two-stage."
    ),
    backbone: str = typer.Option("resnet50", "--backbone", help="Without --weights: the backbone."),
    imgsz: str = typer.Option("800x1333", "--imgsz", help="Input size HxW (or one number for square)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: Optional[str] = DEVICE_OPTION,
    amp: Amp = AMP_OPTION,
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed passes first."),
    iters: int = typer.Option(10, "--iters", min=1, help="Timed passes."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Without --weights: a preset's model (e.g. tiny)."
    ),
    hidden_dim: Optional[int] = typer.Option(
        None, "--hidden-dim", help="Without --weights: transformer width."
    ),
    enc_layers: Optional[int] = typer.Option(None, "--enc-layers", help="Without --weights: encoder layers."),
    dec_layers: Optional[int] = typer.Option(None, "--dec-layers", help="Without --weights: decoder layers."),
    num_queries: Optional[int] = typer.Option(
        None, "--num-queries", help="Without --weights: object queries."
    ),
    no_reference: bool = typer.Option(False, "--no-reference", help="Skip the reference-backend comparison."),
    compare_hf: bool = typer.Option(
        False,
        "--compare-hf",
        help="Also time Hugging Face transformers' DeformableDetrForObjectDetection on the same weights "
        "and input, interleaved with ddetr (needs transformers and timm).",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    model_options = {}
    if preset is not None:
        model_options, _ = resolve_settings({"preset": preset})
        backbone = model_options.pop("backbone", backbone)
        if variant == "plain" and model_options.get("with_box_refine"):
            variant = "two-stage" if model_options.get("two_stage") else "box-refine"
    sizes = {
        "hidden_dim": hidden_dim,
        "enc_layers": enc_layers,
        "dec_layers": dec_layers,
        "num_queries": num_queries,
    }
    model_options.update({k: v for k, v in sizes.items() if v is not None})
    bench(
        model_options=model_options,
        weights=weights,
        variant=variant,
        imgsz=imgsz,
        batch_size=batch_size,
        device=device,
        amp=amp.value,
        warmup=warmup,
        iters=iters,
        backbone=backbone,
        compare_reference=not no_reference,
        compare_hf=compare_hf,
        json_out=json_out,
    )
