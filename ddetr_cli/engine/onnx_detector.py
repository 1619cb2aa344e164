"""Run a `ddetr export` ONNX file through onnxruntime behind the same interface as the PyTorch model.

    detector = OnnxDetector("model.onnx", device="cpu")
    results = detector(images, mask, orig_sizes)   # as ddetr_cli.model.postprocess returns

The input is what ddetr's loaders produce (ImageNet-normalised float32 images, padding mask). For a
file exported with the default uint8 input the images are de-normalised and rounded back to uint8
first: that quantises the *resized* pixels (the loader resizes in float), so results differ
slightly from PyTorch's on the same batch; export with `--input normalized` to reproduce ddetr's own
pipeline exactly. A fixed-size file gets each batch zero-padded to its size (an image larger than it
is an error) and split or filled up to its batch; padding changes results slightly, as it does in
PyTorch: export with `--dynamic` for the same numbers as the PyTorch model on the same batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ddetr_cli.console import UserError
from ddetr_cli.engine.export import INSTALL_HINT, MEAN, STD, valid_sizes
from ddetr_cli.model.config import DeformableDetrConfig


class OnnxDetector:
    """Detector over an ONNX file: `detector(images, mask, orig_sizes, topk)` -> list of dicts."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        self.session = _session(self.path, self.device)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != "ddetr-onnx":
            raise UserError(f"{self.path}: not written by `ddetr export` (no ddetr metadata in the file)")
        self.metadata = dict(meta)
        self.config = DeformableDetrConfig.from_dict(json.loads(meta["config"]))
        self.input_form = meta["input_form"]
        self.topk = int(meta["topk"])
        self.fixed_size = None if meta["input_size"] == "dynamic" else _hw(meta["input_size"])
        self.fixed_batch = None if meta["batch"] == "dynamic" else int(meta["batch"])
        self._class_of = {cid: index for index, cid in enumerate(json.loads(meta["category_ids"]))}

    def __call__(self, images, mask, orig_sizes, topk: int = 100) -> list[dict[str, torch.Tensor]]:
        """images [B, 3, H, W] float32 ImageNet-normalised, mask [B, H, W] True on padding, orig_sizes
        [B, 2] (h, w) -> B dicts: "scores" [k] descending, "labels" [k] int64 class indices, "boxes"
        [k, 4] xyxy in original-image pixels; k = min(topk, the export's --topk, queries * classes)."""
        images, mask = images.detach().float().cpu(), mask.detach().cpu()
        orig_sizes = torch.as_tensor(orig_sizes).cpu()
        step = self.fixed_batch or images.shape[0]
        results = []
        for start in range(0, images.shape[0], step):
            chunk = slice(start, start + step)
            results.extend(self._run(images[chunk], mask[chunk], orig_sizes[chunk], topk))
        return results

    def _run(self, images, mask, orig_sizes, topk):
        batch = images.shape[0]
        sizes = valid_sizes(mask)
        images, mask = self._fit(images, mask)
        if self.input_form == "uint8":
            feeds = {"images": to_uint8(images, mask).numpy(), "sizes": valid_sizes(mask).numpy()}
        else:
            feeds = {"images": images.numpy(), "mask": mask.numpy()}
        scores, labels, boxes = (torch.from_numpy(a) for a in self.session.run(None, feeds))
        # Boxes come in pixels of the valid (resized) image: rescale them to the original image.
        ratio = orig_sizes.to(torch.float32) / sizes.to(torch.float32)
        scale = torch.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], 1)
        boxes = boxes * scale[:, None, :]
        k = min(topk, scores.shape[1])
        return [
            {
                "scores": scores[i, :k].to(self.device),
                "labels": self._class_indices(labels[i, :k]).to(self.device),
                "boxes": boxes[i, :k].to(self.device),
            }
            for i in range(batch)
        ]

    def _fit(self, images, mask):
        """Zero-pad a batch to the file's fixed size and batch (a dynamic file takes it as it is)."""
        batch, _, h, w = images.shape
        height, width = self.fixed_size or (h, w)
        if h > height or w > width:
            raise UserError(
                f"{self.path}: a {h}x{w} batch does not fit the file's fixed {height}x{width} input "
                "(export with --dynamic or a larger --imgsz)"
            )
        full = self.fixed_batch or batch
        padded = images.new_zeros(full, 3, height, width)
        padded[:batch, :, :h, :w] = images
        padded_mask = mask.new_ones(full, height, width)
        padded_mask[:batch, :h, :w] = mask
        padded_mask[batch:] = False  # filler images: all valid, their detections are dropped
        return padded, padded_mask

    def _class_indices(self, category_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._class_of[int(c)] for c in category_ids], dtype=torch.int64)


def onnx_imgsz(path) -> int:
    """The shorter side a ddetr ONNX file expects: its fixed input's, else its source checkpoint's
    training size (recorded at export), else 800."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if meta.get("input_size", "dynamic") != "dynamic":
        return min(_hw(meta["input_size"]))
    return int(meta.get("imgsz", 800))


def to_uint8(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [B, 3, H, W] -> uint8 RGB (rounded; padding set to 0)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.masked_fill(mask[:, None], 0)


def providers(device: torch.device) -> list:
    """onnxruntime execution providers for `device`: CPU, or TensorRT / CUDA when installed."""
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    options = {"device_id": device.index or 0}
    chosen = [(p, options) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not chosen:
        raise UserError(
            f"--device {device}: this onnxruntime has no CUDA provider (available: "
            f"{', '.join(available)}); install onnxruntime-gpu"
        )
    return [*chosen, "CPUExecutionProvider"]


def _session(path: Path, device: torch.device):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"running an ONNX file needs onnxruntime: {INSTALL_HINT}") from None
    if not path.is_file():
        raise UserError(f"--weights: no such file: {path}")
    try:
        return ort.InferenceSession(str(path), providers=providers(device))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: onnxruntime cannot load it ({first_line})") from None


def _hw(text: str) -> tuple[int, int]:
    h, w = text.split("x")
    return int(h), int(w)
