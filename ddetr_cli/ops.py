"""Multi-scale deformable attention: the one op the model's attention time goes into.

`ms_deform_attn` is the only entry point the model, the CLI and the tests call; it dispatches to
the best available backend. `ms_deform_attn_reference` is the pure-PyTorch definition
(grid_sample, align_corners=False, zero padding) every kernel is tested against.

Backends, chosen per call from the device of `value`:
- "cuda": the compiled CUDA kernel (cuda_ops/ms_deform_attn_cuda.cu) for CUDA tensors,
- "cpu": the compiled C++ kernel (cuda_ops/ms_deform_attn_cpu.cpp) for CPU tensors,
- "reference": `ms_deform_attn_reference`, when the kernel for that device cannot be built (one
  warning on the "ddetr" logger says why), for other devices, and always under ONNX export,
  `torch.export` or `torch.jit.trace` (the exported graph then holds standard ops only).
The kernels are compiled on first use (see ddetr_cli.ops_build; `ddetr build-ops` does it ahead).
`DDETR_MSDA=reference|cpu|cuda` forces a backend; forcing one that cannot run is an error.

The compiled path is a real PyTorch operator, `torch.ops.ddetr.ms_deform_attn_forward`, with
autograd and a fake implementation, so it works under autograd, AMP and `torch.compile`. Its
dtype rule: the output has value's dtype (fp32, fp16, bf16 or fp64); sampling locations and
attention weights are cast to value's accumulate dtype (fp32, or fp64 for fp64 values) so that
locations keep full precision when value is half precision.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "cpu", "cuda")
_last_backend: str | None = None
_python_parts_registered = False


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention.

    value               [B, S, M, D]   S = sum of H_l*W_l over levels
    spatial_shapes      [L, 2]         (H_l, W_l), int64
    level_start_index   [L]            offset of each level in S (unused here, kept for the signature)
    sampling_locations  [B, Q, M, L, K, 2]  (x, y) in [0, 1]
    attention_weights   [B, Q, M, L, K]
    returns             [B, Q, M*D] in value's dtype
    """
    # grid_sample wants one dtype: value's decides, as it decides the kernels' output dtype.
    sampling_locations = sampling_locations.to(value.dtype)
    attention_weights = attention_weights.to(value.dtype)
    B, _, M, D = value.shape
    _, Q, _, L, K, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    start = 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        # [B, H*W, M, D] -> [B*M, D, H, W]
        v = value[:, start : start + h * w].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        start = start + h * w
        # [B, Q, M, K, 2] -> [B*M, Q, K, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*M, D, Q, L*K] weighted by [B*M, 1, Q, L*K]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * K)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


def level_shapes(spatial_shapes: torch.Tensor) -> list:
    """spatial_shapes [L, 2] -> [(H_l, W_l)] per level: Python ints, or 0-dim tensors under tracing
    (ONNX export), where ints would be frozen into the graph and fix its image size."""
    if torch.jit.is_tracing():
        return [(hw[0], hw[1]) for hw in spatial_shapes.unbind(0)]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention on the best available backend; see the reference for shapes."""
    global _last_backend
    if _exporting():
        name = "reference"
    else:
        name = _select_backend(value.device)
    _last_backend = name
    if name == "reference":
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    return torch.ops.ddetr.ms_deform_attn_forward(
        value,
        spatial_shapes.to(device=value.device, dtype=torch.int64),
        level_start_index.to(device=value.device, dtype=torch.int64),
        sampling_locations.to(acc_dtype),
        attention_weights.to(acc_dtype),
    )


def _exporting() -> bool:
    """ONNX export, torch.export or torch.jit.trace: the graph must hold standard ops only, so that
    it runs where this package's compiled library is not loaded."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or is_exporting()


def backend() -> str:
    """Name of the backend `ms_deform_attn` uses: "cuda", "cpu" or "reference".

    After a call, the backend that call used (it depends on the tensors' device). Before any call,
    the one a call would use on the best device here (CUDA if available, else CPU); answering may
    build the kernels, which takes a minute the first time.
    """
    if _last_backend is not None:
        return _last_backend
    return _select_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def kernel_available(device_type: str) -> bool:
    """True if the compiled kernel for "cpu" or "cuda" tensors can run here (building it on first use)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    return device_type in ("cpu", "cuda") and _load_kernels(device_type)


def _select_backend(device: torch.device) -> str:
    """The backend for tensors on `device`, honouring DDETR_MSDA; builds the kernel on first use."""
    from ddetr_cli import ops_build

    forced = os.environ.get("DDETR_MSDA", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DDETR_MSDA={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "reference":
            return forced
        if forced != device.type:
            raise ValueError(f"DDETR_MSDA={forced} cannot run on {device.type} tensors")
        if not _load_kernels(forced):
            reason = ops_build.unavailable_reason(forced)
            raise RuntimeError(f"DDETR_MSDA={forced} but the {forced} kernel is unavailable: {reason}")
        return forced
    if device.type in ("cpu", "cuda") and _load_kernels(device.type):
        return device.type
    return "reference"


def _load_kernels(variant: str) -> bool:
    """Load (building if needed) the compiled kernels for `variant` and their Python registrations."""
    from ddetr_cli import ops_build

    if not ops_build.load(variant):
        return False
    _register_python_parts()
    return True


def _register_python_parts() -> None:
    """Autograd and fake (meta) implementations of the compiled operator; needs the library loaded."""
    global _python_parts_registered
    if _python_parts_registered:
        return

    @torch.library.register_fake("ddetr::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, M, D = value.shape
        return value.new_empty(B, sampling_locations.shape[1], M * D)

    @torch.library.register_fake("ddetr::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, shapes, level_start_index, sampling_locations, attention_weights):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.ddetr.ms_deform_attn_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd("ddetr::ms_deform_attn_forward", _backward, setup_context=_setup_context)
    _python_parts_registered = True
