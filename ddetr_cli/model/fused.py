"""An inference-only copy of a detector: the same function, in fewer and cheaper ops.

`fuse_for_inference(model)` returns a deep copy in which
- every FrozenBatchNorm2d of the ResNet is folded into the convolution before it (weight * scale,
  bias = shift), removing two full passes over each feature map;
- the ResNet's ReLUs and residual additions run inside its convolutions (oneDNN post-ops, see
  fused_resnet.py), on CPU;
- on CPU, the ResNet and the input projections run in channels_last (NHWC) memory, the layout
  oneDNN's convolutions use natively, and which makes flattening the maps into tokens a view;
- on CPU, the encoder's linear layers run as oneDNN ops with the feed-forward ReLU and residual add
  fused in (fused_layers.py);
- each deformable attention computes its sampling offsets and attention weights in one linear layer;
- what depends on the input size only (position encodings of unpadded maps, the encoder's reference
  points) is computed once per size and reused;
- only the last decoder layer's predictions are computed (aux_loss off: nothing trains this copy);
- the decoder runs on one intra-op thread, except for its projections of the encoder memory: its
  other ops work on a few hundred queries, too little to split across threads, and each split op
  waits for a second thread to be scheduled (milliseconds per op on a busy machine).

The outputs differ from the original's by float rounding only (tests/test_fused.py). The copy's
module tree and state dict differ from the checkpoint layout: it is for running, never for training
or saving (`model.fused_for_inference` is True on it).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict

import torch
from torch import nn

from ddetr_cli.model.backbone import FrozenBatchNorm2d, ResNetBackbone
from ddetr_cli.model.fused_layers import FusedEncoderLayer
from ddetr_cli.model.fused_resnet import fuse_resnet_blocks, pointwise_available
from ddetr_cli.model.msda import MSDeformAttn
from ddetr_cli.threads import intra_op_threads


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A fused eval-mode copy of a DeformableDETR (the original is untouched); a fused model itself."""
    if getattr(model, "fused_for_inference", False):
        return model
    fused = copy.deepcopy(model).eval()
    fused.requires_grad_(False)
    cnn = fused.backbone[0]
    fold_frozen_batchnorms(cnn)
    on_cpu = next(fused.parameters()).device.type == "cpu"
    onednn = on_cpu and pointwise_available()
    if isinstance(cnn, ResNetBackbone) and on_cpu:  # (fp32 convolutions on a GPU gain nothing in NHWC)
        if onednn:
            fuse_resnet_blocks(cnn.body)
        cnn.body = ChannelsLast(cnn.body)
        cnn.body.to(memory_format=torch.channels_last)
        fused.input_proj.to(memory_format=torch.channels_last)
    for module in fused.modules():
        if isinstance(module, MSDeformAttn):
            module.offsets_and_weights = _stacked(module.sampling_offsets, module.attention_weights)
    if onednn:
        layers = fused.transformer.encoder.layers
        for i, layer in enumerate(layers):
            layers[i] = FusedEncoderLayer(layer)
    fused.backbone[1] = UnpaddedPositionCache(fused.backbone[1])
    encoder = fused.transformer.encoder
    encoder.get_reference_points = ReferencePointCache(encoder.get_reference_points)
    fused.aux_loss = False
    decoder = fused.transformer.decoder
    decoder.forward = on_one_thread(decoder.forward)
    for layer in decoder.layers:
        layer.cross_attn.value_proj = AllThreads(layer.cross_attn.value_proj)
    fused.fused_for_inference = True
    return fused


def fold_frozen_batchnorms(module: nn.Module) -> int:
    """Fold every `convX`/`bnX` pair (and `downsample` = Sequential(conv, bn)) below `module` into
    the conv, in place; the BatchNorm becomes nn.Identity. Returns how many were folded."""
    folded = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        pairs = [(name.replace("bn", "conv", 1), name) for name in children if name.startswith("bn")]
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            pairs.append(("0", "1"))
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                _fold(conv, bn)
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


@torch.no_grad()
def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One linear layer computing `linears` on the same input, outputs concatenated."""
    weight = torch.cat([linear.weight for linear in linears])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    stacked.weight.copy_(weight)
    stacked.bias.copy_(torch.cat([linear.bias for linear in linears]))
    return stacked.requires_grad_(False)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    """conv then bn -> one conv: bn(conv(x)) = conv(x) * scale + shift (FrozenBatchNorm2d's formula)."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias, requires_grad=False)


class ChannelsLast(nn.Module):
    """Runs `body` on a channels_last copy of its input (the body's weights are channels_last too)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, images: torch.Tensor):
        return self.body(images.contiguous(memory_format=torch.channels_last))


class UnpaddedPositionCache(nn.Module):
    """A position encoding that remembers its output for masks without padding, which depends on the
    mask's shape only (the last `size` shapes: one per pyramid level, with room to spare)."""

    def __init__(self, encoding: nn.Module, size: int = 8):
        super().__init__()
        self.encoding = encoding
        self.size = size
        self.cache: OrderedDict = OrderedDict()

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.any():
            return self.encoding(mask)
        return _remembered(
            self.cache, (tuple(mask.shape), mask.device), self.size, lambda: self.encoding(mask)
        )


class ReferencePointCache:
    """The encoder's reference points (a function of the level shapes and valid ratios only), kept for
    the last `size` (shapes, ratios) seen."""

    def __init__(self, compute, size: int = 4):
        self.compute = compute
        self.size = size
        self.cache: OrderedDict = OrderedDict()

    def __call__(self, spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
        key = (str(spatial_shapes.tolist()), str(valid_ratios.tolist()), valid_ratios.device)
        return _remembered(self.cache, key, self.size, lambda: self.compute(spatial_shapes, valid_ratios))


def _remembered(cache: OrderedDict, key, size: int, compute) -> torch.Tensor:
    """cache[key], computed on a miss; the least recently used entry goes beyond `size`."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = value = compute()
    if len(cache) > size:
        cache.popitem(last=False)
    return value


_outer_threads: list[int] = []  # the thread counts that on_one_thread calls replaced, innermost last


def on_one_thread(forward):
    """`forward` run with one intra-op thread (the setting is restored afterwards, also on errors)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        _outer_threads.append(torch.get_num_threads())
        try:
            with intra_op_threads(1):
                return forward(*args, **kwargs)
        finally:
            _outer_threads.pop()

    return run


class AllThreads(nn.Module):
    """Runs `module` with the thread count in force outside the innermost on_one_thread call."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _outer_threads:
            return self.module(x)
        with intra_op_threads(_outer_threads[-1]):
            return self.module(x)
