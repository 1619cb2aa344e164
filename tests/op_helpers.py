"""Helpers shared by the kernel tests of the CPU (tests/test_ops.py) and CUDA (tests/test_ops_gpu.py)
deformable attention: the operator called directly, outputs and gradients, and the comparison.

A plain module, not conftest.py: scripts/gpu_check.sh runs the op tests with --noconftest.
"""

from __future__ import annotations

import pytest
import torch

from ddetr_cli.ops import ms_deform_attn
from ddetr_cli.ops_inputs import OpShape

# The encoder's structure (4 levels, M=8, D=32, K=4) on a 160x267 input instead of 800x1333.
REDUCED = OpShape("reduced", ((20, 34), (10, 17), (5, 9), (3, 5)), queries=300, batch=2)


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    """The automatic backend choice, whatever DDETR_MSDA says outside the tests. Autouse: a test
    module applies it by importing it (`from op_helpers import no_forced_backend as no_forced_backend`)."""
    monkeypatch.delenv("DDETR_MSDA", raising=False)


def kernel(*inputs):
    """The compiled operator called directly (no dispatch)."""
    ms_deform_attn(*inputs)  # registers autograd/fake on first use
    return torch.ops.ddetr.ms_deform_attn_forward(*inputs)


def outputs_and_grads(fn, inputs, seed=1):
    """fn's output and the gradients of <output, random grad> w.r.t. value, locations, weights."""
    value, shapes, starts, loc, attn = (t.detach() for t in inputs)  # keeps strides and offsets
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (value, loc, attn), grad_out)
    return (out.detach(), *grads)


def assert_match(actual, expected, rtol=1e-5):
    """Equal to `rtol` relative to each tensor's scale (grad of locations is ~W times larger)."""
    for a, e, name in zip(actual, expected, ("output", "grad value", "grad locations", "grad weights")):
        a, e = a.double(), e.double()
        scale = e.abs().max().item() or 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


def edge_locations(shape: OpShape) -> torch.Tensor:
    """[1, 1, M, L, 10, 2] float64 sampling locations for a one-query `shape`: points on the [0, 1]
    borders, exactly one pixel outside (pixel coordinate -1 or H, where only the derivative of a
    zero-weight corner survives) and far outside, the same for every head."""
    per_level = []
    for h, w in shape.levels:
        xs = [0.0, 1.0, -0.5 / w, 1 + 0.5 / w, -3.0, 5.0, 0.5, 1.0, 0.0, 0.25]
        ys = [0.0, 1.0, 0.5, 0.5, 0.5, 0.5, -0.5 / h, 1 + 0.5 / h, 1.0, -2.0]
        per_level.append(torch.tensor([xs, ys], dtype=torch.float64).T)  # [K, 2]
    levels, points = len(per_level), len(per_level[0])
    loc = torch.stack(per_level).view(1, 1, 1, levels, points, 2)
    return loc.expand(1, 1, shape.heads, levels, points, 2).contiguous()
