"""The CUDA kernels, executed on the CPU: `cuda_ops/ms_deform_attn_kernels.cuh` run by the CUDA
emulation in `cuda_ops/emulation/` (every CUDA thread a fiber, warps in lockstep at each shuffle,
every memory access bounds- and alignment-checked), built for both architectures the kernels branch
on (__CUDA_ARCH__ 800: scalar atomics; 900: float2/float4 vector atomics).

Compared with the CPU kernel and with the float64 PyTorch reference, per value dtype, relative to
each tensor's scale (tests/op_helpers.assert_match):
- fp64: 1e-10 against both (the same math in the same precision, only summation order differs);
- fp32: 1e-5 against both;
- fp16: 1e-3 against the CPU kernel, 2e-3 against the reference (a one-ulp rounding difference of
  the fp16 output is ~5e-4 of an element);
- bf16: 8e-3 against the CPU kernel, 1e-2 against the reference (bf16's ulp is 2^-8 = 3.9e-3).

The first run compiles the emulation (~30 s of CPU) into the per-user cache; later runs reuse it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from op_helpers import assert_match, edge_locations
from op_helpers import no_forced_backend as no_forced_backend  # autouse: DDETR_MSDA unset

from ddetr_cli import ops_build
from ddetr_cli.ops import ms_deform_attn_reference
from ddetr_cli.ops_inputs import OpShape, make_inputs

ARCHS = (800, 900)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
RTOL_CPU = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
RTOL_REFERENCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
THREADS_PER_BLOCK = 256  # kThreads in ms_deform_attn_kernels.cuh


def small(channels: int, batch: int = 2, queries: int = 5, heads: int = 2) -> OpShape:
    """Three levels, one of them 1x1."""
    return OpShape("small", ((6, 7), (3, 4), (1, 1)), queries, batch, heads, channels, points=2)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The emulation and the CPU kernel must build wherever the tests run: fail, never skip."""
    for variant in ("emulation", "cpu"):
        if not ops_build.load(variant):
            pytest.fail(f"{variant} library unavailable: {ops_build.unavailable_reason(variant)}")


def grad_output_for(inputs) -> torch.Tensor:
    """A fixed random incoming gradient [B, Q, M*D] in value's dtype."""
    value, _, _, loc = inputs[:4]
    B, _, M, D = value.shape
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, loc.shape[1], M * D, generator=gen, dtype=torch.float64).to(value.dtype)


def emulated(inputs, arch: int, force_vector: bool = False):
    """(output, grad value, grad locations, grad weights) from the emulated CUDA kernels."""
    out = torch.ops.ddetr_emulation.forward(*inputs, arch, force_vector)
    grads = torch.ops.ddetr_emulation.backward(grad_output_for(inputs), *inputs, arch, force_vector)
    return (out, *grads)


def cpu_kernel(inputs):
    out = torch.ops.ddetr.ms_deform_attn_forward(*inputs)
    return (out, *torch.ops.ddetr.ms_deform_attn_backward(grad_output_for(inputs), *inputs))


def reference(inputs):
    """The grid_sample reference in float64 on the same (already rounded) inputs."""
    value, shapes, starts, loc, attn = (t.detach() for t in inputs)
    value, loc, attn = (t.double().requires_grad_(True) for t in (value, loc, attn))
    out = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    grads = torch.autograd.grad(out, (value, loc, attn), grad_output_for(inputs).double())
    return (out.detach(), *grads)


def check(inputs, arch: int):
    """The emulated kernels against the CPU kernel and the reference, at the dtype's tolerances."""
    dtype = inputs[0].dtype
    actual = emulated(inputs, arch)
    assert actual[0].dtype == actual[1].dtype == dtype
    assert_match(actual, cpu_kernel(inputs), RTOL_CPU[dtype])
    assert_match(actual, reference(inputs), RTOL_REFERENCE[dtype])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [32, 6], ids=["D32-vector", "D6-scalar"])
def test_matches_cpu_kernel_and_reference(channels, dtype, arch):
    check(make_inputs(small(channels), dtype), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("channels", "dtype"),
    [(256, torch.float64), (256, torch.float32), (512, torch.float16), (512, torch.bfloat16)],
    ids=["D256-fp64", "D256-fp32", "D512-fp16", "D512-bf16"],
)
def test_wide_heads_several_channel_rounds(channels, dtype, arch):
    """More channel vectors than the 32 lanes of a group: the kernels loop over rounds of them."""
    vectors = channels // (16 // dtype.itemsize)
    assert vectors > 32
    check(make_inputs(small(channels, batch=1, queries=2, heads=1), dtype), arch)


@pytest.mark.parametrize(
    ("channels", "dtype", "vector_atomics"),
    [
        (32, torch.float32, True),
        (32, torch.bfloat16, True),
        (6, torch.float32, False),
        (32, torch.float64, False),
    ],
    ids=["D32-fp32", "D32-bf16", "D6-fp32", "D32-fp64"],
)
def test_sm90_build_takes_the_vector_atomic_branch(channels, dtype, vector_atomics):
    """__CUDA_ARCH__ 900 adds grad_value with float4 atomics where the vector path holds float
    gradients (fp32, and fp16/bf16 into their fp32 buffer); 800 always with scalar ones."""
    inputs = make_inputs(small(channels), dtype)
    torch.ops.ddetr_emulation.take_counters()
    counts = {}
    for arch in ARCHS:
        torch.ops.ddetr_emulation.backward(grad_output_for(inputs), *inputs, arch)
        shuffles, scalar, float2, float4 = torch.ops.ddetr_emulation.take_counters().tolist()
        counts[arch] = {"shuffles": shuffles, "scalar": scalar, "float2": float2, "float4": float4}
    assert counts[800]["float2"] == counts[800]["float4"] == counts[900]["float2"] == 0
    assert counts[800]["shuffles"] == counts[900]["shuffles"] > 0
    if vector_atomics:
        assert counts[900]["scalar"] == 0 and counts[900]["float4"] * 4 == counts[800]["scalar"] > 0
    else:
        assert counts[900] == counts[800] and counts[800]["scalar"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_value_at_odd_offset_falls_back_to_scalar_loads(arch):
    """A value tensor 4 bytes off 16-byte alignment: the launchers must pick one channel per thread.
    Forcing 16-byte vectors anyway must fail the alignment check (a GPU would fault)."""
    value, shapes, starts, loc, attn = make_inputs(small(32), torch.float32)
    storage = torch.empty(value.numel() + 1, dtype=value.dtype)
    shifted = storage[1:].view(value.shape).copy_(value)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 == 4
    inputs = (shifted, shapes, starts, loc, attn)
    check(inputs, arch)
    with pytest.raises(RuntimeError, match="misaligned 16-byte access to value"):
        torch.ops.ddetr_emulation.forward(*inputs, arch, True)
    with pytest.raises(RuntimeError, match="misaligned 16-byte access to value"):
        torch.ops.ddetr_emulation.backward(grad_output_for(inputs), *inputs, arch, True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels", [32, 5])
def test_edge_locations_borders_outside_and_1x1_levels(channels, arch):
    """Points on the [0, 1] borders, one pixel outside, far outside, on a 1x1 level."""
    levels = ((5, 3), (1, 1), (2, 7))
    shape = OpShape("edges", levels, queries=1, batch=1, heads=2, channels=channels, points=10)
    value, shapes, starts, _, attn = make_inputs(shape, torch.float64)
    check((value, shapes, starts, edge_locations(shape), attn), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batch_sizes(batch, arch):
    check(make_inputs(small(32, batch=batch), torch.float32, seed=batch, margin=0.3), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels", [32, 6])
def test_partial_last_block_and_warp(channels, arch):
    """B*Q*M groups that fill neither the last block nor its last warp: the backward's idle lanes
    must still join their warp's shuffles (the emulation fails if a lane is missing)."""
    shape = small(channels, batch=2, queries=37, heads=3)
    threads = shape.batch * shape.queries * shape.heads * 8  # a group of 8 lanes for D = 32 or 6 (fp32)
    assert threads % THREADS_PER_BLOCK != 0 and (threads % THREADS_PER_BLOCK) % 32 != 0
    check(make_inputs(shape, torch.float32), arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_batch(arch):
    inputs = make_inputs(small(32, batch=0), torch.float32)
    value, _, _, loc, attn = inputs
    out, grad_value, grad_loc, grad_attn = emulated(inputs, arch)
    assert out.shape == (0, 5, 64)
    assert (grad_value.shape, grad_loc.shape, grad_attn.shape) == (value.shape, loc.shape, attn.shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_levels_that_do_not_fit_value_are_the_cpu_kernels_error(arch):
    """The launchers validate spatial_shapes / level_start_index on the host, with the CPU kernel's
    one-line error, before any kernel could read past `value`."""
    value, shapes, starts, loc, attn = make_inputs(small(32), torch.float32)
    grad = grad_output_for((value, shapes, starts, loc, attn))
    for bad_shapes, bad_starts in [(shapes * 2, starts), (shapes, starts + 1), (shapes, -starts - 1)]:
        bad = (value, bad_shapes, bad_starts, loc, attn)
        with pytest.raises(RuntimeError) as cpu_error:
            torch.ops.ddetr.ms_deform_attn_forward(*bad)
        message = str(cpu_error.value).splitlines()[0]
        assert f"does not fit in value's S = {value.shape[1]}" in message
        calls = [
            (torch.ops.ddetr_emulation.forward, (*bad, arch)),
            (torch.ops.ddetr_emulation.backward, (grad, *bad, arch)),
            (torch.ops.ddetr.ms_deform_attn_backward, (grad, *bad)),
        ]
        for op, args in calls:
            with pytest.raises(RuntimeError) as error:
                op(*args)
            assert str(error.value).splitlines()[0] == message


def test_shuffle_xor_follows_ptx_width_rule():
    """Lane i reads lane i ^ mask within its `width`-segment or an earlier one; a later segment
    gives the lane its own value (PTX shfl.sync.bfly)."""
    lanes = torch.arange(64, dtype=torch.float32)
    swapped = torch.ops.ddetr_emulation.shuffle_xor(lanes, 1, 32, 64)
    assert swapped.tolist() == [i ^ 1 for i in range(64)]
    # width 8, lane mask 8: lanes 0-7 would read 8-15 (a later segment): they keep their own value;
    # lanes 8-15 read 0-7 (an earlier one).
    half = torch.ops.ddetr_emulation.shuffle_xor(lanes, 8, 8, 64).tolist()
    assert half[:16] == list(range(8)) * 2 and half[32:48] == list(range(32, 40)) * 2


def test_shuffle_with_a_returned_lane_fails():
    message = r"thread \(0,0,0\): __shfl_xor_sync\(mask 0xffffffff\) but lane 5 has returned"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ddetr_emulation.shuffle_xor(torch.arange(32, dtype=torch.float32), 1, 32, 32, 5)


def test_syncthreads_is_a_block_barrier():
    """Each thread writes shared memory, passes __syncthreads, reads its mirror: correct only if
    every thread of the block wrote before any read (blocks of 64 = two warps)."""
    values = torch.arange(128, dtype=torch.float32)
    out = torch.ops.ddetr_emulation.block_reverse(values, 64)
    assert out.tolist() == list(range(63, -1, -1)) + list(range(127, 63, -1))


BROKEN_RUN = """
import sys
import torch
from ddetr_cli import ops_build
from ddetr_cli.ops_inputs import OpShape, make_inputs

ops_build.sources_dir = lambda: __import__("pathlib").Path(sys.argv[1])
ops_build.build("emulation")
shape = OpShape("edge", ((3, 4), (2, 2)), queries=1, batch=1, heads=1, channels=4, points=1)
value, shapes, starts, loc, attn = make_inputs(shape, torch.float64)
loc[..., 1, 0, :] = 0.99  # the last pixel of the last level: its successor is past value's end
for arch in (800, 900):
    try:
        torch.ops.ddetr_emulation.forward(value, shapes, starts, loc, attn, arch)
    except RuntimeError as exc:
        print(arch, str(exc).splitlines()[0])
"""


def write_if_changed(path, data: bytes) -> None:
    """Leaves an unchanged file alone, so that ninja finds the cached build up to date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def test_broken_index_in_kernel_header_fails():
    """An off-by-one in the kernels' corner index (a patched copy of the header, built in a child
    process) must be caught: reading past the end of value is an out-of-bounds error. The copy
    lives at a fixed place in the build cache, so that its build is compiled once, not every run."""
    sources = ops_build.cache_root() / "test-broken-index" / "cuda_ops"
    real = ops_build.sources_dir()
    for path in real.rglob("*"):
        if path.is_file() and path.suffix in (".h", ".cuh", ".cpp", ".cu"):
            data = path.read_bytes()
            if path.name == "ms_deform_attn_kernels.cuh":
                text = data.decode()
                assert text.count("fp.offset[i] * row") == 2  # the forward's and the backward's corner index
                data = text.replace("fp.offset[i] * row", "(fp.offset[i] + 1) * row").encode()
            write_if_changed(sources / path.relative_to(real), data)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BROKEN_RUN), str(sources)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 2, run.stdout
    for arch, line in zip(ARCHS, lines):
        assert line.startswith(f"{arch} ") and "out of bounds of value" in line
