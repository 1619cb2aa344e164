"""ddetr: a fast, faithful, practical Deformable DETR.

Public API (importing it is cheap; torch loads on first use):
    load_model(path, device="cpu")   official .pth, Hugging Face directory, or ddetr checkpoint
    build_model(config)              a fresh model from a DeformableDetrConfig
    DeformableDetrConfig             the paper's defaults
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddetr")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load_model", "build_model", "DeformableDetrConfig"]


def __getattr__(name):
    # Deferred so that `ddetr --help` and `ddetr --version` do not pay for importing torch.
    if name in ("load_model", "build_model", "DeformableDetrConfig"):
        from ddetr_cli import model

        return getattr(model, name)
    raise AttributeError(f"module 'ddetr_cli' has no attribute {name!r}")
