"""Multi-scale deformable attention: the one op the model's attention time goes into.

`ms_deform_attn` is the only entry point the model, the CLI and the tests call; it dispatches to
the best available backend. `ms_deform_attn_reference` is the pure-PyTorch definition
(grid_sample, align_corners=False, zero padding) every kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention.

    value               [B, S, M, D]   S = sum of H_l*W_l over levels
    spatial_shapes      [L, 2]         (H_l, W_l), int64
    level_start_index   [L]            offset of each level in S (unused here, kept for the signature)
    sampling_locations  [B, Q, M, L, K, 2]  (x, y) in [0, 1]
    attention_weights   [B, Q, M, L, K]
    returns             [B, Q, M*D]
    """
    B, _, M, D = value.shape
    _, Q, _, L, K, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # [B, H*W, M, D] -> [B*M, D, H, W]
        v = value_per_level[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, int(h), int(w))
        # [B, Q, M, K, 2] -> [B*M, Q, K, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*M, D, Q, L*K] weighted by [B*M, 1, Q, L*K]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * K)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention on the best available backend; see the reference for shapes."""
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def backend() -> str:
    """Name of the backend `ms_deform_attn` uses."""
    return "reference"
