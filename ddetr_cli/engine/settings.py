"""Training settings: the paper's recipe, presets, command-line overrides and what --resume may change.

    resolve_settings(options) -> (model overrides, training settings)

Explicit options win over a `--preset`, which wins over the paper's defaults (official
configs/r50_deformable_detr.sh + main.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ddetr_cli.console import UserError

RESUME_AUTO = "auto"  # what a bare `--resume` means: the latest last.pt under --project
VARIANTS = ("plain", "box-refine", "two-stage")

# The paper's recipe (official configs/r50_deformable_detr.sh + main.py defaults).
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 50,
    "batch_size": 2,
    "lr": 2e-4,
    "lr_backbone": 2e-5,
    "lr_linear_proj_mult": 0.1,
    "weight_decay": 1e-4,
    "lr_drop": 40,
    "clip_max_norm": 0.1,
    "scales": None,  # the loader's default: shorter side 480..800 step 32
    "max_size": 1333,
    "val_size": 800,
    "crop_resize": None,  # loader default (400, 500, 600)
    "crop_size": None,  # loader default (384, 600)
    "crop_prob": 0.5,  # official RandomSelect: the crop branch half of the time
    "eval_interval": 1,
    "log_interval": 10,
    "workers": 2,
    "seed": 42,
    "amp": "off",
    "label_mapping": "compact",
    "max_pixels": None,  # the loader's default pixel budget per image (8000 x 8000)
}
MODEL_OPTIONS = (
    "backbone",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_queries",
    "num_feature_levels",
    "enc_n_points",
    "dec_n_points",
    "dropout",
    "pretrained_backbone",
)
# Settings a resumed run may change; everything else comes from the checkpoint.
RESUME_OVERRIDABLE = ("epochs", "eval_interval", "log_interval", "workers", "max_pixels")
# train() arguments that are no settings of the run: where it runs, where runs live, how they are named.
RESUME_ALSO_FREE = ("device", "resume", "project", "name", "exist_ok")


def scaled_sizes(imgsz: int) -> dict:
    """The paper's augmentation sizes scaled so that evaluation runs at shorter side `imgsz`."""
    if imgsz < 32:
        raise UserError(f"--imgsz must be at least 32 pixels, got {imgsz}")
    f = imgsz / 800
    scales = sorted({max(32, round(s * f)) for s in range(480, 801, 32)})
    return {
        "scales": scales,
        "val_size": imgsz,
        "max_size": round(1333 * f),
        "crop_resize": [max(32, round(s * f)) for s in (400, 500, 600)],
        "crop_size": [max(32, round(384 * f)), max(32, round(600 * f))],
    }


def variant_config(variant: str) -> dict:
    """--variant -> the model fields it sets."""
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return {"with_box_refine": variant in ("box-refine", "two-stage"), "two_stage": variant == "two-stage"}


def resolve_settings(options: dict) -> tuple[dict, dict]:
    """Explicit options > --preset > the paper's defaults -> (model overrides, training settings)."""
    preset = {}
    if options.get("preset"):
        try:
            from ddetr_cli.presets import get_preset
        except ImportError as e:
            raise UserError("presets are not available in this installation") from e
        try:
            preset = get_preset(options["preset"])
        except ValueError as e:
            raise UserError(f"--preset: {e}") from e
    settings = dict(TRAIN_DEFAULTS)
    for key, value in preset.get("train", {}).items():
        if key not in settings:
            raise UserError(f"preset {options['preset']!r}: unknown training setting {key!r}")
        settings[key] = value
    if options.get("imgsz") is not None:
        settings.update(scaled_sizes(int(options["imgsz"])))
    for key in TRAIN_DEFAULTS:
        if options.get(key) is not None:
            settings[key] = options[key]
    settings["amp"] = getattr(settings["amp"], "value", settings["amp"])

    model = dict(preset.get("model", {}))
    for key in MODEL_OPTIONS:
        if options.get(key) is not None:
            model[key] = str(options[key]) if key == "pretrained_backbone" else options[key]
    if options.get("variant") is not None:
        model.update(variant_config(options["variant"]))
    check_settings(settings)
    keyword = str(model.get("pretrained_backbone", "")).lower() in ("imagenet", "none")
    if model.get("pretrained_backbone") and not keyword and not Path(model["pretrained_backbone"]).is_file():
        raise UserError(f"--pretrained-backbone: no such file: {model['pretrained_backbone']}")
    return model, settings


def check_settings(s: dict) -> None:
    positive = ("epochs", "batch_size", "lr_drop", "eval_interval", "log_interval", "max_size", "val_size")
    for key in positive:
        if int(s[key]) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    for key in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "lr_linear_proj_mult"):
        if not (isinstance(s[key], (int, float)) and math.isfinite(s[key]) and s[key] >= 0):
            raise UserError(f"--{key.replace('_', '-')} must be a non-negative number, got {s[key]}")
    if not 0.0 <= s["crop_prob"] <= 1.0:
        raise UserError(f"--crop-prob must be between 0 and 1, got {s['crop_prob']}")
    if s["workers"] < 0:
        raise UserError(f"--workers must be >= 0, got {s['workers']}")
    if s["amp"] not in ("off", "fp16", "bf16"):
        raise UserError(f"--amp must be off, fp16 or bf16, got {s['amp']!r}")
    if s["label_mapping"] not in ("compact", "raw"):
        raise UserError(f"--label-mapping must be compact or raw, got {s['label_mapping']!r}")


def plain(value):
    """Settings -> YAML/checkpoint-safe plain types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def parse_scales(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 32:
        raise UserError(f"--scales must be comma-separated sizes >= 32, e.g. 480,512,544; got {text!r}")
    return values
