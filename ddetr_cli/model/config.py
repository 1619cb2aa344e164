"""The model's configuration: one dataclass with the paper's defaults.

Everything a checkpoint needs to rebuild the network lives here (plain types only, so ddetr
checkpoints load with `torch.load(weights_only=True)`). Optimiser settings (learning rates,
schedules) belong to the training command, not to the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = (*RESNETS, "tiny")


@dataclass
class DeformableDetrConfig:
    """Deformable DETR hyper-parameters; defaults are the paper's R50 model on COCO."""

    # Backbone
    backbone: str = "resnet50"  # resnet18|resnet34|resnet50|resnet101|tiny
    dilation: bool = False  # DC5: dilate C5 instead of striding it
    pretrained_backbone: str | None = None  # a local torchvision/timm ResNet file (training finds it)
    train_backbone: bool = True  # official: lr_backbone > 0 (stem and layer1 stay frozen regardless)
    frozen_bn: bool = True  # FrozenBatchNorm2d in the ResNet (official); False = ordinary BatchNorm2d
    num_feature_levels: int = 4  # 1 = single-scale (C5 only)
    position_embedding_scale: float = 2 * math.pi

    # Transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300  # also the number of proposals in two-stage mode

    # Heads and variants
    num_classes: int = 91
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True

    # Loss weights and matching costs
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25

    # Dataset metadata carried with the weights
    class_names: list[str] | None = None
    category_ids: list[int] | None = None  # class index -> dataset category id; None = identity

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with one clear line when the settings cannot build a model."""
        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.dilation and self.backbone not in ("resnet50", "resnet101"):
            problems.append("dilation (DC5) needs a bottleneck ResNet (resnet50 or resnet101)")
        if self.two_stage and not self.with_box_refine:
            # The official code (and Hugging Face's) score proposals with the refinement heads.
            problems.append("two_stage requires with_box_refine (as in the official implementation)")
        if self.pretrained_backbone and self.backbone not in RESNETS:
            problems.append(f"pretrained_backbone needs a ResNet backbone, not {self.backbone!r}")
        if self.num_feature_levels < 1:
            problems.append(f"num_feature_levels must be >= 1, got {self.num_feature_levels}")
        if self.hidden_dim % 32 != 0:
            problems.append(f"hidden_dim must be a multiple of 32 (GroupNorm(32)), got {self.hidden_dim}")
        if self.nheads < 1 or self.hidden_dim % self.nheads != 0:
            problems.append(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        sizes = ("enc_layers", "dec_layers", "dim_feedforward", "enc_n_points", "dec_n_points")
        for name in (*sizes, "num_queries", "num_classes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            problems.append(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        if self.category_ids is not None and len(self.category_ids) != self.num_classes:
            problems.append(
                f"category_ids has {len(self.category_ids)} ids but num_classes is {self.num_classes}"
            )
        if problems:
            raise ValueError("invalid DeformableDetrConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict (str, int, float, bool, None, lists) suitable for a weights_only checkpoint."""
        out = dataclasses.asdict(self)
        for key in ("class_names", "category_ids"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeformableDetrConfig:
        """Inverse of `to_dict`. Missing keys take the defaults; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DeformableDetrConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DeformableDetrConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
