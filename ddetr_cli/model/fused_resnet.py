"""ResNet blocks and encoder feed-forward layers as oneDNN ops with their ReLU and residual add fused
in (CPU inference).

After `fold_frozen_batchnorms` a torchvision block is conv -> ReLU -> conv (-> ReLU -> conv), then
+ identity and ReLU. oneDNN applies the ReLU and the addition as post-ops of the convolution that
precedes them (`torch.ops.mkldnn._convolution_pointwise`, the kernels that torch.compile's CPU
backend fuses into), so each block makes one pass per convolution and none for the element-wise ops.
The results are those of the unfused convolutions: the same oneDNN kernels compute them. The encoder's
linear layers likewise become `torch.ops.mkldnn._linear_pointwise` (bias, ReLU and residual add in the
matrix product: no separate passes), which rounds like any other matrix product.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def pointwise_available() -> bool:
    """True where torch has oneDNN's fused convolutions and linear layers (x86 / ARM CPU builds)."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_convolution_pointwise")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def fuse_resnet_blocks(body: nn.Module) -> None:
    """In place, on a ResNet body whose BatchNorms are folded (nn.Identity): the stem conv with its
    ReLU and every BasicBlock / Bottleneck become fused oneDNN convolutions."""
    for name, child in list(body.named_children()):
        if isinstance(child, (BasicBlock, Bottleneck)):
            if all(isinstance(norm, nn.Identity) for norm in _norms(child)):  # else trainable BatchNorms
                setattr(body, name, FusedBlock(child))
        elif (
            name == "conv1"
            and isinstance(child, nn.Conv2d)
            and isinstance(getattr(body, "bn1", None), nn.Identity)
            and isinstance(getattr(body, "relu", None), nn.ReLU)
        ):
            body.conv1 = FusedConv(child, "relu")
            body.relu = nn.Identity()
        elif isinstance(child, nn.Sequential):
            fuse_resnet_blocks(child)


class FusedConv(nn.Module):
    """`conv` followed by `post` ("relu" or "none"); or, with `other`, relu(conv(x) + other)."""

    def __init__(self, conv: nn.Conv2d, post: str = "none"):
        super().__init__()
        self.conv = conv
        self.post = post
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if not _can_fuse(x):
            y = self.conv(x) if other is None else self.conv(x) + other
            return torch.relu(y) if self.post == "relu" else y
        ops, w, b = torch.ops.mkldnn._convolution_pointwise, self.conv.weight, self.conv.bias
        if other is None:
            return ops.default(x, w, b, *self.geometry, self.post, [], "")
        return ops.binary(x, other, w, b, *self.geometry, "add", 1.0, self.post, [], "")


def _can_fuse(x: torch.Tensor) -> bool:
    """oneDNN's fused ops run fp32 CPU inference only (no autograd; under autocast the plain convolution
    keeps autocast's dtype)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )


class FusedBlock(nn.Module):
    """A torchvision BasicBlock or Bottleneck (BatchNorms folded) with its ReLUs and residual add fused."""

    def __init__(self, block: BasicBlock | Bottleneck):
        super().__init__()
        if not all(isinstance(norm, nn.Identity) for norm in _norms(block)):
            raise ValueError("fold the block's BatchNorms into its convolutions first")
        convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
        self.inner = nn.ModuleList(FusedConv(conv, "relu") for conv in convs[:-1])
        self.last = FusedConv(convs[-1], "relu")
        self.downsample = None if block.downsample is None else FusedConv(block.downsample[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for conv in self.inner:
            out = conv(out)
        return self.last(out, identity)


def _norms(block: BasicBlock | Bottleneck) -> list[nn.Module]:
    norms = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])
    return norms + ([] if block.downsample is None else [block.downsample[1]])


class FusedLinear(nn.Module):
    """`linear` followed by `post` ("relu" or "none"); or, with `other`, linear(x) + other."""

    def __init__(self, linear: nn.Linear, post: str = "none"):
        super().__init__()
        self.linear = linear
        self.post = post

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        ops, w, b = torch.ops.mkldnn._linear_pointwise, self.linear.weight, self.linear.bias
        if not _can_fuse(x):
            y = self.linear(x) if other is None else self.linear(x) + other
            return torch.relu(y) if self.post == "relu" else y
        if other is None:
            return ops.default(x, w, b, self.post, [], "")
        if self.post != "none":
            raise ValueError("a residual add is fused without a ReLU")
        return ops.binary(x, other, w, b, "add")
