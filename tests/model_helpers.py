"""Helpers shared by the model, loss and checkpoint tests: a tiny configuration and one-thread runs."""

from __future__ import annotations

import pytest
import torch

from ddetr_cli.model import DeformableDetrConfig

# A model small enough for many CPU forward/backward passes, yet with every part of the real one.
TINY = dict(
    backbone="tiny",
    hidden_dim=32,
    nheads=2,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=64,
    enc_n_points=2,
    dec_n_points=2,
    num_queries=12,
    num_classes=5,
)


def tiny_config(**overrides) -> DeformableDetrConfig:
    """The TINY configuration with `overrides` (any DeformableDetrConfig fields) on top."""
    return DeformableDetrConfig(**{**TINY, **overrides})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine they cost a lot.

    Autouse: a test module applies it by importing it (`from model_helpers import one_thread as
    one_thread`; the redundant alias tells ruff the import is meant)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
