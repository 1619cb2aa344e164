"""Sine position encoding of feature maps, as Deformable DETR uses it."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of each pixel's position inside the valid (unpadded) image.

    Positions are the running count of valid pixels along each axis, shifted to pixel centres
    (-0.5), normalised by the valid extent (+1e-6) and scaled to [0, scale]; channel pairs use
    frequencies temperature ** (2 * (i // 2) / num_pos_feats). The first half of the output
    channels encodes y, the second half x.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, H, W] bool, True on padding -> [B, 2 * num_pos_feats, H, W] float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[:, :, :, None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[:, :, :, None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """[..., F] angles -> [..., F]: sin of the even channels and cos of the odd ones, interleaved."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
