"""The deformable transformer: flattens the feature pyramid, encodes it, decodes object queries.

In two-stage mode the encoder output also proposes boxes (one per pixel of every level); the
top-scoring proposals become the decoder's reference boxes and, through a sine embedding of the
box, its queries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddetr_cli.model.decoder import DeformableDecoder, DeformableDecoderLayer
from ddetr_cli.model.encoder import DeformableEncoder, DeformableEncoderLayer
from ddetr_cli.model.msda import MSDeformAttn
from ddetr_cli.ops import level_shapes


class DeformableTransformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        enc_layer = DeformableEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points
        )
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers)

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier for every matrix, then the attention modules' own init (official order)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        query_embed: torch.Tensor | None = None,
    ):
        """
        srcs, pos_embeds  per level [B, C, H_l, W_l]; masks per level [B, H_l, W_l] True on padding
        query_embed       [Q, 2C] (query position | query content); None in two-stage mode
        returns           hs [num_dec_layers, B, Q, C], init_reference [B, Q, 2 or 4],
                          inter_references [num_dec_layers, B, Q, 2 or 4], and in two-stage mode the
                          encoder's proposal logits [B, S, num_classes] and unactivated boxes
                          [B, S, 4] (None, None otherwise)
        """
        src_flatten, mask_flatten, pos_flatten, spatial_shapes = self._flatten(srcs, masks, pos_embeds)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        # Without padding, masking the attention values changes nothing: skip those passes (not
        # while tracing or compiling, where the graph must not depend on the mask's values).
        graph = torch.jit.is_tracing() or torch.compiler.is_compiling()
        padding_mask = mask_flatten if graph or mask_flatten.any() else None

        memory = self.encoder(
            src_flatten, spatial_shapes, level_start_index, valid_ratios, pos_flatten, padding_mask
        )

        enc_class = enc_coord_unact = None
        if self.two_stage:
            query_pos, tgt, reference_points, enc_class, enc_coord_unact = self._two_stage_queries(
                memory, mask_flatten, spatial_shapes
            )
        else:
            batch = memory.shape[0]
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            padding_mask,
        )
        return hs, reference_points, inter_references, enc_class, enc_coord_unact

    def _flatten(self, srcs, masks, pos_embeds):
        """Concatenate all levels along one sequence axis: src/pos [B, S, C], mask [B, S],
        spatial_shapes [L, 2] int64. Each level's position encoding gets its level embedding."""
        spatial_shapes = [tuple(src.shape[-2:]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flatten = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, pos in enumerate(pos_embeds)
            ],
            1,
        )
        if torch.jit.is_tracing():  # keep the sizes in the exported graph (dynamic image size)
            spatial_shapes = torch.stack([torch._shape_as_tensor(src)[-2:] for src in srcs])
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src_flatten.device)
        return src_flatten, mask_flatten, pos_flatten, spatial_shapes

    def _two_stage_queries(self, memory, mask_flatten, spatial_shapes):
        """Score every encoder position as a box proposal and keep the top `two_stage_num_proposals`.

        Returns query_pos and tgt [B, Q, C], reference boxes [B, Q, 4] (detached), and the
        proposal logits [B, S, num_classes] and unactivated boxes [B, S, 4] for the encoder loss.
        """
        output_memory, output_proposals = self.gen_encoder_output_proposals(
            memory, mask_flatten, spatial_shapes
        )
        num_layers = self.decoder.num_layers
        enc_class = self.decoder.class_embed[num_layers](output_memory)
        enc_coord_unact = self.decoder.bbox_embed[num_layers](output_memory) + output_proposals

        topk = self.two_stage_num_proposals
        if topk > enc_class.shape[1]:
            raise ValueError(
                f"two-stage needs at least num_queries={topk} encoder positions, but the feature maps "
                f"have only {enc_class.shape[1]}: use larger images or fewer queries"
            )
        # Proposals are ranked by their first class's logit (trained as a binary "object" score).
        topk_index = torch.topk(enc_class[..., 0], topk, dim=1)[1]
        topk_coords_unact = torch.gather(
            enc_coord_unact, 1, topk_index.unsqueeze(-1).expand(-1, -1, 4)
        ).detach()
        reference_points = topk_coords_unact.sigmoid()
        pos_embed = self.get_proposal_pos_embed(topk_coords_unact, self.d_model // 2)
        pos_trans = self.pos_trans_norm(self.pos_trans(pos_embed))
        query_pos, tgt = torch.split(pos_trans, self.d_model, dim=2)
        return query_pos, tgt, reference_points, enc_class, enc_coord_unact

    @staticmethod
    def get_proposal_pos_embed(proposals: torch.Tensor, num_pos_feats: int = 128) -> torch.Tensor:
        """Sine embedding of unactivated boxes [B, Q, 4] -> [B, Q, 4 * num_pos_feats].

        The official code fixes num_pos_feats at 128 (= d_model / 2 for its d_model of 256); it is
        d_model / 2 here so that other widths work (as in Hugging Face's port).
        """
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * scale
        pos = pos[:, :, :, None] / dim_t  # [B, Q, 4, 128]
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """One proposal per encoder position: a box centred on the pixel, 0.05 * 2**level wide.

        memory [B, S, C]; memory_padding_mask [B, S]; spatial_shapes [L, 2].
        Returns the normalised memory [B, S, C] (zeroed at padding / unusable proposals) and the
        proposals in inverse-sigmoid space [B, S, 4] (+inf at padding and where a coordinate is
        outside (0.01, 0.99), so those never win after the box head adds its delta).
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            mask = memory_padding_mask[:, start : start + h * w].view(batch, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            centres = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            sizes = torch.ones_like(centres) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~usable, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~usable, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, proposals


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of a padded map that is image: mask [B, H, W] (True on padding) -> [B, 2] (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)
