"""Export a Deformable DETR to ONNX: pre-processing, the network and post-processing in one graph.

    export_onnx("best.pt", "model.onnx", imgsz=(800, 1066))   # -> Path of the written file

Two input forms (the `input_form` argument, `ddetr export --input`):
- "uint8" (default, for deployment): `images` uint8 RGB [B, 3, H, W] and `sizes` int64 [B, 2], the
  valid (h, w) of each image inside the padded batch (padding at the bottom and right). ImageNet
  normalisation and the padding mask are computed in the graph.
- "normalized": `images` float32 [B, 3, H, W] ImageNet-normalised and `mask` bool [B, H, W], True
  on padding: exactly what the PyTorch model takes (ddetr's loaders' output).
Outputs: `scores` [B, K] descending, `labels` [B, K] int64 dataset category ids and `boxes`
[B, K, 4] xyxy in pixels of each image's valid region (K = min(topk, queries * classes)).
The deformable attention runs through the op's grid_sample reference (GridSample, opset >= 16).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ddetr_cli.console import UserError
from ddetr_cli.engine.inference import parse_imgsz
from ddetr_cli.model.postprocess import topk_detections

# ddetr's loaders normalise (pixel / 255 - MEAN) / STD (rust_loader/src/resample.rs).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INPUT_FORMS = ("uint8", "normalized")
MIN_OPSET = 16  # GridSample
DEFAULT_OPSET = 17
INSTALL_HINT = 'pip install "ddetr[export]" (or: pip install onnx onnxruntime)'


class DetectionGraph(nn.Module):
    """The exported module: (images, sizes or mask) -> (scores, labels, boxes); see the module doc."""

    def __init__(self, model: nn.Module, input_form: str = "uint8", topk: int = 100):
        super().__init__()
        if input_form not in INPUT_FORMS:
            raise ValueError(f"input_form must be one of {', '.join(INPUT_FORMS)}, got {input_form!r}")
        self.model = model
        self.input_form = input_form
        self.topk = topk
        config = model.config
        ids = config.category_ids if config.category_ids is not None else range(config.num_classes)
        self.register_buffer("category_ids", torch.tensor(list(ids), dtype=torch.int64), persistent=False)
        # x * scale + shift == (x / 255 - mean) / std to within a float32 ulp of the loader's values.
        scale = [1.0 / (255.0 * s) for s in STD]
        shift = [-m / s for m, s in zip(MEAN, STD)]
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, sizes_or_mask: torch.Tensor):
        """(images uint8, sizes) or (images float32, mask) -> scores, category ids, boxes; see module doc."""
        if self.input_form == "uint8":
            sizes = sizes_or_mask
            mask = padding_mask(sizes, images.shape[-2], images.shape[-1])
            images = images.float() * self.scale + self.shift
            images = images.masked_fill(mask[:, None], 0.0)  # the loaders pad with zeros
        else:
            mask = sizes_or_mask
            sizes = valid_sizes(mask)
        out = self.model(images, mask)
        scores, labels, boxes = topk_detections(out["pred_logits"], out["pred_boxes"], sizes, self.topk)
        return scores.float(), self.category_ids[labels], boxes.float()


def padding_mask(sizes: torch.Tensor, height, width) -> torch.Tensor:
    """sizes [B, 2] valid (h, w) -> mask [B, height, width], True outside the top-left h x w."""
    rows = torch.arange(height, device=sizes.device)[None, :, None] >= sizes[:, 0, None, None]
    cols = torch.arange(width, device=sizes.device)[None, None, :] >= sizes[:, 1, None, None]
    return rows | cols


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, H, W] (True on padding, bottom/right) -> [B, 2] int64 valid (h, w)."""
    return torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], 1)


def require_onnx() -> None:
    """UserError with the install command when onnx is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None


@contextlib.contextmanager
def reference_attention():
    """Force the deformable attention's PyTorch reference (DDETR_MSDA=reference) inside the block:
    the compiled kernels are not ONNX ops."""
    old = os.environ.get("DDETR_MSDA")
    os.environ["DDETR_MSDA"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DDETR_MSDA", None)
        else:
            os.environ["DDETR_MSDA"] = old


def variant_name(config) -> str:
    """'plain', 'box-refine' or 'two-stage' (the names `ddetr train --variant` uses)."""
    if config.two_stage:
        return "two-stage"
    return "box-refine" if config.with_box_refine else "plain"


def metadata(model, weights, imgsz, batch, dynamic, input_form, topk, opset) -> dict[str, str]:
    """The strings stored in the file's metadata_props (OnnxDetector reads them back)."""
    from ddetr_cli import __version__

    config = model.config
    ids = config.category_ids if config.category_ids is not None else list(range(config.num_classes))
    return {
        "format": "ddetr-onnx",
        "format_version": "1",
        "ddetr_version": __version__,
        "source_weights": str(weights),
        "variant": variant_name(config),
        "config": json.dumps(config.to_dict()),
        "class_names": json.dumps(config.class_names),
        "category_ids": json.dumps([int(c) for c in ids]),
        "input_form": input_form,
        "input_size": "dynamic" if dynamic else f"{imgsz[0]}x{imgsz[1]}",
        "batch": "dynamic" if dynamic else str(batch),
        "mean": json.dumps(MEAN),
        "std": json.dumps(STD),
        "topk": str(topk),
        "opset": str(opset),
        "imgsz": str(default_imgsz(weights)[0]),  # the shorter side the weights were trained for
    }


def default_imgsz(weights) -> tuple[int, int]:
    """The checkpoint's training size s as s x 4s/3 (a 4:3 landscape image), else 800x1066."""
    from ddetr_cli.runs import checkpoint_meta

    size = checkpoint_meta(weights).get("imgsz")
    size = size if isinstance(size, int) else 800
    return size, round(size * 4 / 3)


def export_onnx(
    weights: str | os.PathLike,
    out: str | os.PathLike | None = None,
    imgsz: tuple[int, int] | str | None = None,
    batch: int = 1,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    input_form: str = "uint8",
    topk: int = 100,
    half: bool = False,
    simplify: bool = False,
) -> Path:
    """Write `weights` (any source `load_model` reads) as an ONNX detector; returns the file's path.

    imgsz  (H, W) or "HxW" of the example input: the graph's fixed size, or only the tracing size
           with `dynamic` (then batch, height and width are all dynamic)
    half   trace under fp16 autocast: convolutions and matrix products in fp16 (their weights stored
           fp16), normalisations, softmax, the attention's sampling and the top-k in fp32, as
           `--amp fp16` runs in PyTorch; inputs and outputs keep their types
    """
    require_onnx()
    if simplify:
        _require_onnxsim()
    if opset < MIN_OPSET:
        raise UserError(f"--opset must be >= {MIN_OPSET} (GridSample), got {opset}")
    if batch < 1 or topk < 1:
        raise UserError(f"--batch and --topk must be >= 1, got {batch} and {topk}")
    if input_form not in INPUT_FORMS:
        raise UserError(f"--input must be one of {', '.join(INPUT_FORMS)}, got {input_form!r}")
    from ddetr_cli.hub import resolve_weights
    from ddetr_cli.model import load_model

    local = resolve_weights(weights)  # a local path as is; a Hub id -> its cached snapshot
    from_hub = local != Path(weights)
    size = parse_imgsz(imgsz) if isinstance(imgsz, str) else tuple(imgsz or default_imgsz(local))
    if out is None:  # beside local weights; a Hub model's name in the current folder
        out = Path(str(weights).split("@")[0].split("/")[-1] if from_hub else local).with_suffix(".onnx")
    out = Path(out)

    model = load_model(local, device="cpu")
    graph = DetectionGraph(model, input_form, topk).eval()
    props = metadata(model, weights, size, batch, dynamic, input_form, topk, opset)
    props["precision"] = "fp16-autocast" if half else "fp32"
    proto = trace_to_onnx(graph, example_inputs(input_form, batch, size), dynamic, opset, half)
    if simplify:
        proto = _simplify(proto)
    _write(proto, props, out)
    return out


def example_inputs(input_form: str, batch: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded random inputs of `size` in `input_form` (tracing only reads their shapes and dtypes)."""
    generator = torch.Generator().manual_seed(0)
    h, w = size
    if input_form == "uint8":
        images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=generator)
        return images, torch.tensor([[h, w]] * batch, dtype=torch.int64)
    images = torch.randn(batch, 3, h, w, generator=generator)
    return images, torch.zeros(batch, h, w, dtype=torch.bool)


def trace_to_onnx(graph: DetectionGraph, inputs, dynamic: bool, opset: int, half: bool = False):
    """TorchScript-based export (torch.onnx.export(dynamo=False)) -> onnx.ModelProto; `half` traces
    under CPU fp16 autocast, which records its casts in the graph."""
    import io
    import warnings

    import onnx

    second = "sizes" if graph.input_form == "uint8" else "mask"
    axes = None
    if dynamic:
        axes = {
            "images": {0: "batch", 2: "height", 3: "width"},
            second: {0: "batch", 1: "height", 2: "width"} if second == "mask" else {0: "batch"},
            "scores": {0: "batch"},
            "labels": {0: "batch"},
            "boxes": {0: "batch"},
        }
    buffer = io.BytesIO()
    autocast = fp16_autocast(graph) if half else contextlib.nullcontext()
    with reference_attention(), torch.no_grad(), autocast, warnings.catch_warnings():
        # Tracer and deprecation warnings are about Python values frozen into the graph: the model
        # keeps every size that varies in tensors (ops.level_shapes), and the tests check the result.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["images", second],
            output_names=["scores", "labels", "boxes"],
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def fp16_autocast(graph: nn.Module):
    """CPU fp16 autocast, with every LayerNorm's input cast to fp32 first (as CUDA autocast does):
    ONNX LayerNormalization needs its input and weights in one dtype."""
    hooks = [
        module.register_forward_pre_hook(lambda _, args: (args[0].float(), *args[1:]))
        for module in graph.modules()
        if isinstance(module, nn.LayerNorm)
    ]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _write(proto, props: dict[str, str], out: Path) -> None:
    import onnx

    from ddetr_cli.runs import atomic_write

    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))


def _require_onnxsim() -> None:
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        raise UserError("--simplify needs onnxsim: pip install onnxsim") from None


def _simplify(proto):
    import onnxsim

    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified graph; export without --simplify")
    return simplified
