"""Tuning experiments for the `tiny` demo preset: train on synthetic shapes, report AP on val.

A self-contained in-process loop (its own minimal resize/normalise/pad on images held in memory) so
that model and schedule settings can be compared quickly on a CPU, without the CLI or the loader:

    python benchmarks/demo_tuning.py --epochs 20 --hidden-dim 64 --set enc_layers=2 --threads 2

Prints one JSON line per run with the settings, train time, losses per epoch and COCO AP figures.
Model settings not given take the `tiny` preset's values (ddetr_cli.presets).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_split(root: Path, split: str, size: int):
    """Images resized so that the longer side is `size`, as normalised float tensors [3, h, w]."""
    with open(root / "annotations" / f"instances_{split}.json") as f:
        coco = json.load(f)
    cat_ids = [c["id"] for c in coco["categories"]]
    index_of = {cid: i for i, cid in enumerate(cat_ids)}
    anns: dict[int, list] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    items = []
    for im in coco["images"]:
        bgr = cv2.imread(str(root / split / im["file_name"]))
        h, w = bgr.shape[:2]
        s = size / max(h, w)
        nh, nw = round(h * s), round(w * s)
        rgb = cv2.cvtColor(cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        x = (rgb.astype(np.float32) / 255.0 - MEAN) / STD
        boxes = []
        labels = []
        for a in anns.get(im["id"], []):
            bx, by, bw, bh = a["bbox"]
            boxes.append([(bx + bw / 2) / w, (by + bh / 2) / h, bw / w, bh / h])
            labels.append(index_of[a["category_id"]])
        items.append(
            {
                "image": torch.from_numpy(x.transpose(2, 0, 1).copy()),
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "image_id": im["id"],
                "orig_size": (h, w),
            }
        )
    return items, cat_ids, coco


def collate(items, train: bool, scale: float = 1.0):
    """Pads to the batch's largest image; optional horizontal flip and rescale (train)."""
    images, targets = [], []
    for it in items:
        img, boxes = it["image"], it["boxes"].clone()
        if train and random.random() < 0.5:
            img = img.flip(-1)
            boxes[:, 0] = 1 - boxes[:, 0]
        if scale != 1.0:
            h, w = img.shape[-2:]
            img = F.interpolate(
                img[None], size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False
            )[0]
        images.append(img)
        targets.append({"boxes": boxes, "labels": it["labels"]})
    H = max(i.shape[1] for i in images)
    W = max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for b, img in enumerate(images):
        batch[b, :, : img.shape[1], : img.shape[2]] = img
        mask[b, : img.shape[1], : img.shape[2]] = False
    return batch, mask, targets


@torch.no_grad()
def evaluate(model, batches, cat_ids, coco_gt_dict):
    """COCO AP of `model` on `batches` of (images, mask, targets with image_id and orig_size)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ddetr_cli.model import postprocess

    model.eval()
    dets = []
    for images, mask, targets in batches:
        out = model(images, mask)
        sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets])
        for t, res in zip(targets, postprocess(out, sizes, topk=100)):
            for score, label, box in zip(
                res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist()
            ):
                x0, y0, x1, y1 = box
                dets.append(
                    {
                        "image_id": int(t["image_id"]),
                        "category_id": cat_ids[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                )
    model.train()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt_dict
        gt.createIndex()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    return {n: round(float(v), 4) for n, v in zip(names, ev.stats[:6])}


def mem_batches(items, batch_size, train, scales):
    order = list(range(len(items)))
    if train:
        random.shuffle(order)
    last = len(order) - batch_size + 1 if train else len(order)
    for b in range(0, max(last, 0), batch_size):
        chunk = [items[i] for i in order[b : b + batch_size]]
        images, mask, targets = collate(chunk, train=train, scale=random.choice(scales) if train else 1.0)
        for t, it in zip(targets, chunk):
            t["image_id"] = it["image_id"]
            t["orig_size"] = it["orig_size"]
        yield images, mask, targets


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/ddetr_tune/data")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--image-size", default="160,224", help="synthetic image sides: N or LO,HI")
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument(
        "--loader",
        choices=("real", "mem"),
        default="real",
        help="real: ddetr_cli.data.CocoLoader with the official augmentation; mem: in-memory resize",
    )
    p.add_argument("--val-size", type=int, default=None, help="eval shorter side (default: preset)")
    p.add_argument("--max-size", type=int, default=None, help="longer side cap (default: preset)")
    p.add_argument("--scales", default=None, help="train shorter sides, comma list (default: preset)")
    p.add_argument("--crop-resize", default=None, help="comma list (default: preset)")
    p.add_argument("--crop-size", default=None, help="min,max (default: preset)")
    p.add_argument("--crop-prob", type=float, default=None, help="probability of the crop branch")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-backbone", type=float, default=None)
    p.add_argument("--lr-linear-proj-mult", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--lr-drop", type=int, default=None, help="epoch of the 10x lr drop")
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument(
        "--schedule", choices=("step", "cosine"), default="step", help="cosine: lr to 0 at the end, no drop"
    )
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N epochs; -1: also before training"
    )
    p.add_argument("--time-budget", type=float, default=0, help="stop training after this many seconds")
    p.add_argument(
        "--set", action="append", default=[], help="model config override key=value (python literal)"
    )
    p.add_argument("--tag", default="")
    p.add_argument(
        "--extra-val",
        default=None,
        help="also score the final model on DIR/val (an independent val split; 100 images are noisy)",
    )
    args = p.parse_args()

    import ast

    from ddetr_cli.data import CocoLoader
    from ddetr_cli.model import DeformableDetrConfig, build_criterion, build_model, param_groups
    from ddetr_cli.presets import get_preset
    from ddetr_cli.synth import make_synthetic_coco

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    preset = get_preset("tiny")
    tr = dict(preset["train"])
    for key in (
        "epochs",
        "batch_size",
        "lr",
        "lr_backbone",
        "lr_linear_proj_mult",
        "weight_decay",
        "lr_drop",
        "val_size",
        "max_size",
        "crop_prob",
    ):
        if getattr(args, key) is not None:
            tr[key] = getattr(args, key)
    if args.clip is not None:
        tr["clip_max_norm"] = args.clip
    for key in ("scales", "crop_resize", "crop_size"):
        if getattr(args, key) is not None:
            tr[key] = [int(v) for v in getattr(args, key).split(",")]
    tr.setdefault("lr_linear_proj_mult", 0.1)

    lo_hi = [int(s) for s in args.image_size.split(",")]
    data = (
        Path(args.data) / f"n{args.num_train}_{args.num_val}_{args.image_size}_{args.max_objects}_{args.seed}"
    )
    if not (data / "annotations" / "instances_val.json").exists():
        make_synthetic_coco(
            data,
            args.num_train,
            args.num_val,
            tuple(lo_hi) if len(lo_hi) == 2 else lo_hi[0],
            seed=args.seed,
            objects_per_image=(min(2, args.max_objects), args.max_objects),
        )
    with open(data / "annotations" / "instances_val.json") as f:
        val_coco = json.load(f)
    cat_ids = sorted(c["id"] for c in val_coco["categories"])

    if args.loader == "real":
        kw = {"max_size": tr["max_size"], "val_size": tr["val_size"], "workers": 1}
        aug = {k: tuple(tr[k]) for k in ("scales", "crop_resize", "crop_size") if tr.get(k) is not None}
        aug["crop_prob"] = tr.get("crop_prob", 0.5)
        train_loader = CocoLoader(
            data / "train",
            data / "annotations" / "instances_train.json",
            True,
            tr["batch_size"],
            seed=args.seed,
            **kw,
            **aug,
        )
        val_loader = CocoLoader(data / "val", data / "annotations" / "instances_val.json", False, 16, **kw)

        def train_batches(epoch):
            train_loader.set_epoch(epoch)
            return iter(train_loader)

        def val_batches():
            return iter(val_loader)
    else:
        train_items, _, _ = load_split(data, "train", tr["val_size"])
        val_items, _, _ = load_split(data, "val", tr["val_size"])

        def train_batches(epoch):
            return mem_batches(train_items, tr["batch_size"], True, [0.8, 0.9, 1.0])

        def val_batches():
            return mem_batches(val_items, 16, False, [1.0])

    model_cfg = dict(preset["model"])
    for kv in args.set:
        k, v = kv.split("=", 1)
        model_cfg[k] = ast.literal_eval(v)
    model_cfg["num_classes"] = len(cat_ids)
    config = DeformableDetrConfig(**model_cfg)
    model = build_model(config)
    criterion = build_criterion(config)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        param_groups(model, tr["lr"], tr["lr_backbone"], tr["lr_linear_proj_mult"]),
        lr=tr["lr"],
        weight_decay=tr["weight_decay"],
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = args.num_train // tr["batch_size"]  # drop_last, as the training loader

    before = evaluate(model, val_batches(), cat_ids, val_coco) if args.eval_every < 0 else None
    history, evals = [], []
    start = time.perf_counter()
    cpu_start = time.process_time()  # CPU seconds: a load-independent measure of the training cost
    it = 0
    for epoch in range(tr["epochs"]):
        total, count = 0.0, 0
        for images, mask, targets in train_batches(epoch):
            if args.schedule == "cosine":
                total_iters = tr["epochs"] * steps_per_epoch
                factor = 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / total_iters))
            else:
                factor = 0.1 ** (epoch // tr["lr_drop"])
            if args.warmup_iters and it < args.warmup_iters:
                factor *= (it + 1) / args.warmup_iters
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            losses = criterion(model(images, mask), targets)
            optimizer.zero_grad()
            losses["loss"].backward()
            if tr["clip_max_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr["clip_max_norm"])
            optimizer.step()
            total += float(losses["loss"].detach())
            count += 1
            it += 1
        elapsed = time.perf_counter() - start
        history.append(round(total / max(count, 1), 3))
        cpu = time.process_time() - cpu_start
        print(
            f"# {args.tag} epoch {epoch} loss {history[-1]:.3f} it={it} t={elapsed:.0f}s cpu={cpu:.0f}s",
            flush=True,
        )
        if args.eval_every and (epoch + 1) % abs(args.eval_every) == 0 and epoch + 1 < tr["epochs"]:
            ev_t, ev_cpu = time.perf_counter(), time.process_time()
            evals.append((epoch + 1, round(elapsed), evaluate(model, val_batches(), cat_ids, val_coco)))
            print(f"# {args.tag} eval {evals[-1]}", flush=True)
            start += time.perf_counter() - ev_t  # evaluation time does not count as training time
            cpu_start += time.process_time() - ev_cpu
        if args.time_budget and elapsed > args.time_budget:
            break
    train_time = time.perf_counter() - start
    train_cpu = time.process_time() - cpu_start
    ev_t = time.perf_counter()
    final = evaluate(model, val_batches(), cat_ids, val_coco)
    eval_time = time.perf_counter() - ev_t
    extra = None
    if args.extra_val and args.loader == "real":
        root = Path(args.extra_val)
        with open(root / "annotations" / "instances_val.json") as f:
            extra_coco = json.load(f)
        extra_loader = CocoLoader(root / "val", root / "annotations" / "instances_val.json", False, 16, **kw)
        extra = evaluate(model, iter(extra_loader), cat_ids, extra_coco)
    print(
        json.dumps(
            {
                "tag": args.tag,
                "args": vars(args),
                "train": tr,
                "model": model_cfg,
                "params": n_params,
                "iters": it,
                "train_s": round(train_time, 1),
                "train_cpu_s": round(train_cpu, 1),
                "eval_s": round(eval_time, 1),
                "epochs_done": len(history),
                "loss": history,
                "evals": evals,
                "before": before,
                "final": final,
                "extra_val": extra,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
