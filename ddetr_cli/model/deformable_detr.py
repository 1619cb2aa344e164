"""Deformable DETR: backbone -> input projections -> deformable transformer -> class and box heads."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddetr_cli.model.backbone import Joiner, build_backbone, downsample_mask
from ddetr_cli.model.box_ops import inverse_sigmoid
from ddetr_cli.model.config import DeformableDetrConfig
from ddetr_cli.model.transformer import DeformableTransformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head: 3 layers, hidden -> hidden -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x), inplace=True)
        return self.layers[-1](x)


def _input_projections(backbone: Joiner, hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 convs for the extra levels."""
    projections = []
    for in_channels in backbone.num_channels[:num_feature_levels]:
        projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)))
    in_channels = backbone.num_channels[-1]
    for _ in range(num_feature_levels - len(projections)):
        projections.append(
            nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1),
                nn.GroupNorm(32, hidden_dim),
            )
        )
        in_channels = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projections)


class DeformableDETR(nn.Module):
    """The detector. `model(images, mask)` -> dict of predictions (see `forward`).

    Attribute names follow the official implementation so its state dicts load unchanged. The
    prediction heads are ModuleLists with one entry per decoder layer (plus one for the encoder
    proposals in two-stage mode): the same module repeated, or independent copies with box
    refinement, where the decoder uses them too (`transformer.decoder.bbox_embed` /
    `class_embed` are the very same modules).
    """

    def __init__(self, config: DeformableDetrConfig):
        super().__init__()
        self.config = config
        hidden_dim = config.hidden_dim
        self.num_queries = config.num_queries
        self.num_feature_levels = config.num_feature_levels
        self.aux_loss = config.aux_loss
        self.with_box_refine = config.with_box_refine
        self.two_stage = config.two_stage

        self.backbone = build_backbone(config)
        self.transformer = DeformableTransformer(
            d_model=hidden_dim,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            num_feature_levels=config.num_feature_levels,
            dec_n_points=config.dec_n_points,
            enc_n_points=config.enc_n_points,
            two_stage=config.two_stage,
            two_stage_num_proposals=config.num_queries,
        )
        if not config.two_stage:
            self.query_embed = nn.Embedding(config.num_queries, hidden_dim * 2)
        self.input_proj = _input_projections(self.backbone, hidden_dim, config.num_feature_levels)
        self._build_heads(config)

    def _build_heads(self, config: DeformableDetrConfig) -> None:
        """Class/box heads with the official initialisation and sharing."""
        hidden_dim = config.hidden_dim
        class_embed = nn.Linear(hidden_dim, config.num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # Focal-loss prior: every class starts at probability 0.01.
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        # Boxes start exactly at the reference point.
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)

        num_pred = config.dec_layers + (1 if config.two_stage else 0)
        if config.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # First-layer boxes start small (sigmoid(-2) ~ 0.12 of the image); later layers refine.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
            self.transformer.decoder.bbox_embed = None
        if config.two_stage:
            # Two-stage references are already boxes (the proposals): no size prior.
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """
        images  [B, 3, H, W] float, ImageNet-normalised
        mask    [B, H, W] bool, True on padding; None = no padding
        returns {"pred_logits": [B, Q, num_classes], "pred_boxes": [B, Q, 4] cxcywh in [0, 1] of the
                 valid image, "aux_outputs": [{"pred_logits", "pred_boxes"}] for decoder layers
                 0..n-2 (when aux_loss), "enc_outputs": {"pred_logits" [B, S, num_classes],
                 "pred_boxes" [B, S, 4]} (two-stage only)}
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        srcs, masks, pos = self._feature_pyramid(images, mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed
        )
        # Without aux_loss only the last layer's predictions are returned: compute those alone.
        layers = range(hs.shape[0]) if self.aux_loss else [hs.shape[0] - 1]
        logits, boxes = self._predict(hs, init_reference, inter_references, layers)

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out

    def _feature_pyramid(self, images: torch.Tensor, mask: torch.Tensor):
        """Projected features [B, C, H_l, W_l], masks [B, H_l, W_l] and position encodings per level."""
        features, masks, pos = self.backbone(images, mask)
        srcs = [proj(feat) for proj, feat in zip(self.input_proj, features)]
        masks, pos = masks[: len(srcs)], pos[: len(srcs)]
        for lvl in range(len(srcs), self.num_feature_levels):
            # The first extra level is computed from the last backbone map, the next ones from it.
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            level_mask = downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))
        return srcs, masks, pos

    def _predict(self, hs, init_reference, inter_references, layers):
        """For the decoder `layers`: logits [len(layers), B, Q, C] and boxes [len(layers), B, Q, 4],
        the box head's output added to the layer's reference point (or box) in inverse-sigmoid space."""
        logits, boxes = [], []
        for lvl in layers:
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(coord.sigmoid())
        return torch.stack(logits), torch.stack(boxes)


def build_model(config: DeformableDetrConfig) -> DeformableDETR:
    """A freshly initialised model for `config` (backbone weights from `config.pretrained_backbone`)."""
    return DeformableDETR(config)
