"""`ddetr bench loader`: images/s of the Rust data pipeline against the pipeline a user would
otherwise run, and COCO annotation parse time/memory against pycocotools.

Python API:
    bench_loader_report(data=None, workers=2, batch_size=2, images=192, train=True,
                        parse_size_mb=0, synth_images=48, repeats=3, warmup_s=1.0) -> report dict

Throughput rows, all over the same image files and with the same number of workers:
  - rust:        `ddetr_cli.data.CocoLoader` (decode, official augmentations, normalise, pad);
  - pillow:      torch DataLoader(num_workers=N) over `loader_reference.ReferenceCocoDataset`
                 (Pillow decode + the same transforms in torchvision, as the official code does);
  - decode-only: libjpeg-turbo (`cv2.imdecode`) on the raw files in N threads, nothing else: the
                 ceiling of any pipeline that has to decode every image.
Each pipeline first runs `warmup_s` seconds untimed (worker start-up, first-touch page faults while
buffers grow to the largest batch, cold caches: one-off costs in a long epoch; measured, the Rust
pipeline's page faults settle after ~400 images); timing then covers `images` images;
the pipelines run round-robin `repeats` times and the best rate of each is reported.
Parse rows: each parser in a fresh subprocess on a generated annotation file of `parse_size_mb`
MB shaped like COCO train2017 (polygon/RLE segmentations, crowd flags, 91 categories); peak is
the subprocess's maximum resident memory, `delta` the part above its pre-parse footprint.
"""

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import typer

from ddetr_cli.console import UserError, console, info
from ddetr_cli.datasets import resolve_split
from ddetr_cli.runs import write_json

EXAMPLES = [
    "ddetr bench loader",
    "ddetr bench loader --data /datasets/coco --workers 4 --images 400",
    "ddetr bench loader --val --batch-size 4",
    "ddetr bench loader --parse-size-mb 450 --json loader.json",
]


def _rate(batches, images: int, warmup_s: float) -> float:
    """Images/s over `images` images after at least one batch and `warmup_s` seconds: start-up
    and first-touch costs (worker start, buffers growing to their largest batch, caches) are
    excluded, as they are from the throughput of a long epoch."""
    it = iter(batches)
    next(it)
    warm_until = time.perf_counter() + warmup_s
    while time.perf_counter() < warm_until:
        next(it)
    done, start = 0, time.perf_counter()
    for batch in it:
        done += batch
        if done >= images:
            break
    return done / (time.perf_counter() - start)


def _endless(make_epoch):
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def rust_rate(
    images_dir: Path, ann: Path, train: bool, workers: int, batch_size: int, images: int, warmup_s: float
) -> float:
    from ddetr_cli.data import CocoLoader

    loader = CocoLoader(images_dir, ann, train=train, batch_size=batch_size, workers=workers, drop_last=True)

    def epoch(n):
        loader.set_epoch(n)
        return (len(targets) for _, _, targets in loader)

    return _rate(_endless(epoch), images, warmup_s)


def pillow_rate(
    images_dir: Path, ann: Path, train: bool, workers: int, batch_size: int, images: int, warmup_s: float
) -> float:
    import torch

    from ddetr_cli import loader_reference as ref

    dataset = ref.ReferenceCocoDataset(images_dir, ann, train=train)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=ref.collate,
        persistent_workers=workers > 0,
    )
    return _rate(_endless(lambda _: (len(t) for _, _, t in loader)), images, warmup_s)


def decode_only_rate(paths: list[Path], workers: int, images: int, warmup_s: float) -> float:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)

    def decode(path: Path) -> int:
        data = np.frombuffer(path.read_bytes(), np.uint8)
        return int(cv2.imdecode(data, cv2.IMREAD_COLOR) is not None)

    order = [paths[i % len(paths)] for i in range(images)]
    with ThreadPoolExecutor(workers) as pool:
        warm_until = time.perf_counter() + warmup_s
        while True:  # at least one round
            list(pool.map(decode, order[: 4 * workers]))
            if time.perf_counter() >= warm_until:
                break
        start = time.perf_counter()
        done = sum(pool.map(decode, order))
    return done / (time.perf_counter() - start)


def write_coco_like_annotations(path: Path, size_mb: float, seed: int = 0) -> dict:
    """Writes a COCO train2017-shaped instances file of about `size_mb` MB; returns its counts.

    Per MB like train2017 (448 MB): ~264 images and ~1920 annotations, each with a polygon of
    ~25 points (1% crowd RLE), plus info, licenses and 80 categories with ids in 1..90."""
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    polygons = [
        "[[" + ",".join(f"{rng.uniform(0, 640):.2f}" for _ in range(2 * rng.randint(8, 40))) + "]]"
        for _ in range(2000)
    ]
    rle = '{"counts":[' + ",".join(str(rng.randint(0, 500)) for _ in range(300)) + '],"size":[480,640]}'
    category_ids = sorted(rng.sample(range(1, 91), 80))
    n_images = max(1, int(size_mb * 264))
    with open(path, "w") as f:
        f.write('{"info":{"description":"synthetic COCO-shaped annotations","version":"1.0","year":2017},')
        f.write('"licenses":[{"url":"http://example.com","id":1,"name":"CC"}],"images":[')
        f.write(
            ",".join(
                f'{{"license":1,"file_name":"{i:012d}.jpg","coco_url":"http://x/{i:012d}.jpg",'
                f'"height":480,"width":640,"date_captured":"2013-11-14 16:28:13","id":{i}}}'
                for i in range(1, n_images + 1)
            )
        )
        f.write('],"annotations":[')
        n_anns, first = 0, True
        while f.tell() < target - 20_000:
            chunk = []
            for _ in range(1000):
                n_anns += 1
                crowd = rng.random() < 0.01
                x, y = rng.uniform(0, 500), rng.uniform(0, 400)
                w, h = rng.uniform(1, 140), rng.uniform(1, 80)
                chunk.append(
                    f'{{"segmentation":{rle if crowd else rng.choice(polygons)},"area":{w * h:.3f},'
                    f'"iscrowd":{int(crowd)},"image_id":{rng.randint(1, n_images)},'
                    f'"bbox":[{x:.2f},{y:.2f},{w:.2f},{h:.2f}],"category_id":{rng.choice(category_ids)},'
                    f'"id":{n_anns}}}'
                )
            f.write(("" if first else ",") + ",".join(chunk))
            first = False
        f.write('],"categories":[')
        f.write(",".join(f'{{"supercategory":"s","id":{c},"name":"class{c}"}}' for c in category_ids))
        f.write("]}")
    return {"images": n_images, "annotations": n_anns, "mb": path.stat().st_size / 1e6}


_PARSE_SCRIPT = """
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * {page} / 2**20
{imports}
before = rss_mb()
start = time.perf_counter()
{parse}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "peak_mb": peak, "delta_mb": peak - before}}))
"""
_PARSERS = {
    "rust": ("from ddetr_cli import _loader", "_loader.parse_annotations(sys.argv[1])"),
    "pycocotools": (
        "import contextlib, io\nfrom pycocotools.coco import COCO",
        "with contextlib.redirect_stdout(io.StringIO()):\n    COCO(sys.argv[1])",
    ),
}


def parse_cost(parser: str, path: Path) -> dict:
    """Seconds, peak RSS and peak minus pre-parse RSS (MB) of one parser, in a fresh process."""
    imports, parse = _PARSERS[parser]
    script = _PARSE_SCRIPT.format(page=os.sysconf("SC_PAGE_SIZE"), imports=imports, parse=parse)
    command = [sys.executable, "-c", script, str(path)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_loader_report(
    data: Optional[Path] = None,
    workers: int = 2,
    batch_size: int = 2,
    images: int = 192,
    train: bool = True,
    parse_size_mb: float = 0,
    synth_images: int = 48,
    repeats: int = 3,
    warmup_s: float = 1.0,
) -> dict:
    """Runs the benchmark (see the module docstring); every ratio comes from this one run."""
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "workers": workers,
        "batch_size": batch_size,
        "split": "train" if train else "val",
        "warmup_s": warmup_s,
    }
    with tempfile.TemporaryDirectory(prefix="ddetr-bench-loader-") as tmp:
        if images > 0:
            if data is None:
                from ddetr_cli.synth import make_synthetic_coco

                info(f"generating {synth_images} synthetic COCO-sized images (480-640 px) ...")
                data = Path(tmp) / "data"
                make_synthetic_coco(data, synth_images, synth_images, image_size=(480, 640), seed=0)
                report["data"] = f"synthetic: {synth_images} JPEGs of 480..640 px per split"
            else:
                report["data"] = str(data)
            split = resolve_split(str(data), "train" if train else "val")
            images_dir, ann = split.images_dir, split.annotation_file
            paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
            if not paths:
                raise UserError(f"{images_dir}: no JPEG files")
            runs = {
                "decode-only": lambda: decode_only_rate(paths, workers, images, warmup_s),
                "rust": lambda: rust_rate(images_dir, ann, train, workers, batch_size, images, warmup_s),
                "pillow": lambda: pillow_rate(images_dir, ann, train, workers, batch_size, images, warmup_s),
            }
            # Round-robin repeats, best of each: on a shared machine the least-disturbed run of
            # every pipeline is the fairest comparison.
            samples: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(repeats):
                for name, run in runs.items():
                    info(f"[{r + 1}/{repeats}] {name} ({workers} workers) ...")
                    samples[name].append(run())
            rates = {name: max(values) for name, values in samples.items()}
            report["images_per_s"] = rates
            report["images_per_s_all_runs"] = samples
            report["repeats"] = repeats
            report["rust_vs_pillow"] = rates["rust"] / rates["pillow"]
            report["rust_vs_decode_only"] = rates["rust"] / rates["decode-only"]
        if parse_size_mb > 0:
            path = Path(tmp) / "instances_big.json"
            info(f"writing a {parse_size_mb:.0f} MB COCO-shaped annotation file ...")
            report["parse_file"] = write_coco_like_annotations(path, parse_size_mb)
            parse = {}
            for parser in ("rust", "pycocotools"):
                info(f"parsing with {parser} ...")
                parse[parser] = parse_cost(parser, path)
            report["parse"] = parse
            report["parse_speedup"] = parse["pycocotools"]["seconds"] / parse["rust"]["seconds"]
            report["parse_peak_ratio"] = parse["rust"]["peak_mb"] / parse["pycocotools"]["peak_mb"]
    return report


def _print_report(report: dict) -> None:
    from rich.table import Table

    if "images_per_s" in report:
        table = Table(
            title=f"Data pipeline, {report['split']} transforms ({report['workers']} workers, "
            f"batch {report['batch_size']}, {report['machine']})"
        )
        table.add_column("pipeline")
        table.add_column("images/s", justify="right")
        table.add_column("rust is", justify="right")
        rates = report["images_per_s"]
        for name, rate in rates.items():
            table.add_row(name, f"{rate:.1f}", f"{rates['rust'] / rate:.2f}x")
        console.print(table)
    if "parse" in report:
        f = report["parse_file"]
        title = f"Annotation parse: {f['mb']:.0f} MB, {f['images']} images, {f['annotations']} annotations"
        table = Table(title=title)
        for column in ("parser", "seconds", "peak MB", "delta MB"):
            table.add_column(column, justify="right" if column != "parser" else "left")
        for name, row in report["parse"].items():
            table.add_row(name, f"{row['seconds']:.2f}", f"{row['peak_mb']:.0f}", f"{row['delta_mb']:.0f}")
        console.print(table)
        console.print(
            f"rust parses {report['parse_speedup']:.1f}x faster at "
            f"{100 * report['parse_peak_ratio']:.0f}% of pycocotools' peak memory"
        )


def bench_loader(
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="COCO-style dataset dir (annotations/instances_<split>*.json + images folder). "
        "Default: a generated synthetic dataset of COCO-sized JPEGs.",
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="Worker threads (rust) / processes (baseline)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Images per batch."),
    images: int = typer.Option(192, "--images", min=0, help="Images timed per pipeline (0: no throughput)."),
    warmup_s: float = typer.Option(
        1.0, "--warmup-s", min=0, help="Seconds each pipeline runs untimed first (start-up, buffers, caches)."
    ),
    val: bool = typer.Option(False, "--val", help="Time the evaluation transform instead of training's."),
    parse_size_mb: float = typer.Option(
        0,
        "--parse-size-mb",
        min=0,
        help="Also time parsing a generated annotation file of this size (COCO: 450).",
    ),
    synth_images: int = typer.Option(48, "--synth-images", min=2, help="Images per split when generating."),
    repeats: int = typer.Option(
        3, "--repeats", min=1, help="Round-robin runs per pipeline; best is reported."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this path."),
) -> None:
    """Benchmark the Rust data loader: images/s of the train (or val) pipeline against the torch
    DataLoader + Pillow baseline with the same transforms and workers, the libjpeg-turbo
    decode-only ceiling on the same files, and (with --parse-size-mb) annotation parse time and
    peak memory against pycocotools.
    """
    report = bench_loader_report(
        data=data,
        workers=workers,
        batch_size=batch_size,
        images=images,
        train=not val,
        parse_size_mb=parse_size_mb,
        synth_images=synth_images,
        repeats=repeats,
        warmup_s=warmup_s,
    )
    _print_report(report)
    if json_out is not None:
        write_json(json_out, report)
        console.print(f"Wrote {json_out}")
