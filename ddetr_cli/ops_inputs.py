"""Inputs for exercising `ddetr_cli.ops.ms_deform_attn`: the standard benchmark shapes and a
generator of random, model-like inputs (shared by the op tests and `ddetr bench op`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Feature-map sizes of a 800x1333 input at strides 8, 16, 32, 64 (the paper's 4 levels).
ENCODER_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))


@dataclass(frozen=True)
class OpShape:
    """One call's sizes: value [B, S, M, D], sampling_locations [B, Q, M, L, K, 2]."""

    name: str
    levels: tuple[tuple[int, int], ...]
    queries: int
    batch: int = 1
    heads: int = 8
    channels: int = 32
    points: int = 4


def standard_shapes(batch: int) -> list[OpShape]:
    """The encoder (one query per pixel: 22,223) and decoder (300 queries) calls at 800x1333."""
    encoder_queries = sum(h * w for h, w in ENCODER_LEVELS)
    return [
        OpShape("encoder", ENCODER_LEVELS, encoder_queries, batch),
        OpShape("decoder", ENCODER_LEVELS, 300, batch),
    ]


def make_inputs(
    shape: OpShape,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    margin: float = 0.1,
    avoid_cell_edges: bool = True,
    locations: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    `locations="uniform"`: uniform in [-margin, 1 + margin] (some points fall outside the map);
    `"local"`: model-like, each point within ±4 pixels of its query's reference point (see
    `local_locations`). Attention weights are a softmax over the L*K points of each head, as in the
    model. With `avoid_cell_edges`, locations within 1e-3 pixel of a pixel centre line are moved off
    it: the bilinear gradient jumps there, so two correct implementations that round the pixel
    coordinate differently in fp32 may disagree on the gradient of such a point. Locations and weights are
    float32 (float64 for float64 values), value is `dtype`.
    """
    gen = torch.Generator().manual_seed(seed)
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    spatial_shapes = torch.tensor(shape.levels, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    B, Q, M, D, L, K = (
        shape.batch,
        shape.queries,
        shape.heads,
        shape.channels,
        len(shape.levels),
        shape.points,
    )
    value = torch.randn(B, int(sizes.sum()), M, D, generator=gen, dtype=torch.float64)
    if locations == "uniform":
        loc = torch.rand(B, Q, M, L, K, 2, generator=gen, dtype=torch.float64) * (1 + 2 * margin) - margin
    elif locations == "local":
        loc = local_locations(shape, gen)
    else:
        raise ValueError(f"locations must be 'uniform' or 'local', got {locations!r}")
    if avoid_cell_edges:
        wh = spatial_shapes.flip(-1).to(torch.float64).view(1, 1, 1, L, 1, 2)  # (W, H) per level
        pixel = loc * wh - 0.5
        near = (pixel - pixel.round()).abs() < 1e-3
        loc = torch.where(near, loc + 2e-3 / wh, loc)
    logits = torch.randn(B, Q, M, L * K, generator=gen, dtype=torch.float64)
    weights = logits.softmax(-1).view(B, Q, M, L, K)
    return (
        value.to(device=device, dtype=dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        loc.to(device=device, dtype=loc_dtype),
        weights.to(device=device, dtype=loc_dtype),
    )


def local_locations(shape: OpShape, gen: torch.Generator, radius: float = 4.0) -> torch.Tensor:
    """Model-like sampling locations [B, Q, M, L, K, 2] (x, y in [0, 1]): query q is the centre of
    pixel q of the levels laid end to end (the encoder's queries; queries past the last pixel wrap
    round), and each point lies within ±`radius` pixels of it on its level, as the encoder's
    learned offsets mostly do. Neighbouring queries then sample neighbouring value rows."""
    levels = torch.tensor(shape.levels, dtype=torch.float64)  # (H, W) per level
    centres = []
    for h, w in shape.levels:
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
        )
        centres.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    centres = torch.cat(centres)
    reference = centres[torch.arange(shape.queries) % len(centres)]  # [Q, 2]
    L = len(shape.levels)
    size = (shape.batch, shape.queries, shape.heads, L, shape.points, 2)
    offsets = (torch.rand(size, generator=gen, dtype=torch.float64) * 2 - 1) * radius
    return reference.view(1, -1, 1, 1, 1, 2) + offsets / levels.flip(-1).view(1, 1, 1, L, 1, 2)
