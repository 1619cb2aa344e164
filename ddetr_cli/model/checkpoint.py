"""Checkpoints: official Deformable DETR `.pth`, Hugging Face directories and ddetr's own files.

`load_model(path)` recognises the format, rebuilds the configuration (stored, translated from
`config.json`, or inferred from the tensors' names and shapes), loads every weight and returns the
model in eval mode. Files are read with `torch.load(weights_only=True)` or safetensors, so a
checkpoint can never run code; the one class allowed beyond tensors and plain containers is
`argparse.Namespace`, which the official training script stores as `args`.

Every failure is a `CheckpointError` with one line that names the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from ddetr_cli.model.config import DeformableDetrConfig
from ddetr_cli.model.deformable_detr import DeformableDETR, build_model
from ddetr_cli.model.hf_keys import (
    RESNET_LAYOUTS,
    complete_heads,
    ddetr_config_to_hf,
    hf_config_to_ddetr,
    hf_to_official,
    is_hf_layout,
    layer_indices,
    official_to_hf,
)

log = logging.getLogger("ddetr")

StateDict = dict[str, torch.Tensor]

FORMAT_VERSION = 1
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Official `args` fields that mean the same in DeformableDetrConfig (and cannot be read off shapes).
_ARGS_FIELDS = (
    "nheads",
    "num_queries",
    "dilation",
    "dropout",
    "aux_loss",
    "position_embedding_scale",
    "cls_loss_coef",
    "bbox_loss_coef",
    "giou_loss_coef",
    "set_cost_class",
    "set_cost_bbox",
    "set_cost_giou",
    "focal_alpha",
)
_CLASS_HEAD = re.compile(r"^(transformer\.decoder\.)?class_embed\.\d+\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


# ---------------------------------------------------------------------------------------------
# public API


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> DeformableDETR:
    """Load a Deformable DETR from an official `.pth`, a Hugging Face directory or a ddetr checkpoint.

    num_classes       build the model with this many classes; when it differs from the checkpoint's,
                      the class heads are re-initialised (official prior-probability bias) and a
                      warning says so -- everything else is loaded (fine-tuning on a new dataset).
    config_overrides  DeformableDetrConfig fields to set after reading the checkpoint, for what the
                      weights cannot tell (e.g. {"dilation": True} for a DC5 model in a bare state
                      dict, {"nheads": 4}) or training settings (dropout, loss coefficients).
    Returns the model on `device`, in eval mode. Raises CheckpointError.
    """
    path = Path(path)
    fields, state = read_checkpoint(path, config_overrides)
    return model_from_state(path, fields, state, num_classes, config_overrides).to(device).eval()


def model_from_state(
    path: Path,
    fields: dict[str, Any],
    state: StateDict,
    num_classes: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    fresh_class_heads: bool = False,
) -> DeformableDETR:
    """The model for what `read_checkpoint` returned (see `load_model`), on the CPU.

    fresh_class_heads: leave the class heads at their initialisation even when the class count is
    the checkpoint's (the caller fills them; see class_transfer) and warn about nothing.
    """
    fields = {**fields, **(config_overrides or {})}
    fields["pretrained_backbone"] = None  # the checkpoint holds the backbone weights
    old_classes = fields.get("num_classes")
    changed_count = num_classes is not None and num_classes != old_classes
    reinit_classes = changed_count or fresh_class_heads
    if reinit_classes:
        fields.update(num_classes=num_classes or old_classes, class_names=None, category_ids=None)
        state = {k: v for k, v in state.items() if not _CLASS_HEAD.match(k)}
    try:
        config = DeformableDetrConfig.from_dict(fields)
        model = build_model(config)
    except ValueError as err:
        raise CheckpointError(f"{path}: {_one_line(err)}") from None
    _load_weights(model, state, path, skip=_CLASS_HEAD if reinit_classes else None)
    if changed_count and not fresh_class_heads:
        log.warning(
            "%s: checkpoint has %s classes, the model %d: class heads re-initialised "
            "(prior probability 0.01), all other weights loaded; fine-tune before use",
            path,
            old_classes,
            num_classes,
        )
    return model


def model_checkpoint(model: DeformableDETR) -> dict[str, Any]:
    """The ddetr checkpoint payload for `model` (the CLI adds optimizer/scheduler/epoch beside it)."""
    return {
        "format": "ddetr",
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": model.state_dict(),
    }


def to_hf_state_dict(model: DeformableDETR, backbone_layout: str = "timm") -> StateDict:
    """`model`'s weights under Hugging Face `DeformableDetrForObjectDetection` names.

    backbone_layout: "timm" (as the published checkpoints) or "hf" (transformers' own ResNet).
    """
    if model.config.backbone not in RESNET_LAYOUTS.values():
        raise ValueError(f"backbone {model.config.backbone!r} has no Hugging Face equivalent")
    return official_to_hf(model.state_dict(), backbone_layout)


def to_hf_config(model: DeformableDETR, backbone_layout: str = "timm") -> dict[str, Any]:
    """A Hugging Face `config.json` (as a dict) describing `model`."""
    return ddetr_config_to_hf(model.config.to_dict(), backbone_layout)


def save_hf_directory(
    model: DeformableDETR, directory: str | os.PathLike, backbone_layout: str = "timm"
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous().clone() for k, v in to_hf_state_dict(model, backbone_layout).items()
    }
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = to_hf_config(model, backbone_layout)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_checkpoint(
    path: str | os.PathLike, config_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], StateDict]:
    """(DeformableDetrConfig fields, official-layout state dict) for any supported checkpoint.

    `config_overrides` only informs what the weights cannot tell (e.g. heads) when inferring.
    """
    path = Path(path)
    if path.is_dir():
        return _read_hf_directory(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    payload = read_file(path)
    return _interpret(path, payload, config_overrides or {})


def infer_config(
    state: StateDict, args: Any = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """DeformableDetrConfig fields read off an official-layout state dict (+ official `args`).

    Shapes give the variant, sizes, layer counts, classes and backbone; `args` (the official
    training script's Namespace, or a dict) gives what shapes cannot: heads (default 8), the number
    of two-stage proposals (default 300), dilation (default False) and training settings.
    `overrides` (DeformableDetrConfig fields) take precedence over `args`. Raises ValueError.
    """
    keys = list(state)
    for needed in ("transformer.level_embed", "class_embed.0.weight"):
        if needed not in state:
            raise ValueError(f"not a Deformable DETR checkpoint (no {needed}; first keys: {_first(keys)})")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    fields: dict[str, Any] = {k: args[k] for k in _ARGS_FIELDS if k in args and args[k] is not None}
    if "lr_backbone" in args:
        fields["train_backbone"] = float(args["lr_backbone"]) > 0
    fields.update({k: v for k, v in (overrides or {}).items() if k in _ARGS_FIELDS})

    levels, hidden_dim = state["transformer.level_embed"].shape
    fields.update(
        num_feature_levels=int(levels),
        hidden_dim=int(hidden_dim),
        num_classes=int(state["class_embed.0.weight"].shape[0]),
        two_stage="transformer.enc_output.weight" in state,
        with_box_refine=any(k.startswith("transformer.decoder.bbox_embed.") for k in keys),
        enc_layers=len(layer_indices(keys, "transformer.encoder.layers.")),
        dec_layers=len(layer_indices(keys, "transformer.decoder.layers.")),
        backbone=_infer_backbone(keys),
    )
    if "query_embed.weight" in state:
        fields["num_queries"] = int(state["query_embed.weight"].shape[0])
    ffn = state.get("transformer.encoder.layers.0.linear1.weight")
    if ffn is None:
        raise ValueError("not a Deformable DETR checkpoint (no transformer.encoder.layers.0.linear1.weight)")
    fields["dim_feedforward"] = int(ffn.shape[0])

    # sampling_offsets: heads * levels * points * 2 outputs; heads come from args (default 8).
    nheads = int(fields.get("nheads", 8))
    for name, key in (
        ("enc_n_points", "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"),
        ("dec_n_points", "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight"),
    ):
        if key not in state:
            raise ValueError(f"not a Deformable DETR checkpoint (no {key})")
        rows = int(state[key].shape[0])
        if rows % (nheads * levels * 2):
            raise ValueError(
                f"{key} has {rows} outputs, not a multiple of {nheads} heads x {levels} levels x 2: "
                "the number of heads cannot be read off the weights, pass config_overrides={'nheads': N}"
            )
        fields[name] = rows // (nheads * levels * 2)
    fields["nheads"] = nheads
    return fields


# ---------------------------------------------------------------------------------------------
# reading files


def read_file(path: Path) -> Any:
    """The object stored in a torch (zip or legacy) or safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    if head.startswith(b"PK\x03\x04"):
        return _torch_load(path, "PyTorch zip")
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 9 else 0
    if head[8:9] == b"{" and header_len > 1:
        if header_len + 8 > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes)")
        return _safetensors_load(path)
    if head[:1] == b"\x80":  # a pickle protocol marker: torch's legacy (pre-1.6) format
        return _torch_load(path, "legacy PyTorch")
    raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint (unrecognised contents)")


def _torch_load(path: Path, kind: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_global(err)
        if refused != "argparse.Namespace":
            what = f"'{refused}'" if refused else "an unsupported pickle instruction"
            raise CheckpointError(
                f"{path}: refused to load: the pickle asks for {what}, which could run code "
                "(checkpoints are read with weights_only=True)"
            ) from None
    except (EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or damaged {kind} file ({_one_line(err)})") from None
    # The official training script pickles its argparse.Namespace as `args`: a plain attribute
    # bag, allowed by name and nothing else.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = f"'{_refused_global(err)}'" if _refused_global(err) else "an unsupported pickle instruction"
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks for {what}, which could run code"
        ) from None
    except (EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or damaged {kind} file ({_one_line(err)})") from None


def _refused_global(err: Exception) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else ""


def _safetensors_load(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every defect
        raise CheckpointError(f"{path}: truncated or damaged safetensors file ({_one_line(err)})") from None


def _read_hf_directory(path: Path) -> tuple[dict[str, Any], StateDict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a directory without config.json (not a Hugging Face checkpoint)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    try:
        fields = hf_config_to_ddetr(hf_config)
    except ValueError as err:
        raise CheckpointError(f"{config_file}: {_one_line(err)}") from None

    state: StateDict = {}
    for weights_file in _hf_weight_files(path):
        part = read_file(weights_file)
        if not _is_state_dict(part):
            raise CheckpointError(f"{weights_file}: does not hold a state dict of tensors")
        state.update(part)
    try:
        state = hf_to_official(state)
    except ValueError as err:
        raise CheckpointError(f"{path}: {_one_line(err)}") from None
    # The class count is the weights' (config.json may leave num_labels to transformers' default).
    classes = state.get("class_embed.0.weight")
    if classes is not None and classes.shape[0] != fields["num_classes"]:
        fields.update(num_classes=int(classes.shape[0]), class_names=None)
    return fields, state


def _hf_weight_files(path: Path) -> list[Path]:
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            return [path / name]
    for name in _HF_INDEXES:
        index = path / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return [path / f for f in sorted(set(weight_map.values()))]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a weights index ({_one_line(err)})") from None
    raise CheckpointError(f"{path}: has config.json but no {' or '.join(_HF_WEIGHTS)}")


# ---------------------------------------------------------------------------------------------
# interpreting what was read


def _interpret(path: Path, payload: Any, overrides: dict[str, Any]) -> tuple[dict[str, Any], StateDict]:
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: holds a {type(payload).__name__}, not a checkpoint dict")
    if payload.get("format") == "ddetr":
        return _interpret_ddetr(path, payload)
    if isinstance(payload.get("model"), dict):  # official: {"model", "optimizer", "args", ...}
        state, args = payload["model"], payload.get("args")
    elif isinstance(payload.get("state_dict"), dict):
        state, args = payload["state_dict"], None
    else:
        state, args = payload, None
    if not _is_state_dict(state):
        raise CheckpointError(f"{path}: not a Deformable DETR checkpoint (no state dict of tensors found)")
    state = _strip_module_prefix(state)
    try:
        state = hf_to_official(state) if is_hf_layout(state) else complete_heads(state)
        return infer_config(state, args, overrides), state
    except ValueError as err:
        raise CheckpointError(f"{path}: {_one_line(err)}") from None


def _interpret_ddetr(path: Path, payload: dict) -> tuple[dict[str, Any], StateDict]:
    version = payload.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: ddetr checkpoint format {version!r} is newer than this ddetr reads")
    config, state = payload.get("config"), payload.get("model")
    if not isinstance(config, dict) or not _is_state_dict(state):
        raise CheckpointError(
            f"{path}: damaged ddetr checkpoint (needs a 'config' dict and a 'model' state dict)"
        )
    return dict(config), _strip_module_prefix(state)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module_prefix(state: StateDict) -> StateDict:
    """Drop the `module.` prefix DistributedDataParallel adds to every key."""
    if all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


# ---------------------------------------------------------------------------------------------
# loading weights


def _load_weights(model: DeformableDETR, state: StateDict, path: Path, skip: re.Pattern | None) -> None:
    """Copy `state` into `model`; CheckpointError listing missing/unexpected/mis-shaped keys."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in expected}
    missing = [
        k
        for k in expected
        if k not in state and not k.endswith("num_batches_tracked") and not (skip and skip.match(k))
    ]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {list(state[k].shape)} in file, {list(expected[k].shape)} in model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{len(keys)} {label} ({_first(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise CheckpointError(f"{path}: weights do not fit a {_describe(model.config)}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)


def _describe(config: DeformableDetrConfig) -> str:
    variant = "two-stage" if config.two_stage else "box-refine" if config.with_box_refine else "plain"
    return (
        f"{variant} {config.backbone} model (hidden {config.hidden_dim}, {config.enc_layers}+"
        f"{config.dec_layers} layers, {config.num_feature_levels} levels, {config.num_classes} classes)"
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _infer_backbone(keys: list[str]) -> str:
    body = "backbone.0.body."
    if any(k.startswith(body + "stem.") for k in keys):
        return "tiny"
    blocks = tuple(len(layer_indices(keys, f"{body}layer{i}.")) for i in range(1, 5))
    bottleneck = f"{body}layer1.0.conv3.weight" in keys
    name = RESNET_LAYOUTS.get((blocks, bottleneck))
    if name is None:
        if not any(k.startswith(body) for k in keys):
            raise ValueError(f"not a Deformable DETR checkpoint (no {body}* backbone weights)")
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"backbone with {list(blocks)} {kind} blocks is not ResNet-18/34/50/101")
    return name


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... {len(items) - n} more" if len(items) > n else "")


def _one_line(err: Exception, limit: int = 400) -> str:
    """The first sentence of an exception's message, on one line (PyTorch appends paragraphs of advice)."""
    text = " ".join(str(err).split()).split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
