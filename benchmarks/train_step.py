"""The CPU training step of the `tiny` preset with and without the trainer's CPU settings: the
"245 -> 205 ms" figure of BENCHMARKS.md "The demo".

    python benchmarks/train_step.py [--threads 2] [--steps 20] [--rounds 3]

Variants, timed in alternating rounds on the same batches (real loader, the demo's dense synthetic
train split), each from the same freshly initialised model:
    plain     AdamW, contiguous NCHW, clip_grad_norm_ per tensor (PyTorch's CPU defaults)
    trainer   what `ddetr train` does on the CPU: fused AdamW, channels_last CNN and input,
              clip_grad_norm_(foreach=True)
Prints one JSON line: milliseconds per step for every round, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddetr_cli.data import CocoLoader
from ddetr_cli.model import DeformableDetrConfig, build_criterion, build_model, param_groups
from ddetr_cli.presets import get_preset
from ddetr_cli.synth import make_synthetic_coco


def make_step(variant: str, model_settings: dict, train: dict):
    torch.manual_seed(0)
    model = build_model(DeformableDetrConfig(**model_settings, num_classes=5)).train()
    criterion = build_criterion(model.config)
    groups = param_groups(model, train["lr"], train["lr_backbone"], train["lr_linear_proj_mult"])
    trainer_like = variant == "trainer"
    optimizer = torch.optim.AdamW(
        groups, lr=train["lr"], weight_decay=train["weight_decay"], fused=True if trainer_like else None
    )
    image_format = torch.channels_last if trainer_like else torch.contiguous_format
    model.backbone[0].to(memory_format=image_format)

    def step(images, mask, targets):
        outputs = model(images.contiguous(memory_format=image_format), mask)
        losses = criterion(outputs, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        clip = train["clip_max_norm"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=trainer_like or None)
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    preset = get_preset("tiny")
    train, spec = preset["train"], preset["data"]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_coco(
            Path(tmp),
            8 * (args.steps + args.warmup),
            0,
            tuple(spec["image_size"]),
            objects_per_image=tuple(spec["objects_per_image"]),
            train_objects_per_image=tuple(spec["train_objects_per_image"]),
        )
        loader = CocoLoader(
            root / "train",
            root / "annotations" / "instances_train.json",
            True,
            train["batch_size"],
            seed=0,
            max_size=train["max_size"],
            val_size=train["val_size"],
            scales=tuple(train["scales"]),
            crop_prob=train["crop_prob"],
            workers=1,
        )
        loader.set_epoch(0)
        batches = list(loader)

    times: dict[str, list[float]] = {"plain": [], "trainer": []}
    for _ in range(args.rounds):
        for variant in times:
            step = make_step(variant, preset["model"], train)
            for batch in batches[: args.warmup]:
                step(*batch)
            start = time.perf_counter()
            for batch in batches[args.warmup :]:
                step(*batch)
            times[variant].append(1000 * (time.perf_counter() - start) / len(batches[args.warmup :]))
    medians = {v: statistics.median(t) for v, t in times.items()}
    print(
        json.dumps(
            {
                "threads": args.threads,
                "steps": len(batches) - args.warmup,
                "ms_per_step": {v: [round(t, 1) for t in ts] for v, ts in times.items()},
                "median_ms": {v: round(m, 1) for v, m in medians.items()},
                "trainer_speedup": round(medians["plain"] / medians["trainer"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
