"""ImageNet weights for the ResNet backbones, through torchvision's weights API and cache.

    record = resolve_backbone_weights("resnet50", "imagenet")
    record == {"source": "torchvision ResNet50_Weights.IMAGENET1K_V1",
               "file": "/root/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth", "sha256": "0676ba61..."}

The weights are the ones the official code trains from (`torchvision.models.resnet50(pretrained=True)`
is IMAGENET1K_V1), cached where torchvision caches them: `$TORCH_HOME/hub/checkpoints/` (default
~/.cache/torch). A cached file is used without touching the network. A missing one is downloaded
once with torchvision's hash check, unless the Hugging Face ecosystem's offline switch is on
(`HF_HUB_OFFLINE=1` or `TRANSFORMERS_OFFLINE=1`): then, as when the download fails, the error is one
line naming the file, where it was looked for, and the two ways out (a local file, or `none`).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

from ddetr_cli.model.config import RESNETS

IMAGENET = "imagenet"  # --pretrained-backbone default for the ResNets
NONE = "none"  # --pretrained-backbone none: train the ResNet from scratch
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: an unreachable network fails, it does not hang
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# torch.hub's cache names end in the first hex digits of the file's sha256 ("resnet50-0676ba61.pth").
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
SCRATCH_WARNING = (
    "--pretrained-backbone none: the ResNet starts from random weights with frozen BatchNorm; the "
    "paper's numbers need ImageNet-pretrained weights"
)


class PretrainedWeightsError(ValueError):
    """The weights cannot be had; the message is one line naming the file and the ways out."""


def imagenet_weights(backbone: str):
    """The torchvision weights enum member the official code uses for `backbone` (IMAGENET1K_V1)."""
    import torchvision

    if backbone not in RESNETS:
        raise PretrainedWeightsError(f"no ImageNet weights for backbone {backbone!r} (ResNets only)")
    enum = getattr(torchvision.models, f"ResNet{backbone[len('resnet') :]}_Weights")
    return enum.IMAGENET1K_V1


def cache_dir() -> Path:
    """Where torchvision keeps downloaded weights: $TORCH_HOME/hub/checkpoints (read now, not at import)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def resolve_backbone_weights(backbone: str, choice: str | None) -> dict | None:
    """--pretrained-backbone (None = default) -> {"source", "file", "sha256"} or None (from scratch).

    choice: None or "imagenet" (torchvision's cache, downloading once), "none", or a local file.
    The tiny backbone has no pretrained weights: None for it unless a file was asked for.
    Raises PretrainedWeightsError.
    """
    if choice is not None and str(choice).lower() == NONE:
        return None
    if choice is not None and str(choice).lower() != IMAGENET:
        path = Path(choice)
        if not path.is_file():
            raise PretrainedWeightsError(f"--pretrained-backbone: no such file: {path}")
        return {"source": "file", "file": str(path.resolve()), "sha256": sha256_prefix(path)}
    if backbone not in RESNETS:
        if choice is None:
            return None
        raise PretrainedWeightsError(f"--pretrained-backbone imagenet: no ImageNet weights for {backbone!r}")
    weights = imagenet_weights(backbone)
    path = cached_or_download(weights)
    return {"source": f"torchvision {weights}", "file": str(path), "sha256": sha256_prefix(path)}


def cached_or_download(weights) -> Path:
    """The cached file of torchvision `weights`; downloaded (hash-checked) when missing and online."""
    import torch

    directory = cache_dir()
    path = directory / Path(weights.url).name
    if path.is_file():
        return path
    ways_out = (
        "pass --pretrained-backbone PATH (a torchvision or timm ResNet state dict) or "
        "--pretrained-backbone none (train from scratch)"
    )
    if offline():
        switch = next(v for v in OFFLINE_VARIABLES if os.environ.get(v))
        raise PretrainedWeightsError(
            f"ImageNet weights {path.name} are not in {directory} ($TORCH_HOME) and {switch} is set; "
            f"download them once from {weights.url} into that folder, or {ways_out}"
        )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as err:  # noqa: BLE001 - any failure (no network, proxy, hash) ends the same way
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise PretrainedWeightsError(
            f"ImageNet weights {path.name} are not in {directory} ($TORCH_HOME) and downloading "
            f"{weights.url} failed ({reason}); {ways_out}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def sha256_prefix(path: Path, length: int = 12) -> str:
    """The first `length` hex digits of the file's sha256 (what the run records as provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def name_hash_mismatch(record: dict) -> str | None:
    """A warning when a torch.hub-style file name's hash prefix is not the file's (not the published file)."""
    match = _HASH_IN_NAME.search(Path(record["file"]).name)
    n = min(len(match.group(1)), len(record["sha256"])) if match else 0
    if match and record["sha256"][:n] != match.group(1)[:n]:
        return (
            f"{record['file']}: sha256 {record['sha256']}... differs from the {match.group(1)} in its name "
            "(not the file torchvision publishes)"
        )
    return None
