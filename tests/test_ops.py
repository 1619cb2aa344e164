"""The compiled CPU deformable-attention kernel against the grid_sample reference, its operator
registration (autograd, fake, torch.compile), dispatch, DDETR_MSDA and the build fallback.

The first run compiles the kernel (~10-60 s) into the per-user cache; later runs reuse it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from op_helpers import REDUCED, assert_match, edge_locations, kernel, outputs_and_grads
from op_helpers import no_forced_backend as no_forced_backend  # autouse: DDETR_MSDA unset

from ddetr_cli import ops, ops_build
from ddetr_cli.console import UserError
from ddetr_cli.ops import ms_deform_attn, ms_deform_attn_reference
from ddetr_cli.ops_inputs import ENCODER_LEVELS, OpShape, make_inputs, standard_shapes
from ddetr_cli.threads import intra_op_threads

SMALL = OpShape("small", ((6, 7), (3, 4), (1, 1)), queries=5, batch=2, heads=2, channels=3, points=2)


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    """The CPU kernel must build wherever the tests run (CI has a C++ compiler): fail, never skip."""
    if not ops_build.load("cpu"):
        pytest.fail(f"CPU kernel unavailable: {ops_build.unavailable_reason('cpu')}")


def test_gradcheck_fp64_small_shapes():
    inputs = make_inputs(SMALL, torch.float64, margin=0.3)
    value, shapes, starts, loc, attn = inputs
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, lo, a: kernel(v, shapes, starts, lo, a), (value, loc, attn))


@pytest.mark.parametrize("shape", [SMALL, REDUCED], ids=lambda s: s.name)
def test_fp32_forward_backward_equal_reference(shape):
    inputs = make_inputs(shape, torch.float32)
    assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(ms_deform_attn_reference, inputs))


@pytest.mark.slow
def test_fp32_standard_encoder_shape_equals_reference():
    inputs = make_inputs(standard_shapes(batch=1)[0], torch.float32)
    assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(ms_deform_attn_reference, inputs))


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_batch_sizes(batch):
    shape = OpShape("b", ((7, 9), (4, 5)), queries=11, batch=batch, heads=4, channels=8, points=3)
    inputs = make_inputs(shape, torch.float64, seed=batch)
    assert_match(
        outputs_and_grads(kernel, inputs), outputs_and_grads(ms_deform_attn_reference, inputs), 1e-10
    )


@pytest.mark.parametrize("channels", [16, 64, 12])
@pytest.mark.parametrize("threads", [1, 3])
def test_channel_counts_and_thread_splits(channels, threads):
    """The kernels compiled for D = 16/32/64 (8-lane vectors for float) and for any D (12), with the
    backward's heads split over 1 or 3 threads (a thread's range then starts mid-batch)."""
    shape = OpShape("d", ((9, 11), (5, 6), (3, 3)), queries=37, batch=3, heads=4, channels=channels, points=3)
    inputs = make_inputs(shape, torch.float32, seed=channels)
    with intra_op_threads(threads):
        actual = outputs_and_grads(kernel, inputs)
    assert_match(actual, outputs_and_grads(ms_deform_attn_reference, inputs))


# The kernels copy value into padded head-major slices when a call gathers many corner rows per
# value row (Q * L * K >= 4 * S, the encoder) and read value in place otherwise (the decoder):
# MANY_QUERIES takes the first path (70 * 9 >= 4 * 138), FEW_QUERIES the second.
MANY_QUERIES = OpShape("many", ((9, 11), (5, 6), (3, 3)), queries=70, batch=3, heads=4, channels=32, points=3)
FEW_QUERIES = OpShape("few", ((9, 11), (5, 6), (3, 3)), queries=20, batch=3, heads=4, channels=32, points=3)


@pytest.mark.parametrize("base", [MANY_QUERIES, FEW_QUERIES], ids=lambda s: s.name)
@pytest.mark.parametrize("channels", [32, 16, 64, 12, 8])
@pytest.mark.parametrize("threads", [1, 3])
def test_both_paths_channel_counts_and_thread_splits(base, channels, threads):
    """Both paths, forward and backward, for D = 32/16/64 (16-lane rows with AVX-512), 8 (8-lane
    rows) and 12 (any D), with the tasks split over 1 or 3 threads (mid-batch, mid-head)."""
    shape = OpShape(base.name, base.levels, base.queries, base.batch, base.heads, channels, base.points)
    inputs = make_inputs(shape, torch.float32, seed=channels, margin=0.3)
    with intra_op_threads(threads):
        actual = outputs_and_grads(kernel, inputs)
    assert_match(actual, outputs_and_grads(ms_deform_attn_reference, inputs))


@pytest.mark.parametrize("locations", ["uniform", "local"])
def test_encoder_like_locations(locations):
    """REDUCED takes the padded path: uniform locations and model-like local ones (near borders too),
    forward and backward."""
    inputs = make_inputs(REDUCED, torch.float32, locations=locations)
    assert_match(outputs_and_grads(kernel, inputs), outputs_and_grads(ms_deform_attn_reference, inputs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_padded_forward_other_dtypes(dtype):
    """The padded forward with double (scalar footprints) and half-precision values (copied as they
    are, accumulated in float): equal to the reference on the same values."""
    value, shapes, starts, loc, attn = make_inputs(
        MANY_QUERIES, torch.float32 if dtype != torch.float64 else dtype
    )
    value = value.to(dtype)
    actual = kernel(value, shapes, starts, loc, attn)
    assert actual.dtype == dtype
    expected = ms_deform_attn_reference(value.to(loc.dtype), shapes, starts, loc, attn)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(actual.to(loc.dtype), expected, rtol=tolerance, atol=tolerance)


def test_pixels_in_no_level_get_zero_gradient():
    """value may hold pixels after the last level (S > sum H*W): the output ignores them and their
    gradient is exactly zero (the backward's outputs start uninitialised)."""
    value, shapes, starts, loc, attn = make_inputs(REDUCED, torch.float32)
    padded = torch.cat([value, torch.full_like(value[:, :7], float("nan"))], dim=1)
    out, grad_value, grad_loc, grad_attn = outputs_and_grads(kernel, (padded, shapes, starts, loc, attn))
    expected = outputs_and_grads(kernel, (value, shapes, starts, loc, attn))
    torch.testing.assert_close(grad_value[:, -7:], torch.zeros_like(grad_value[:, -7:]), rtol=0, atol=0)
    for a, e in zip((out, grad_value[:, :-7], grad_loc, grad_attn), expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("queries", [1, 8])
def test_edge_locations_borders_outside_and_1x1_levels(queries):
    """Points on the [0, 1] borders, exactly one pixel outside (pixel coordinate -1 or H, where only
    the derivative of a zero-weight corner survives), far outside, on a 1x1 level and odd sizes; with
    8 queries (each the same points) the kernels take the padded path (8 * 30 >= 4 * 30 pixels)."""
    shape = OpShape(
        "edges", ((5, 3), (1, 1), (2, 7)), queries=queries, batch=1, heads=2, channels=5, points=10
    )
    value, shapes, starts, _, attn = make_inputs(shape, torch.float64)
    loc = edge_locations(shape).expand(1, queries, -1, -1, -1, -1).contiguous()
    inputs = (value, shapes, starts, loc, attn)
    assert_match(
        outputs_and_grads(kernel, inputs), outputs_and_grads(ms_deform_attn_reference, inputs), 1e-10
    )


@pytest.mark.parametrize("queries", [1, 8])
def test_edge_locations_float32_forward(queries):
    """The same points in float32 (with AVX-512, 30 points = one full and one partial 16-lane
    footprint vector). The forward only: on a cell edge the location gradient jumps, and fp32
    rounding may put the reference and the kernel on either side of it."""
    shape = OpShape(
        "edges", ((5, 3), (1, 1), (2, 7)), queries=queries, batch=1, heads=2, channels=5, points=10
    )
    value, shapes, starts, _, attn = make_inputs(shape, torch.float32)
    loc = edge_locations(shape).expand(1, queries, -1, -1, -1, -1).float().contiguous()
    expected = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    torch.testing.assert_close(kernel(value, shapes, starts, loc, attn), expected, rtol=1e-5, atol=1e-6)


def test_points_outside_give_zero_output_and_gradient():
    value, shapes, starts, loc, attn = make_inputs(SMALL, torch.float64)
    loc = torch.full_like(loc, 3.0)
    out, grad_value, grad_loc, grad_attn = outputs_and_grads(kernel, (value, shapes, starts, loc, attn))
    for t in (out, grad_value, grad_loc, grad_attn):
        assert torch.count_nonzero(t) == 0


def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = make_inputs(REDUCED, torch.float32)
    # The same numbers through transposed / strided views.
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = torch.cat([loc, loc], dim=-1)[..., :2]
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    expected = outputs_and_grads(ms_deform_attn_reference, (value, shapes, starts, loc, attn))
    assert_match(outputs_and_grads(kernel, (value_nc, shapes, starts, loc_nc, attn_nc)), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_value(dtype):
    """Low-precision value, fp32 locations/weights: output in value's dtype, close to fp32 math."""
    value, shapes, starts, loc, attn = make_inputs(REDUCED, torch.float32)
    out = ms_deform_attn(value.to(dtype), shapes, starts, loc, attn)
    assert out.dtype == dtype
    expected = ms_deform_attn_reference(value.to(dtype).float(), shapes, starts, loc, attn)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    value_h = value.to(dtype).requires_grad_(True)
    (grad_value,) = torch.autograd.grad(ms_deform_attn(value_h, shapes, starts, loc, attn).sum(), value_h)
    assert grad_value.dtype == dtype


def test_autocast_keeps_value_dtype_and_casts_weights():
    value, shapes, starts, loc, attn = make_inputs(REDUCED, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(value, torch.eye(32))  # bf16 under autocast
        out = ms_deform_attn(projected, shapes, starts, loc.to(torch.bfloat16), attn)
    assert projected.dtype == out.dtype == torch.bfloat16
    assert ops.backend() == "cpu"


def test_dispatch_and_backend_names(monkeypatch):
    inputs = make_inputs(SMALL, torch.float32)
    ms_deform_attn(*inputs)
    assert ops.backend() == "cpu"
    monkeypatch.setenv("DDETR_MSDA", "reference")
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs))
    assert ops.backend() == "reference"
    monkeypatch.setenv("DDETR_MSDA", "cpu")
    ms_deform_attn(*inputs)
    assert ops.backend() == "cpu"
    monkeypatch.setenv("DDETR_MSDA", "cuda")
    with pytest.raises(ValueError, match="DDETR_MSDA=cuda cannot run on cpu tensors"):
        ms_deform_attn(*inputs)
    monkeypatch.setenv("DDETR_MSDA", "fast")
    with pytest.raises(ValueError, match="not one of reference, cpu, cuda"):
        ms_deform_attn(*inputs)


def test_failed_build_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path, caplog):
    """A compiler error must not reach the user: one warning, then the reference."""
    broken = tmp_path / "cuda_ops"
    broken.mkdir()
    real = ops_build.sources_dir()
    for name in ops_build._headers("cpu"):
        (broken / name).write_text((real / name).read_text())
    (broken / "ms_deform_attn_cpu.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(ops_build, "sources_dir", lambda: broken)
    monkeypatch.setattr(ops_build, "_state", {})
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "cache"))
    inputs = make_inputs(SMALL, torch.float32)
    with caplog.at_level(logging.WARNING, logger="ddetr"):
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert ops.backend() == "reference"
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs))
    warnings = [r for r in caplog.records if r.name == "ddetr" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cpu kernel build failed" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    monkeypatch.setenv("DDETR_MSDA", "cpu")
    with pytest.raises(RuntimeError, match="DDETR_MSDA=cpu but the cpu kernel is unavailable"):
        ms_deform_attn(*inputs)


def test_build_cache_is_reused():
    built = ops_build.build_dir("cpu")
    assert built.is_relative_to(ops_build.cache_root()) and list(built.glob("*.so"))
    assert ops_build.build("cpu") == built  # already loaded: no rebuild
    assert (ops_build.sources_dir() / "ms_deform_attn_cuda.cu").is_file()


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path))
    assert ops_build.build_dir("cpu").parent == tmp_path / "ops"
    assert ops_build.build_dir("cpu").name.startswith(torch.__version__.replace("+", "_") + "-cpu-")


def test_operator_registration_opcheck():
    """PyTorch's own checks of a custom op: schema, autograd registration, fake tensor, AOT dispatch."""
    value, shapes, starts, loc, attn = make_inputs(SMALL, torch.float32)
    ms_deform_attn(value, shapes, starts, loc, attn)
    args = (value.requires_grad_(True), shapes, starts, loc.requires_grad_(True), attn.requires_grad_(True))
    # test_aot_dispatch_dynamic is left out: slow on CPU; torch.compile is tested below instead.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_forward.default, args, test_utils=checks)


def test_torch_compile_fullgraph():
    """torch.compile traces through the op via its fake implementation (aot_eager: no codegen)."""
    inputs = make_inputs(SMALL, torch.float32)
    eager = outputs_and_grads(ms_deform_attn, inputs)
    compiled = torch.compile(ms_deform_attn, backend="aot_eager", fullgraph=True)
    assert_match(outputs_and_grads(compiled, inputs), eager)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_tracing_uses_reference_ops_only():
    """ONNX export / torch.jit.trace must record standard ops, not the custom one."""
    value, shapes, starts, loc, attn = make_inputs(SMALL, torch.float32)
    traced = torch.jit.trace(lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), (value, loc, attn))
    assert "ddetr::" not in str(traced.graph) and "grid_sampler" in str(traced.graph)
    torch.testing.assert_close(
        traced(value, loc, attn), ms_deform_attn_reference(value, shapes, starts, loc, attn)
    )


def test_torch_export_uses_reference_ops_only():
    """torch.export (and the ONNX exporter built on it) must not record the custom op."""
    value, shapes, starts, loc, attn = make_inputs(SMALL, torch.float32)

    class Attention(torch.nn.Module):
        def forward(self, v, lo, a):
            return ms_deform_attn(v, shapes, starts, lo, a)

    exported = torch.export.export(Attention(), (value, loc, attn))
    assert "ddetr" not in str(exported.graph) and "grid_sampler" in str(exported.graph)
    expected = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    torch.testing.assert_close(exported.module()(value, loc, attn), expected)


def test_bad_shapes_are_one_clear_error():
    value, shapes, starts, loc, attn = make_inputs(SMALL, torch.float32)
    with pytest.raises(RuntimeError, match="does not fit in value's S"):
        kernel(value, shapes * 2, starts, loc, attn)
    with pytest.raises(RuntimeError, match="attention_weights"):
        kernel(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="must be Float, got Double"):
        torch.ops.ddetr.ms_deform_attn_forward(value, shapes, starts, loc.double(), attn)


def test_standard_shapes_are_the_papers():
    encoder, decoder = standard_shapes(batch=2)
    assert encoder.queries == 22223 and decoder.queries == 300 and encoder.levels == ENCODER_LEVELS
    assert (encoder.heads, encoder.channels, len(encoder.levels), encoder.points, encoder.batch) == (
        8,
        32,
        4,
        4,
        2,
    )


def test_bench_op_command_writes_table_and_json(tmp_path, capsys):
    import json

    from ddetr_cli.commands.bench_op import bench_op

    out = tmp_path / "op.json"
    bench_op(
        shapes="decoder",
        batch="1",
        dtypes="float32",
        device="cpu",
        backends=None,
        warmup=0,
        repeats=1,
        backward=True,
        locations="Uniform",
        json_out=out,
    )
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"reference", "cpu"}
    assert rows["reference"]["forward_speedup"] == 1.0
    assert rows["cpu"]["forward_ms"] > 0 and rows["cpu"]["forward_backward_speedup"] > 0
    printed = capsys.readouterr().out
    assert "fwd+bwd ms" in printed and "x ref" in printed and "reference" in printed
    assert report["locations"] == "uniform" and "uniform locations" in printed


def test_bench_op_local_locations_and_bad_value():
    from ddetr_cli.commands.bench_op import bench_op_report

    report = bench_op_report(
        shapes=("decoder",), batches=(1,), dtypes=("float32",), device="cpu", repeats=1, locations="local"
    )
    assert report["locations"] == "local" and {r["backend"] for r in report["results"]} == {
        "reference",
        "cpu",
    }
    with pytest.raises(UserError, match="--locations must be uniform or local, got 'near'"):
        bench_op_report(shapes=("decoder",), batches=(1,), device="cpu", locations="near")


def test_local_locations_stay_near_their_query():
    """Each point within 4 pixels (of its level) of its query's pixel centre, queries in pixel order."""
    shape = OpShape("l", ((6, 8), (3, 4)), queries=60, batch=2, heads=2, channels=4, points=3)
    loc = make_inputs(shape, torch.float64, locations="local", avoid_cell_edges=False)[3]
    centres = (
        torch.cat(
            [
                torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
                .flip(-1)
                .reshape(-1, 2)
                for h, w in shape.levels
            ]
        ).double()
        + 0.5
    )
    sizes = torch.tensor([[8.0, 6.0], [4.0, 3.0]])  # (W, H) per level
    query_size = torch.cat([sizes[0].expand(48, 2), sizes[1].expand(12, 2)])  # each query's own level
    reference = centres / query_size  # [60, 2] normalised
    pixels = (loc - reference.view(1, 60, 1, 1, 1, 2)) * sizes.view(1, 1, 1, 2, 1, 2)
    assert pixels.abs().max() <= 4 and pixels.abs().max() > 3


def test_build_ops_report_cpu():
    from ddetr_cli.commands.build_ops import build_ops_report

    report = build_ops_report(cuda=False)
    assert report["cpu"]["ok"] and report["cpu"]["path"] == str(ops_build.build_dir("cpu"))
