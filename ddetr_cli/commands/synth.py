"""`ddetr data synth`: write a synthetic COCO-format dataset of coloured shapes (no download)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape

from ddetr_cli.console import UserError, console, info

EXAMPLES = [
    "ddetr data synth --out data/shapes",
    "ddetr data synth --out data/shapes --num-train 2000 --num-val 200 --image-size 256,320 --seed 1",
    "ddetr train --data data/shapes --preset tiny --device cpu",
]


def parse_image_size(text: str) -> int | tuple[int, int]:
    """ "160" -> 160 (square images); "160,224" or "160-224" -> (160, 224) (sides drawn in range)."""
    parts = [p.strip() for p in text.replace("-", ",").split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) == 2:
        return (sizes[0], sizes[1])
    raise UserError(f"--image-size must be N or LO,HI (pixels), got {text!r}")


def synth(
    out: Path = typer.Option(Path("data/synthetic"), "--out", "-o", help="Dataset directory to write."),
    num_train: int = typer.Option(400, "--num-train", help="Training images."),
    num_val: int = typer.Option(100, "--num-val", help="Validation images."),
    image_size: str = typer.Option(
        "160,224",
        "--image-size",
        help="Image side in pixels: N (square) or LO,HI (each side drawn in range).",
    ),
    max_objects: int = typer.Option(6, "--max-objects", help="Most shapes per image (at least 2 when >= 2)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same files."),
) -> Path:
    """Generate a synthetic COCO dataset: five shape classes (ids 1,2,3,5,7) on cluttered backgrounds,
    small/medium/large objects, overlaps; real JPEGs and annotations/instances_{train,val}.json."""
    from ddetr_cli.synth import CATEGORIES, make_synthetic_coco

    size = parse_image_size(image_size)
    if max_objects < 1:
        raise UserError(f"--max-objects must be >= 1, got {max_objects}")
    start = time.perf_counter()
    try:
        root = make_synthetic_coco(
            out, num_train, num_val, size, seed=seed, objects_per_image=(min(2, max_objects), max_objects)
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"{out}: cannot write the dataset ({err})") from None
    names = ", ".join(f"{c['id']}={c['name']}" for c in CATEGORIES)
    info(f"Wrote {num_train} train + {num_val} val images ({names}) in {time.perf_counter() - start:.1f}s")
    console.print(
        f"{escape(str(root))}: train/, val/, annotations/instances_{{train,val}}.json\n"
        f"Train on it: [bold]ddetr train --data {escape(str(root))} --preset tiny --device cpu[/bold]",
        soft_wrap=True,
    )
    return root
