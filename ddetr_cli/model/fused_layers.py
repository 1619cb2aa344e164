"""The encoder layer of the fused inference copy (ddetr_cli.model.fused): DeformableEncoderLayer's
computation with its linear layers as oneDNN ops, the feed-forward ReLU and residual add inside them."""

from __future__ import annotations

import torch
from torch import nn

from ddetr_cli.model.encoder import DeformableEncoderLayer
from ddetr_cli.model.fused_resnet import FusedLinear


class FusedEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention, then linear2(relu(linear1(x))) + x, as the original
    (dropout is the identity at inference)."""

    def __init__(self, layer: DeformableEncoderLayer):
        super().__init__()
        attn = layer.self_attn
        attn.value_proj = FusedLinear(attn.value_proj)
        attn.output_proj = FusedLinear(attn.output_proj)
        if attn.offsets_and_weights is not None:
            attn.offsets_and_weights = FusedLinear(attn.offsets_and_weights)
        self.self_attn = attn
        self.norm1 = layer.norm1
        self.linear1 = FusedLinear(layer.linear1, "relu")
        self.linear2 = FusedLinear(layer.linear2)
        self.norm2 = layer.norm2

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """src, pos [B, S, C]; reference_points [B, S, L, 2]; padding_mask [B, S] -> [B, S, C]."""
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + attended)
        return self.norm2(self.linear2(self.linear1(src), src))
