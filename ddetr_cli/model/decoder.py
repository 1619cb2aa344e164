"""Deformable transformer decoder: object queries attend to each other, then to the encoder memory."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ddetr_cli.model.box_ops import inverse_sigmoid
from ddetr_cli.model.msda import MSDeformAttn


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: query self-attention, deformable cross-attention, ReLU feed-forward network."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, query_pos [B, Q, C]; reference_points [B, Q, L, 2 or 4]; memory [B, S, C] -> [B, Q, C]."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))

        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attended))

        # In place: the linear layer does not keep its output for backward (one buffer less per layer).
        hidden = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(hidden))


class DeformableDecoder(nn.Module):
    """Stack of decoder layers returning every layer's output and reference points.

    With iterative box refinement the model sets `bbox_embed` (one head per layer): after each
    layer the reference boxes are refined by that layer's box head, with gradients stopped
    between layers. In two-stage mode the model also sets `class_embed`, whose extra last entry
    scores the encoder proposals. (The attribute names match the official checkpoints.)
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        query_pos: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        tgt, query_pos    [B, Q, C]
        reference_points  [B, Q, 2] points or [B, Q, 4] boxes, in [0, 1] of the valid image
        valid_ratios      [B, L, 2]
        returns           hidden states [num_layers, B, Q, C] and the reference points each layer's
                          output is relative to [num_layers, B, Q, 2 or 4] (4 once refined)
        """
        output = tgt
        hidden_states, references = [], []
        for lid, layer in enumerate(self.layers):
            # Image-relative reference -> relative to each level's padded map.
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
            reference_input = reference_points[:, :, None] * ratios[:, None]
            output = layer(
                output,
                query_pos,
                reference_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
            )
            if self.bbox_embed is not None:
                reference_points = self._refine(self.bbox_embed[lid](output), reference_points)
            hidden_states.append(output)
            references.append(reference_points)
        return torch.stack(hidden_states), torch.stack(references)

    @staticmethod
    def _refine(delta: torch.Tensor, reference_points: torch.Tensor) -> torch.Tensor:
        """Box-head output [B, Q, 4] (logit space) + reference -> detached refined boxes [B, Q, 4]."""
        if reference_points.shape[-1] == 4:
            refined = delta + inverse_sigmoid(reference_points)
        else:  # a point reference only shifts the centre; the size comes from the head alone
            refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
        return refined.sigmoid().detach()
