"""`--weights` by name: Hugging Face Hub ids resolved to a local checkpoint folder.

    resolve_weights("runs/train/exp/weights/best.pt")          -> that path (a local path always wins)
    resolve_weights("SenseTime/deformable-detr")               -> the cached snapshot folder
    resolve_weights("SenseTime/deformable-detr@refs/pr/1")     -> the snapshot of that revision

Ids are resolved with `huggingface_hub.snapshot_download` into its cache ($HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub), fetching only config.json and the weights. With
`HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) nothing touches the network: a cached snapshot is
used, and a missing one is one error line. The environment is read at each call (not when
huggingface_hub was imported), so it can change within a process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ddetr_cli.console import UserError
from ddetr_cli.model.pretrained import offline as hub_offline

# org/name[@revision]: one slash, Hub-legal names, no checkpoint suffix (a file name is not an id).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[\w-])(?:@(?P<revision>[\w./-]+))?$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".ckpt")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """'org/name[@revision]' -> (repo id, revision or None); None when `spec` is not a Hub id."""
    match = _HUB_ID.match(spec)
    if match is None or spec.lower().endswith(_FILE_SUFFIXES):
        return None
    return match.group("repo"), match.group("revision")


def resolve_weights(weights: str | os.PathLike) -> Path:
    """A local path (file or folder) as is; a Hub id -> its snapshot folder. UserError otherwise."""
    path = Path(weights)
    if path.exists():
        return path
    spec = str(weights)
    hub_id = parse_hub_id(spec)
    if hub_id is None:
        raise UserError(f"--weights: no such file or directory: {spec}")
    return Path(_snapshot(*hub_id, spec))


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _snapshot(repo_id: str, revision: str | None, spec: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"--weights {spec}: no such local path, and huggingface_hub (needed for Hub ids) is not "
            "installed: pip install huggingface_hub"
        ) from None
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    offline = hub_offline()  # the same switch as the ImageNet backbone's
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache), local_files_only=offline)
    try:
        folder = snapshot_download(allow_patterns=["*.json", "*.safetensors"], **kwargs)
        if not any(Path(folder).glob("*.safetensors")):  # an older repository: PyTorch .bin weights
            folder = snapshot_download(allow_patterns=["*.json", "*.bin"], **kwargs)
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise UserError(
            f"--weights {spec}: no such local path, not in the Hugging Face cache {cache}, and {where}; "
            "download it once online (or copy the cache), or pass a local checkpoint"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"--weights {spec}: not a local path, and the Hub lookup failed ({reason})") from None
    return folder
