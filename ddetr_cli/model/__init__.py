"""Deformable DETR model, loss, post-processing and checkpoints.

Typical use::

    config = DeformableDetrConfig(num_classes=3)
    model = build_model(config)
    out = model(images, mask)  # pred_logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh in [0, 1]
    losses = build_criterion(config)(out, targets)  # losses["loss"] is the weighted total
    detections = postprocess(out, sizes)  # per image: scores, labels, boxes (absolute xyxy)
    model = load_model("r50_deformable_detr.pth")  # official, Hugging Face or ddetr checkpoints
"""

from ddetr_cli.model.checkpoint import CheckpointError, load_model, model_checkpoint
from ddetr_cli.model.config import DeformableDetrConfig
from ddetr_cli.model.criterion import SetCriterion, build_criterion
from ddetr_cli.model.deformable_detr import DeformableDETR, build_model
from ddetr_cli.model.optim import param_groups
from ddetr_cli.model.postprocess import postprocess

__all__ = [
    "CheckpointError",
    "load_model",
    "model_checkpoint",
    "DeformableDetrConfig",
    "DeformableDETR",
    "SetCriterion",
    "build_model",
    "build_criterion",
    "param_groups",
    "postprocess",
]
