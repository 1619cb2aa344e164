"""Rust data loader benchmark without the CLI (same code as `ddetr bench loader`).

python benchmarks/bench_loader.py [--data DIR] [--workers N] [--images 192] [--warmup-s 1.0] [--repeats 3]
                                   [--parse-size-mb 450] [--json out.json]
"""

import argparse
import json
from pathlib import Path

from ddetr_cli.commands.bench_loader import _print_report, bench_loader_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--val", action="store_true")
    parser.add_argument("--parse-size-mb", type=float, default=0)
    parser.add_argument("--synth-images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = bench_loader_report(
        data=args.data,
        workers=args.workers,
        batch_size=args.batch_size,
        images=args.images,
        train=not args.val,
        parse_size_mb=args.parse_size_mb,
        synth_images=args.synth_images,
        repeats=args.repeats,
        warmup_s=args.warmup_s,
    )
    _print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
