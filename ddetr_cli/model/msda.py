"""The multi-scale deformable attention module (paper eq. 3); the sampling itself is `ops.ms_deform_attn`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddetr_cli import ops


class MSDeformAttn(nn.Module):
    """Each query attends to n_points sampled locations per head and per level around its reference.

    Sampling offsets and attention weights (softmax over levels x points) are linear functions of
    the query; values are a linear projection of the flattened multi-level feature maps.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # Inference copies (ddetr_cli.model.fused) set one linear computing both of the above.
        self.offsets_and_weights: nn.Linear | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The paper's init: offsets start on a ring of head directions, point k at distance k+1;
        attention starts uniform."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        # Scale each direction so its larger coordinate is +-1 (points on a square, not a circle).
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        query             [B, Q, C]
        reference_points  [B, Q, L, 2] (x, y) in [0, 1] of the padded map, or [B, Q, L, 4] boxes
                          (cx, cy, w, h): offsets are then scaled by half the box size / n_points
        input_flatten     [B, S, C], S = sum_l H_l * W_l
        spatial_shapes    [L, 2] int64 (H_l, W_l); level_start_index [L] int64
        padding_mask      [B, S] bool, True on padding (those values are zeroed)
        returns           [B, Q, C]
        """
        B, Q, _ = query.shape
        S = input_flatten.shape[1]
        M, L, K = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)

        if self.offsets_and_weights is None:
            offsets = self.sampling_offsets(query).view(B, Q, M, L, K, 2)
            weights = self.attention_weights(query).view(B, Q, M, L * K)
        else:
            both = self.offsets_and_weights(query)
            offsets = both[..., : M * L * K * 2].unflatten(-1, (M, L, K, 2))
            weights = both[..., M * L * K * 2 :].unflatten(-1, (M, L * K))
        weights = F.softmax(weights, -1).view(B, Q, M, L, K)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            centres = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centres + offsets / K * sizes * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}"
            )
        output = ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)
