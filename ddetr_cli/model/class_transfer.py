"""Fine-tuning to new classes, keeping what transfers: class-head rows carried over by class name.

A COCO-trained checkpoint fine-tuned on a dataset that shares some class names (`person`, `car`,
`dog`) gives those classes the trained rows of every class head (each decoder layer's, and the
two-stage encoder head) instead of a fresh start; the other classes start from the focal-loss prior
(bias -log(99), as a new model). Names match case-insensitively, with `_` and `-` read as spaces.

The checkpoint's names are its own (ddetr `class_names`, Hugging Face `id2label`); an official
91-logit checkpoint, which carries none, is read as COCO (logit index = COCO category id).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ddetr_cli.model.checkpoint import _CLASS_HEAD, model_from_state, read_checkpoint
from ddetr_cli.model.coco_classes import COCO_CATEGORY_NAMES
from ddetr_cli.model.deformable_detr import DeformableDETR

COCO_LOGITS = 91  # official COCO models: one logit per category id 0..90


def normalise(name: str) -> str:
    return " ".join(re.sub(r"[_-]", " ", str(name)).lower().split())


def checkpoint_class_names(fields: dict[str, Any]) -> list[str] | None:
    """The class name of each of the checkpoint's logits, or None when it does not say."""
    names = fields.get("class_names")
    if names:
        return [str(n) for n in names]
    if fields.get("num_classes") == COCO_LOGITS and fields.get("category_ids") is None:
        return [COCO_CATEGORY_NAMES.get(i, "") for i in range(COCO_LOGITS)]
    return None


def match_classes(source: list[str], target: list[str]) -> dict[int, int]:
    """{target index: source index} for target classes whose name the source has (first occurrence)."""
    index: dict[str, int] = {}
    for i, name in enumerate(source):
        key = normalise(name)
        if key and key not in ("n/a", "background"):
            index.setdefault(key, i)
    return {j: index[normalise(name)] for j, name in enumerate(target) if normalise(name) in index}


def carry_over(model: DeformableDETR, state: dict[str, torch.Tensor], rows: dict[int, int]) -> None:
    """Copy class-head rows (`rows`: {model class: checkpoint class}) from `state` into `model`.

    Every `class_embed.N.{weight,bias}` ([K, D] and [K]) the model has is filled, which covers each
    decoder layer's head and the two-stage encoder head (the last one).
    """
    if not rows:
        return
    target = torch.tensor(list(rows), dtype=torch.long)
    source = torch.tensor(list(rows.values()), dtype=torch.long)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in state.items():
            if _CLASS_HEAD.match(key) and key in params:
                params[key][target] = value[source].to(params[key].dtype)


def load_for_finetuning(
    path: str | Path,
    class_names: list[str],
    config_overrides: dict[str, Any] | None = None,
    by_name: bool = True,
) -> tuple[DeformableDETR, dict | None]:
    """A checkpoint's model for a dataset with `class_names` -> (model on the CPU, report or None).

    by_name and the checkpoint names its classes, differently from `class_names`: class heads start
    fresh and matching names get the checkpoint's rows; report = {"from", "carried", "initialised"}
    (class names). Otherwise load_model's rule: heads kept when the class count is the same, else
    re-initialised (report None). Raises CheckpointError.
    """
    path = Path(path)
    fields, state = read_checkpoint(path, config_overrides)
    source = checkpoint_class_names(fields) if by_name else None
    same = source is not None and [normalise(n) for n in source] == [normalise(n) for n in class_names]
    if source is None or same:
        return model_from_state(path, fields, state, len(class_names), config_overrides), None
    model = model_from_state(path, fields, state, len(class_names), config_overrides, fresh_class_heads=True)
    rows = match_classes(source, class_names)
    carry_over(model, state, rows)
    report = {
        "from": str(path),
        "carried": [class_names[j] for j in sorted(rows)],
        "initialised": [n for j, n in enumerate(class_names) if j not in rows],
    }
    return model, report
