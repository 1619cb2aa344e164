"""What a training run starts from: ImageNet (or local, or no) backbone weights for a new model, or a
detector checkpoint to fine-tune, with class-head rows carried over by class name.

Both return a provenance record that the trainer prints in its recipe summary and writes to
args.yaml, so a reviewer can tell what a run was initialised from.
"""

from __future__ import annotations

from pathlib import Path

from ddetr_cli.console import UserError, info, warn


def backbone_start(model_over: dict, ctx=None) -> tuple[dict, dict | None]:
    """Model overrides with `pretrained_backbone` made a local file (or None) -> (overrides, record).

    `pretrained_backbone` in: None (default: ImageNet for ResNets, nothing for tiny), "imagenet",
    "none" or a path. record: {"source", "file", "sha256"}, or None when the backbone starts random.
    Under torchrun the main process resolves (downloads) first and the others then find the file
    cached; a failure is every process's one-line error, so none waits for a peer that quit.
    """
    from ddetr_cli import distributed

    error = None
    if ctx is None or ctx.is_main:
        try:
            over, record = _backbone_start(model_over)
        except UserError as err:
            error = str(err)
    if ctx is not None and ctx.distributed:
        error = distributed.broadcast_object(error, ctx)
    if error is not None:
        raise UserError(error)
    if ctx is not None and not ctx.is_main:
        over, record = _backbone_start(model_over)
    return over, record


def _backbone_start(model_over: dict) -> tuple[dict, dict | None]:
    from ddetr_cli.model import DeformableDetrConfig
    from ddetr_cli.model.pretrained import (
        SCRATCH_WARNING,
        PretrainedWeightsError,
        name_hash_mismatch,
        resolve_backbone_weights,
    )

    over = dict(model_over)
    backbone = over.get("backbone", DeformableDetrConfig.backbone)
    choice = over.pop("pretrained_backbone", None)
    try:
        record = resolve_backbone_weights(backbone, choice)
    except PretrainedWeightsError as err:
        raise UserError(str(err)) from None
    if record is None and choice is not None:
        warn(SCRATCH_WARNING)
    if record is not None:
        mismatch = name_hash_mismatch(record)
        if mismatch:
            warn(mismatch)
    over["pretrained_backbone"] = record["file"] if record else None
    return over, record


def finetune_start(weights, class_names: list[str], meta: dict, overrides: dict, label_mapping: str):
    """Fine-tuning: the checkpoint's model for `class_names` -> (model, class transfer report or None).

    With the compact label mapping, classes whose names match the checkpoint's keep their class-head
    rows (see ddetr_cli.model.class_transfer); `--label-mapping raw` loads as before.
    """
    from ddetr_cli.hub import resolve_weights
    from ddetr_cli.model.checkpoint import CheckpointError
    from ddetr_cli.model.class_transfer import load_for_finetuning

    path = resolve_weights(weights)
    try:
        model, report = load_for_finetuning(
            path, class_names, config_overrides=overrides, by_name=label_mapping == "compact"
        )
    except CheckpointError as err:
        raise UserError(str(err)) from None
    model.config = model.config.replace(**meta)
    if report is not None:
        carried = report["carried"]
        if carried:
            info(
                f"{len(carried)} of {len(class_names)} classes keep {Path(str(weights)).name}'s trained "
                f"class-head rows: {', '.join(carried)}; the others start from the focal-loss prior"
            )
        else:
            info(f"no class names in common with {weights}: all class heads start from the focal-loss prior")
    return model, report
