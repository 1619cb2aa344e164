"""The demo (the engine behind `ddetr demo`): generate data, train a tiny Deformable DETR,
evaluate it and draw its detections.

Everything runs locally with nothing to download: the synthetic shapes dataset
(`ddetr_cli.synth`), the `tiny` preset (`ddetr_cli.presets`) and the same Python functions the
`train`, `eval` and `predict` commands run. The output directory (default `runs/demo`) holds

    data/            the generated dataset (train/, val/, annotations/)
    train/           the training run (weights/last.pt, metrics.csv, results.png, args.yaml, ...)
    metrics.json     COCO metrics of the trained model on data/val (the `ddetr eval` format)
    detections.json  its detections on data/val (COCO results format)
    vis/             pictures of the detections on some val images

Python API:
    result = demo(out="runs/demo", fast=False, seed=0, device="cpu")
    result.metrics["AP50"], result.run_dir, result.vis_dir, result.seconds
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from ddetr_cli.console import UserError, console, info
from ddetr_cli.engine.evaluation import evaluate
from ddetr_cli.engine.prediction import predict
from ddetr_cli.engine.thresholds import F1Threshold, best_f1_threshold
from ddetr_cli.engine.trainer import train
from ddetr_cli.synth import make_synthetic_coco

# `--fast`: fewer images and epochs; enough to see the loss fall and AP rise (CI runs it).
FAST = {"num_train": 128, "num_val": 32, "epochs": 12}
LR_DROP_AT = 0.8  # the 10x learning-rate drop comes after this fraction of the epochs (paper: 40 of 50)
NUM_VIS = 8  # val images drawn with their detections


@dataclass
class DemoResult:
    out: Path
    data: Path
    run_dir: Path
    weights: Path
    metrics: dict
    metrics_file: Path
    vis_dir: Path
    history: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    picture_threshold: F1Threshold | None = None  # the score the pictures are drawn at (best val F1)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    epochs: int | None = None,
    fast: bool = False,
    seed: int = 0,
    device: str | None = "cpu",
    num_train: int | None = None,
    num_val: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    show: bool = True,
) -> DemoResult:
    """synth -> train (preset `tiny`) -> eval -> predict with pictures; see the module docstring.

    threads: torch intra-op CPU threads (None: torch's default, one per core). On a machine that is
    busy with other work 1 can be faster, above all when OpenMP threads spin (the `ddetr` command
    makes them wait passively unless OMP_WAIT_POLICY is set).
    """
    from ddetr_cli.presets import get_preset

    preset = get_preset("tiny")
    data_spec = preset["data"]
    if fast:
        data_spec.update(num_train=FAST["num_train"], num_val=FAST["num_val"])
        epochs = FAST["epochs"] if epochs is None else epochs
    if num_train is not None:
        data_spec["num_train"] = num_train
    if num_val is not None:
        data_spec["num_val"] = num_val
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if data_spec["num_train"] < preset["train"]["batch_size"] or data_spec["num_val"] < 1:
        raise UserError(
            f"the demo needs at least {preset['train']['batch_size']} training and 1 validation image"
        )

    epochs = preset["train"]["epochs"] if epochs is None else epochs
    args = (Path(out), data_spec, epochs, seed, device, workers, show)
    if threads is None:
        return _run_demo(*args)
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    from ddetr_cli.threads import intra_op_threads

    with intra_op_threads(threads):
        return _run_demo(*args)


def _run_demo(out: Path, data_spec: dict, epochs: int, seed, device, workers, show) -> DemoResult:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    kernel_build = _start_kernel_build(device)
    data = out / "data"
    info(
        f"[bold]1/4[/bold] Generating {data_spec['num_train']} train + {data_spec['num_val']} val images "
        f"of shapes in {escape(str(data))}"
    )
    try:
        make_synthetic_coco(
            data,
            data_spec["num_train"],
            data_spec["num_val"],
            tuple(data_spec["image_size"]),
            seed=seed,
            objects_per_image=tuple(data_spec["objects_per_image"]),
            train_objects_per_image=tuple(data_spec["train_objects_per_image"]),
        )
    except OSError as err:
        raise UserError(f"{data}: cannot write the dataset ({err})") from None
    finally:
        kernel_build.join()
    seconds["synth"] = time.perf_counter() - start

    info(f"[bold]2/4[/bold] Training a tiny Deformable DETR (preset 'tiny') for {epochs} epochs")
    t0 = time.perf_counter()
    trained = train(
        str(data),
        preset="tiny",
        epochs=epochs,
        lr_drop=max(1, round(LR_DROP_AT * epochs)),
        eval_interval=epochs,  # evaluated once, at the end
        device=device,
        workers=workers,
        seed=seed,
        project=out,
        name="train",
        exist_ok=True,
    )
    seconds["train"] = time.perf_counter() - t0
    if trained.interrupted:  # Ctrl-C: the trainer saved; the command line exits with 130
        raise KeyboardInterrupt
    weights = trained.last

    info("[bold]3/4[/bold] Evaluating on the val split")
    t0 = time.perf_counter()
    metrics_file = out / "metrics.json"
    metrics = evaluate(
        weights=weights,
        data=str(data),
        split="val",
        out=metrics_file,
        save_detections=out / "detections.json",
        device=device,
        batch_size=8,
        workers=2 if workers is None else workers,
        show=False,
    )
    seconds["eval"] = time.perf_counter() - t0
    val_annotations = data / "annotations" / "instances_val.json"
    picture = best_f1_threshold(
        json.loads(val_annotations.read_text()), json.loads((out / "detections.json").read_text())
    )
    info(
        f"Pictures drawn at score >= {picture.threshold:.2f}, the val split's best F1 ({picture.f1:.3f}: "
        f"precision {picture.precision:.3f}, recall {picture.recall:.3f})"
    )

    info(f"[bold]4/4[/bold] Drawing detections on {NUM_VIS} val images")
    t0 = time.perf_counter()
    vis_dir = out / "vis"
    val_images = sorted((data / "val").glob("*.jpg"))[:NUM_VIS]
    predict(
        [str(p) for p in val_images],
        weights=weights,
        out=out / "predictions.json",
        ann=val_annotations,
        save_vis=vis_dir,
        score_thr=picture.threshold,
        device=device,
        workers=2 if workers is None else workers,
    )
    seconds["predict"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start

    result = DemoResult(
        out=out,
        data=data,
        run_dir=trained.run_dir,
        weights=weights,
        metrics=metrics,
        metrics_file=metrics_file,
        vis_dir=vis_dir,
        history=list(trained.history),
        seconds=seconds,
        picture_threshold=picture,
    )
    if show:
        _report(result)
    return result


def _start_kernel_build(device: str | None) -> threading.Thread:
    """Compile the deformable-attention kernel (on a fresh machine ~15 s of one core, in a compiler
    process) while this process draws the dataset on the other core. The training's first forward
    would build it anyway; a failed build is reported there, and the reference op is used."""
    from ddetr_cli import ops
    from ddetr_cli.distributed import resolve_device

    device_type = resolve_device(device).type  # a bad --device is one line now, before any work

    def build() -> None:
        if os.environ.get("DDETR_MSDA", "").strip().lower() != "reference":
            ops.kernel_available(device_type)

    thread = threading.Thread(target=build, name="ddetr-kernel-build", daemon=True)
    thread.start()
    return thread


def _report(result: DemoResult) -> None:
    from rich.table import Table

    from ddetr_cli import coco_eval

    n_val = len(list((result.data / "val").glob("*.jpg")))
    console.print(coco_eval.metrics_table(result.metrics, title=f"Demo: COCO bbox AP on {n_val} val images"))
    console.print(coco_eval.per_class_table(result.metrics["per_class"]))
    table = Table(title="Demo outputs", show_header=False)
    pictures = escape(str(result.vis_dir))
    if result.picture_threshold is not None:
        pictures += f" (score >= {result.picture_threshold.threshold:.2f}, best val F1)"
    table.add_row("pictures", pictures)
    table.add_row("run directory", escape(str(result.run_dir)))
    table.add_row("weights", escape(str(result.weights)))
    table.add_row("metrics", escape(str(result.metrics_file)))
    table.add_row("dataset", escape(str(result.data)))
    s = result.seconds
    table.add_row(
        "time",
        f"{s['total']:.0f}s (data {s['synth']:.0f}s, train {s['train']:.0f}s, eval {s['eval']:.0f}s, "
        f"pictures {s['predict']:.0f}s)",
    )
    console.print(table)
    console.print(
        "Next: [bold]ddetr predict YOUR_IMAGES --weights "
        f"{escape(str(result.weights))} --save-vis vis/[/bold]"
    )
