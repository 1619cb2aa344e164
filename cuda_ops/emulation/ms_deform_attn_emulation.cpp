// The `ddetr_emulation` operator library: the CUDA kernels of ms_deform_attn_kernels.cuh run on the
// CPU through the CUDA emulation, for the tests (tests/test_cuda_emulation.py). Not a backend of the
// `ddetr` ops: nothing dispatches here; callers pick the emulated architecture (800 or 900).
//
// It also holds two tiny kernels that pin down the emulation's own semantics (shuffle widths, a lane
// missing from a shuffle, __syncthreads), so that its lockstep is tested, not assumed, and the
// counters of what the kernels did (which atomics an architecture used).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "emulated_ops.h"

#define MSDA_EMULATION 1
#include "cuda_emulation.h"

namespace ddetr_msda::emulation {
namespace {

void check_arch(int64_t arch) {
  TORCH_CHECK(arch == 800 || arch == 900, "ddetr_emulation: arch must be 800 or 900, got ", arch);
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights, int64_t arch,
                   bool force_vector) {
  check_arch(arch);
  auto op = arch == 900 ? &sm90::forward : &sm80::forward;
  return op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, force_vector);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights, int64_t arch,
                                                        bool force_vector) {
  check_arch(arch);
  auto op = arch == 900 ? &sm90::backward : &sm80::backward;
  return op(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            force_vector);
}

// --- The emulation's own semantics -------------------------------------------------------------

__global__ void shuffle_xor_kernel(msda_emu::Checked<const float> in, msda_emu::Checked<float> out, int lane_mask,
                                   int width, int exit_lane) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (static_cast<int>(threadIdx.x) == exit_lane) return;  // leaves its warp's shuffle short of a lane
  out[t] = __shfl_xor_sync(0xffffffffu, in[t], lane_mask, width);
}

// out[t] = in[t] after each thread of the block has written in[t] to shared memory and the block has
// passed a barrier, then read its mirror: without __syncthreads the early threads read stale data.
__global__ void block_reverse_kernel(msda_emu::Checked<const float> in, msda_emu::Checked<float> out) {
  __shared__ float buffer[1024];
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  buffer[threadIdx.x] = in[t];
  __syncthreads();
  out[t] = buffer[blockDim.x - 1 - threadIdx.x];
}

at::Tensor shuffle_xor(const at::Tensor& in, int64_t lane_mask, int64_t width, int64_t block, int64_t exit_lane) {
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.dim() == 1 && in.numel() % block == 0,
              "shuffle_xor: float32 [n] with n a multiple of block");
  const auto x = in.contiguous();
  auto out = at::empty_like(x);
  msda_emu::launch(dim3(x.numel() / block), dim3(block), shuffle_xor_kernel,
                   msda_emu::checked(x.const_data_ptr<float>(), x.numel(), "in"),
                   msda_emu::checked(out.mutable_data_ptr<float>(), out.numel(), "out"), static_cast<int>(lane_mask),
                   static_cast<int>(width), static_cast<int>(exit_lane));
  return out;
}

at::Tensor block_reverse(const at::Tensor& in, int64_t block) {
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.dim() == 1 && in.numel() % block == 0 && block <= 1024,
              "block_reverse: float32 [n] with n a multiple of block <= 1024");
  const auto x = in.contiguous();
  auto out = at::empty_like(x);
  msda_emu::launch(dim3(x.numel() / block), dim3(block), block_reverse_kernel,
                   msda_emu::checked(x.const_data_ptr<float>(), x.numel(), "in"),
                   msda_emu::checked(out.mutable_data_ptr<float>(), out.numel(), "out"));
  return out;
}

// [shuffles, scalar atomics, float2 atomics, float4 atomics] since the last call, then reset.
at::Tensor take_counters() {
  const msda_emu::Counters c = std::exchange(msda_emu::counters, {});
  auto out = at::empty({4}, at::kLong);
  int64_t* p = out.mutable_data_ptr<int64_t>();
  p[0] = c.shuffles;
  p[1] = c.atomics;
  p[2] = c.atomics_float2;
  p[3] = c.atomics_float4;
  return out;
}

}  // namespace
}  // namespace ddetr_msda::emulation

TORCH_LIBRARY(ddetr_emulation, m) {
  m.def(
      "forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights, int arch, bool force_vector=False) -> Tensor",
      &ddetr_msda::emulation::forward);
  m.def(
      "backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int arch, bool force_vector=False) "
      "-> (Tensor, Tensor, Tensor)",
      &ddetr_msda::emulation::backward);
  m.def("shuffle_xor(Tensor values, int lane_mask, int width, int block, int exit_lane=-1) -> Tensor",
        &ddetr_msda::emulation::shuffle_xor);
  m.def("block_reverse(Tensor values, int block) -> Tensor", &ddetr_msda::emulation::block_reverse);
  m.def("take_counters() -> Tensor", &ddetr_msda::emulation::take_counters);
}
