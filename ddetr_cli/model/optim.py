"""Optimiser parameter groups with the official learning-rate split."""

from __future__ import annotations

from torch import nn

BACKBONE_NAMES = ("backbone.0",)
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def param_groups(
    model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float = 0.1
) -> list[dict]:
    """Trainable parameters split as the official `main.py` does.

    Backbone CNN (`backbone.0.*`) at `lr_backbone`; the layers predicting reference points and
    sampling offsets at `lr * lr_linear_proj_mult` (they move sampling locations, so they learn
    slowly); everything else at `lr`. Groups are named ("main", "backbone", "linear_proj") and
    empty groups are left out. Frozen parameters are not included.
    """
    groups = {"main": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name for key in BACKBONE_NAMES):
            groups["backbone"].append(param)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(param)
        else:
            groups["main"].append(param)
    rates = {"main": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"name": name, "params": params, "lr": rates[name]} for name, params in groups.items() if params]
