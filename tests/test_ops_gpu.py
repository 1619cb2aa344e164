"""The CUDA deformable-attention kernel against the reference (and the CPU kernel): every dtype,
edge cases, batch 1..8, non-contiguous inputs, gradients, torch.compile. Run by scripts/gpu_check.sh;
skipped without a CUDA device. A CUDA device whose kernel does not build FAILS these tests."""

from __future__ import annotations

import pytest
import torch
from op_helpers import REDUCED, assert_match, edge_locations, kernel, outputs_and_grads
from op_helpers import no_forced_backend as no_forced_backend  # autouse: DDETR_MSDA unset

from ddetr_cli import ops, ops_build
from ddetr_cli.ops import ms_deform_attn, ms_deform_attn_reference
from ddetr_cli.ops_inputs import OpShape, make_inputs, standard_shapes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = OpShape("small", ((6, 7), (3, 4), (1, 1)), queries=5, batch=2, heads=2, channels=4, points=2)
# Tolerance relative to each tensor's scale, per value dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernel():
    if not ops_build.load("cuda"):
        pytest.fail(f"CUDA kernel unavailable: {ops_build.unavailable_reason('cuda')}")


def reference(value, shapes, starts, loc, attn):
    """The reference in float64 (the ground truth for every dtype), cast back to value's dtype."""
    out = ms_deform_attn_reference(value.double(), shapes, starts, loc.double(), attn.double())
    return out.to(value.dtype)


def cuda_inputs(shape, dtype, **kwargs):
    return make_inputs(shape, dtype, device="cuda", **kwargs)


def test_backend_is_cuda_for_cuda_tensors():
    ms_deform_attn(*cuda_inputs(SMALL, torch.float32))
    assert ops.backend() == "cuda"


def test_gradcheck_fp64():
    value, shapes, starts, loc, attn = cuda_inputs(SMALL, torch.float64, margin=0.3)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, lo, a: kernel(v, shapes, starts, lo, a), (value, loc, attn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [SMALL, REDUCED], ids=lambda s: s.name)
def test_matches_reference(shape, dtype):
    inputs = cuda_inputs(shape, dtype)
    assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(reference, inputs), RTOL[dtype])


@pytest.mark.parametrize("batch", range(1, 9))
def test_batch_sizes_1_to_8(batch):
    shape = OpShape("b", ((13, 21), (7, 11)), queries=37, batch=batch)
    inputs = cuda_inputs(shape, torch.float32, seed=batch)
    assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(reference, inputs), 1e-5)


@pytest.mark.parametrize("channels", [1, 3, 30, 64, 512], ids=lambda d: f"D{d}")
def test_channel_counts(channels):
    """D not a multiple of the vector width (scalar path), D wider than a warp's vectors (rounds)."""
    shape = OpShape("d", ((9, 5), (1, 1)), queries=17, batch=2, heads=3, channels=channels, points=3)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = cuda_inputs(shape, dtype)
        assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(reference, inputs), RTOL[dtype])


def test_edge_locations_borders_outside_and_1x1_levels():
    shape = OpShape("edges", ((5, 3), (1, 1), (2, 7)), queries=1, batch=1, heads=2, channels=8, points=10)
    value, shapes, starts, _, attn = cuda_inputs(shape, torch.float64)
    inputs = (value, shapes, starts, edge_locations(shape).cuda(), attn)
    assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(reference, inputs), 1e-10)


def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = cuda_inputs(REDUCED, torch.float32)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = torch.cat([loc, loc], dim=-1)[..., :2]
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    expected = outputs_and_grads(reference, (value, shapes, starts, loc, attn))
    assert_match(outputs_and_grads(kernel, (value_nc, shapes, starts, loc_nc, attn_nc)), expected, 1e-5)


def test_misaligned_value_uses_scalar_path():
    """A view starting one element into its storage cannot take 16-byte loads."""
    value, shapes, starts, loc, attn = cuda_inputs(REDUCED, torch.float32)
    storage = torch.empty(value.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(value)
    shifted.copy_(value)
    assert shifted.data_ptr() % 16 != 0
    assert_match(
        outputs_and_grads(kernel, (shifted, shapes, starts, loc, attn)),
        outputs_and_grads(reference, (value, shapes, starts, loc, attn)),
        1e-5,
    )


def test_agrees_with_cpu_kernel_on_standard_encoder_shape():
    assert ops_build.load("cpu")
    inputs = make_inputs(standard_shapes(batch=1)[0], torch.float32)
    cpu = outputs_and_grads(kernel, inputs)
    gpu = outputs_and_grads(kernel, tuple(t.cuda() for t in inputs))
    assert_match(tuple(t.cpu() for t in gpu), cpu, 1e-5)


def test_points_outside_give_zero_output_and_gradient():
    value, shapes, starts, loc, attn = cuda_inputs(SMALL, torch.float32)
    loc = torch.full_like(loc, -2.0)
    for t in outputs_and_grads(kernel, (value, shapes, starts, loc, attn)):
        assert torch.count_nonzero(t) == 0


def test_empty_query_set():
    shape = OpShape("empty", ((4, 4),), queries=0, batch=2, heads=2, channels=8, points=2)
    value, shapes, starts, loc, attn = cuda_inputs(shape, torch.float32)
    assert kernel(value, shapes, starts, loc, attn).shape == (2, 0, 16)


def test_autocast_bf16():
    value, shapes, starts, loc, attn = cuda_inputs(REDUCED, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(value, torch.eye(32, device="cuda"))
        out = ms_deform_attn(projected, shapes, starts, loc, attn)
    assert projected.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), reference(projected.float(), shapes, starts, loc, attn), rtol=2e-2, atol=2e-2
    )


def test_torch_compile_fullgraph():
    inputs = cuda_inputs(SMALL, torch.float32)
    eager = outputs_and_grads(ms_deform_attn, inputs)
    compiled = torch.compile(ms_deform_attn, fullgraph=True)
    assert_match(outputs_and_grads(compiled, inputs), eager, 1e-5)


def test_model_forward_uses_cuda_kernel(monkeypatch):
    """The model's attention goes through the kernel on a GPU and agrees with the reference."""
    from ddetr_cli.model import DeformableDetrConfig, build_model

    config = DeformableDetrConfig(num_classes=5, enc_layers=1, dec_layers=1, num_queries=10)
    model = build_model(config).cuda().eval()
    images = torch.randn(1, 3, 128, 160, device="cuda")
    with torch.no_grad():
        out = model(images, None)
        assert ops.backend() == "cuda"
        monkeypatch.setenv("DDETR_MSDA", "reference")
        expected = model(images, None)
    torch.testing.assert_close(out["pred_boxes"], expected["pred_boxes"], rtol=1e-4, atol=1e-4)
