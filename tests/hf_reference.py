"""Tiny random Hugging Face `DeformableDetrForObjectDetection` models: the reference that the
checkpoint tests (tests/test_checkpoints.py) and the loss tests (tests/test_loss_reference.py)
compare ddetr against. Nothing is downloaded (`use_pretrained_backbone=False`).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
HFConfig = transformers.DeformableDetrConfig
HFModel = transformers.DeformableDetrForObjectDetection

TINY = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=10,
    two_stage_num_proposals=10,
    num_labels=5,
    encoder_n_points=2,
    decoder_n_points=3,
)
# Head counts differ per variant so that the official path must take them from `args`.
VARIANTS = {
    "plain": dict(encoder_attention_heads=8, decoder_attention_heads=8),
    "box_refine": dict(with_box_refine=True, encoder_attention_heads=4, decoder_attention_heads=4),
    "two_stage": dict(
        with_box_refine=True, two_stage=True, encoder_attention_heads=2, decoder_attention_heads=2
    ),
    "single_scale": dict(num_feature_levels=1, encoder_attention_heads=8, decoder_attention_heads=8),
}


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Random values for every float parameter and buffer, at scales that keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
                if name.endswith("weight"):  # norm scales around 1
                    t.add_(1.0)


def hf_model(variant: str = "plain", seed: int = 0, **overrides) -> nn.Module:
    """A randomised HF model of `variant` (TINY sizes; `overrides` are HF config fields), eval mode."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **VARIANTS[variant], **overrides}
    kwargs.setdefault("backbone", "resnet18")
    kwargs.setdefault("use_timm_backbone", True)
    if kwargs["use_timm_backbone"]:
        pytest.importorskip("timm")  # what the published HF checkpoints use as backbone
    model = HFModel(HFConfig(use_pretrained_backbone=False, **kwargs)).eval()
    randomise(model, seed)
    return model
