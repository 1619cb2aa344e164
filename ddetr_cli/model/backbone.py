"""Backbones: a torchvision ResNet with frozen BatchNorm (official layout) or a tiny CNN for the demo.

The module tree matches the official code so that official checkpoints load unchanged:
`backbone` is a `Joiner` (an nn.Sequential of the CNN and the position encoding), so the ResNet's
weights are at `backbone.0.body.<torchvision name>`.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ddetr_cli.model.config import RESNETS, DeformableDetrConfig
from ddetr_cli.model.position_encoding import PositionEmbeddingSine

# Output channels of layer2, layer3, layer4.
_RESNET_CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, none trained).

    eps is added before the rsqrt, as in the official code.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.eps = eps

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision/timm BatchNorm weights carry a counter this module has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Padding mask [B, H, W] -> [B, h, w] by nearest-neighbour resizing (as the official code)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class ResNetBackbone(nn.Module):
    """torchvision ResNet returning C3-C5 (strides 8/16/32) or only C5 for single-scale models.

    As in the official code, the stem and layer1 are always frozen and layer2-4 train only when
    `train_backbone` is true.
    """

    def __init__(self, name: str, train_backbone: bool, multi_scale: bool, dilation: bool, frozen_bn: bool):
        super().__init__()
        # Imported here: torchvision (and the torch._dynamo/sympy it pulls in) adds seconds to every
        # command's start, and the tiny demo backbone does not need it.
        import torchvision
        from torchvision.models._utils import IntermediateLayerGetter

        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer
        )
        for param_name, param in resnet.named_parameters():
            trainable = train_backbone and any(f"layer{i}" in param_name for i in (2, 3, 4))
            param.requires_grad_(trainable)
        channels = _RESNET_CHANNELS[name]
        if multi_scale:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 16 if dilation else 32]
            self.num_channels = channels
        else:
            return_layers = {"layer4": "0"}
            self.strides = [16 if dilation else 32]
            self.num_channels = channels[-1:]
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> feature maps [B, C_l, H_l, W_l], finest first."""
        return list(self.body(images).values())


def _conv_gn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """A small from-scratch CNN (conv-GroupNorm-ReLU) for CPU demos and tests.

    Widths 32/64/128/256 at strides 4/8/16/32; returns the stride 8/16/32 maps (or stride 32 only
    for single-scale models). Everything trains (it has no pretrained weights to keep).
    """

    widths = (32, 64, 128, 256)

    def __init__(self, train_backbone: bool, multi_scale: bool):
        super().__init__()
        w = self.widths
        stages = OrderedDict()
        stages["stem"] = nn.Sequential(_conv_gn_relu(3, w[0], 2), _conv_gn_relu(w[0], w[0], 2))
        for i in range(1, 4):
            stages[f"layer{i + 1}"] = nn.Sequential(
                _conv_gn_relu(w[i - 1], w[i], 2), _conv_gn_relu(w[i], w[i], 1)
            )
        self.body = nn.Sequential(stages)
        self.multi_scale = multi_scale
        self.strides = [8, 16, 32] if multi_scale else [32]
        self.num_channels = list(w[1:]) if multi_scale else [w[-1]]
        self.requires_grad_(train_backbone)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> feature maps [B, C_l, H_l, W_l], finest first."""
        features = []
        x = images
        for name, stage in self.body.named_children():
            x = stage(x)
            if name != "stem":
                features.append(x)
        return features if self.multi_scale else features[-1:]


class Joiner(nn.Sequential):
    """(CNN, position encoding) in one nn.Sequential, so the CNN's parameters sit at `backbone.0.*`."""

    def __init__(self, cnn: nn.Module, position_embedding: PositionEmbeddingSine):
        super().__init__(cnn, position_embedding)
        self.strides = cnn.strides
        self.num_channels = cnn.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """images [B, 3, H, W], mask [B, H, W] -> per level: features [B, C_l, H_l, W_l],
        masks [B, H_l, W_l] (True on padding) and position encodings [B, hidden_dim, H_l, W_l]."""
        features = self[0](images)
        masks = [downsample_mask(mask, f.shape[-2:]) for f in features]
        pos = [self[1](m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, pos


def load_backbone_weights(resnet_body: nn.Module, path: str) -> None:
    """Load torchvision or timm ResNet weights from a local file into the backbone body.

    Accepts a bare state dict or one nested under "state_dict"/"model"; a "module."/"model." prefix
    is stripped and the classifier ("fc.*") ignored. Raises ValueError naming the file otherwise.
    """
    state = _read_state_dict(path)
    state = {_strip_prefix(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = resnet_body.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not k.endswith("num_batches_tracked")]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s) e.g. {', '.join(keys[:3])}")
        raise ValueError(f"{path}: not weights for this backbone: {'; '.join(parts)}")
    resnet_body.load_state_dict(state, strict=False)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: backbone weights file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not a weights file"
        raise ValueError(f"{path}: cannot read backbone weights ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: backbone weights file does not hold a state dict of tensors")
    return state


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def build_backbone(config: DeformableDetrConfig) -> Joiner:
    """The Joiner for `config`: CNN (+ local pretrained weights) and sine position encoding."""
    multi_scale = config.num_feature_levels > 1
    if config.backbone in RESNETS:
        cnn = ResNetBackbone(
            config.backbone, config.train_backbone, multi_scale, config.dilation, config.frozen_bn
        )
        if config.pretrained_backbone:
            load_backbone_weights(cnn.body, config.pretrained_backbone)
    else:
        cnn = TinyBackbone(config.train_backbone, multi_scale)
    position = PositionEmbeddingSine(config.hidden_dim // 2, scale=config.position_embedding_scale)
    return Joiner(cnn, position)
