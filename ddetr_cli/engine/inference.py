"""One inference path: weights -> detector -> per-image detections -> COCO results entries.

Every command that runs a model (eval, predict, bench, train's evaluation, export's check) goes
through a *detector*:

    detector = load_detector("best.pt", device)          # or a model.onnx (onnxruntime)
    results = detector(images, mask, orig_sizes, topk=100)

    images      [B, 3, H, W] float32, ImageNet-normalised (the loaders' output)
    mask        [B, H, W] bool, True on padding
    orig_sizes  [B, 2] (h, w) of the original images
    results     B dicts like `ddetr_cli.model.postprocess`: "scores" [k] descending, "labels" [k]
                int64 class indices, "boxes" [k, 4] xyxy in original-image pixels

Preprocessing is one path for every command (the Rust loaders give identical tensors for the same
image). Like the official code and Hugging Face, a batch is run as one padded forward pass, and
Deformable DETR's output moves slightly with the padding a batch adds (GroupNorm statistics over
the padded maps, valid ratios): an image's detections depend on the batch it shares. `predict`
(default batch 1) and `eval --batch-size 1` give identical detections; evaluating every image
alone instead costs the demo model 0.05 AP, because training always sees padded batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ddetr_cli.console import UserError, progress

DEFAULT_SIZE = 800
MAX_SIZE_RATIO = 1333 / 800  # the paper's longer-side cap relative to the shorter side


def image_sizes(imgsz: int) -> tuple[int, int]:
    """Shorter-side inference size -> (val_size, max_size) with the paper's 800:1333 ratio."""
    if imgsz < 32:
        raise UserError(f"--imgsz must be at least 32 pixels, got {imgsz}")
    return imgsz, round(imgsz * MAX_SIZE_RATIO)


def parse_imgsz(text: str) -> tuple[int, int]:
    """--imgsz HxW: '800x1333' -> (800, 1333); '640' -> (640, 640). UserError on anything else."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 32:
        raise UserError(f"--imgsz must be HxW (e.g. 800x1333) with sides >= 32, got {text!r}")
    return sizes[0], sizes[1]


def inference_size(weights: str | Path | None, imgsz: int | None) -> int:
    """--imgsz when given, else the size the weights were trained/exported for, else 800."""
    if imgsz is not None:
        return imgsz
    if is_onnx(weights):
        from ddetr_cli.engine.onnx_detector import onnx_imgsz

        return onnx_imgsz(weights)
    if weights is not None:
        from ddetr_cli.runs import checkpoint_meta

        size = checkpoint_meta(weights).get("imgsz")
        if isinstance(size, int):
            return size
    return DEFAULT_SIZE


def is_onnx(weights: str | Path | None) -> bool:
    """True for a `ddetr export` file, which runs through onnxruntime instead of PyTorch."""
    return weights is not None and str(weights).endswith(".onnx")


def load_weights(weights: str | Path, device, num_classes: int | None = None):
    """load_model of a local path or a Hugging Face Hub id (`org/name[@revision]`, see ddetr_cli.hub);
    a missing path is a user error, not a traceback."""
    from ddetr_cli.hub import resolve_weights
    from ddetr_cli.model import load_model

    return load_model(resolve_weights(weights), device=device, num_classes=num_classes)


def load_detector(weights: str | Path, device, amp: str = "off"):
    """A ddetr .pt, official .pth, HF folder or Hub id -> TorchDetector of its fused inference copy
    (ddetr_cli.model.fused: same outputs to float rounding, faster); a .onnx file -> OnnxDetector."""
    if is_onnx(weights):
        if not Path(weights).is_file():
            raise UserError(f"--weights: no such file: {weights}")
        from ddetr_cli.engine.onnx_detector import OnnxDetector

        return OnnxDetector(weights, device=device)
    from ddetr_cli.model.fused import fuse_for_inference

    return TorchDetector(fuse_for_inference(load_weights(weights, device)), device, amp)


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class TorchDetector:
    """A Deformable DETR (PyTorch) behind the detector interface of this module."""

    def __init__(self, model, device, amp: str = "off"):
        self.model = model
        self.device = device
        self.amp = amp

    @property
    def config(self):
        return unwrap(self.model).config

    def __call__(self, images, mask, orig_sizes, topk: int = 100) -> list[dict]:
        import torch

        from ddetr_cli.distributed import autocast
        from ddetr_cli.model import postprocess

        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.amp):
                outputs = model(images, mask)
            return postprocess(outputs, orig_sizes, topk=topk)
        finally:
            model.train(was_training)


def class_to_category(config) -> list[int]:
    """Class index -> dataset category id (identity when the checkpoint has no mapping, as official COCO)."""
    if config.category_ids is not None:
        return [int(c) for c in config.category_ids]
    return list(range(config.num_classes))


def coco_detections(result: dict, image_id, category_ids: list[int], score_thr: float = 0.0) -> list[dict]:
    """One image's detector output (xyxy pixels) -> COCO results entries ([x, y, w, h] pixels).

    Boxes and scores are rounded (0.01 px, 1e-5) before anything is evaluated or saved, so a saved
    detections file evaluates to exactly the numbers reported with it.
    """
    scores = result["scores"].float().cpu().tolist()
    labels = result["labels"].cpu().tolist()
    boxes = result["boxes"].float().cpu().tolist()
    out = []
    for score, label, (x0, y0, x1, y1) in zip(scores, labels, boxes):
        if score < score_thr:
            continue
        entry = {} if image_id is None else {"image_id": int(image_id)}
        entry["category_id"] = category_ids[label] if label < len(category_ids) else int(label)
        entry["bbox"] = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        entry["score"] = round(score, 5)
        out.append(entry)
    return out


@dataclass
class DatasetDetections:
    detections: list[dict]  # COCO results entries of every image seen
    image_ids: list[int]  # the images seen (evaluate these only)
    skipped: list[tuple[str, str]]  # (file, reason) of the images the loader could not read


def dataset_detections(
    detector, loader, ctx, topk: int = 100, description: str = "eval", bar=None
) -> DatasetDetections:
    """Run `detector` over a val CocoLoader on every rank -> every image's COCO detections, the ids
    of the images seen and the unreadable ones, on every rank.

    Images a rank saw twice (shards are padded to equal length) are counted once; images the loader
    could not read are not among those seen. `bar`: a live Rich progress to add a task to (only one
    live display can exist), else one is made.
    """
    import torch

    from ddetr_cli.distributed import gather_lists

    category_ids = class_to_category(detector.config)
    per_image: list[tuple[int, list]] = []
    own_bar = progress(disable=not ctx.is_main) if bar is None else contextlib.nullcontext(bar)
    with own_bar as bar:
        task = bar.add_task(description, total=len(loader), status="")
        for images, mask, targets in loader:
            images, mask = images.to(ctx.device, non_blocking=True), mask.to(ctx.device, non_blocking=True)
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(ctx.device)
            for target, result in zip(targets, detector(images, mask, orig_sizes, topk=topk)):
                image_id = int(target["image_id"])
                per_image.append((image_id, coco_detections(result, image_id, category_ids)))
            bar.advance(task)
    seen, detections = set(), []
    for image_id, dets in gather_lists(per_image, ctx):
        if image_id not in seen:
            seen.add(image_id)
            detections.extend(dets)
    skipped = sorted(set(gather_lists(list(loader.skipped), ctx)))
    return DatasetDetections(detections, sorted(seen), skipped)


def skipped_summary(skipped: list[tuple[str, str]], what: str, first: int = 3) -> str:
    """[(file, reason)] -> 'N unreadable <what> skipped: a.jpg (reason), b.jpg (reason), ... and K more'."""
    shown = ", ".join(f"{path} ({reason})" for path, reason in skipped[:first])
    more = f" and {len(skipped) - first} more" if len(skipped) > first else ""
    return f"{len(skipped)} unreadable {what} skipped: {shown}{more}"
