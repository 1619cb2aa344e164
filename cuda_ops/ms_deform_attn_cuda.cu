// The CUDA launchers of multi-scale deformable attention, registered into the `ddetr` operators that
// ms_deform_attn_cpu.cpp defines. The kernels themselves, their work decomposition and the launch
// geometry are in ms_deform_attn_kernels.cuh, which cuda_ops/emulation/ also runs on the CPU in CI.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_kernels.cuh"

namespace ddetr_msda {
namespace {

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_forward (CUDA): value must be a CUDA tensor");
  read_levels(spatial_shapes, level_start_index, s.spatial);  // the kernel trusts them to fit `value`
  const c10::cuda::CUDAGuard guard(value.device());
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  auto out = new_output(s, value);
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = vector_width<scalar_t>(s.channels, {in.value.const_data_ptr(), out.const_data_ptr()});
    const Geometry g = make_geometry(s, vec);
    with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      forward_kernel<scalar_t, VEC><<<num_blocks(g), kThreads, 0, stream>>>(
          in.value.const_data_ptr<scalar_t>(), in.spatial_shapes.const_data_ptr<int64_t>(),
          in.level_start_index.const_data_ptr<int64_t>(), in.sampling_locations.const_data_ptr<acc_t>(),
          in.attention_weights.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), g);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_backward (CUDA): value must be a CUDA tensor");
  check_grad_output(grad_output, value, s);
  read_levels(spatial_shapes, level_start_index, s.spatial);  // the kernel trusts them to fit `value`
  const c10::cuda::CUDAGuard guard(value.device());
  const auto go = grad_output.contiguous();
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  Gradients grad = zero_gradients(in);
  if (go.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // The grad_value buffer holds acc_t: its alignment follows from the same offsets as value's.
      const int vec = vector_width<scalar_t>(
          s.channels, {in.value.const_data_ptr(), go.const_data_ptr(), grad.value_acc.const_data_ptr()});
      const Geometry g = make_geometry(s, vec);
      with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        backward_kernel<scalar_t, VEC><<<num_blocks(g), kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), in.value.const_data_ptr<scalar_t>(),
            in.spatial_shapes.const_data_ptr<int64_t>(), in.level_start_index.const_data_ptr<int64_t>(),
            in.sampling_locations.const_data_ptr<acc_t>(), in.attention_weights.const_data_ptr<acc_t>(),
            grad.value_acc.mutable_data_ptr<acc_t>(), grad.sampling_locations.mutable_data_ptr<acc_t>(),
            grad.attention_weights.mutable_data_ptr<acc_t>(), g);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // No copy when the dtypes match.
  return {grad.value_acc.to(value.scalar_type()), grad.sampling_locations, grad.attention_weights};
}

}  // namespace
}  // namespace ddetr_msda

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ddetr_msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &ddetr_msda::backward_cuda);
}
