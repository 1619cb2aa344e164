"""Scoped intra-op thread counts: torch's setting is process-wide, so every change is given back."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def intra_op_threads(threads: int):
    """Runs the block with `threads` intra-op threads, restoring the previous count afterwards
    (also when the block raises)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
