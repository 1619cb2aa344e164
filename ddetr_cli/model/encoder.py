"""Deformable transformer encoder: every pixel of every level attends to a few points on all levels."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ddetr_cli.model.msda import MSDeformAttn
from ddetr_cli.ops import level_shapes


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU feed-forward network."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

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
        src = self.norm1(src + self.dropout1(attended))
        # In place: the linear layer does not keep its output for backward (one buffer less per layer).
        hidden = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(hidden))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level as reference points for every level.

        spatial_shapes [L, 2] (H_l, W_l); valid_ratios [B, L, 2] (w, h) fraction of each map that is
        image. Centres are normalised by the *valid* extent of their own level, then multiplied by
        each target level's valid ratio, so a point keeps its position relative to the image on all
        levels. Returns [B, S, L, 2] (x, y), relative to the padded maps.
        """
        device = valid_ratios.device
        per_level = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """src, pos [B, S, C] (levels flattened); valid_ratios [B, L, 2]; padding_mask [B, S]
        -> memory [B, S, C]."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output
