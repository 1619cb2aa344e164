// The launchers of ms_deform_attn_cuda.cu, with the kernels run by the CPU emulation instead of a
// GPU. Included once per emulated architecture by arch_sm80.cpp / arch_sm90.cpp, which set
// MSDA_EMULATED_ARCH and MSDA_ARCH_NAMESPACE: the kernels header is compiled with that __CUDA_ARCH__
// (the sm_90 build takes the vector-atomic branch, as nvcc's sm_90 code does).
//
// Same steps as the CUDA launchers: the shared input checks and level validation, contiguous
// copies, the vector width / geometry / grid of ms_deform_attn_kernels.cuh, then the launch with
// checked pointers over exactly each tensor's elements.
#ifndef MSDA_EMULATED_ARCH
#error "define MSDA_EMULATED_ARCH (800 or 900) and MSDA_ARCH_NAMESPACE before including this file"
#endif

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <tuple>

#include "emulated_ops.h"
#include "ms_deform_attn_common.h"
#include "ms_deform_attn_math.h"

// From here on this translation unit is "device code" for the emulated architecture (after the
// ATen headers, which must stay host code).
#define MSDA_EMULATION 1
#define __CUDA_ARCH__ MSDA_EMULATED_ARCH
#include "cuda_emulation.h"
#include "ms_deform_attn_kernels.cuh"

namespace ddetr_msda::MSDA_ARCH_NAMESPACE {
namespace {

// A checked kernel pointer over the elements of contiguous tensor t.
template <typename T>
msda_emu::Checked<T> checked(const at::Tensor& t, const char* name) {
  return msda_emu::checked(static_cast<T*>(t.data_ptr()), t.numel(), name);
}

// The launchers' vector width, or (force_vector) the full 16-byte one whenever D allows it, to
// prove that a misaligned vector access is caught.
template <typename scalar_t>
int pick_vector_width(const Sizes& s, std::initializer_list<const void*> pointers, bool force_vector) {
  const int full = 16 / sizeof(scalar_t);
  return force_vector && s.channels % full == 0 ? full : vector_width<scalar_t>(s.channels, pointers);
}

}  // namespace

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights, bool force_vector) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn (emulated CUDA): tensors must be on the CPU");
  read_levels(spatial_shapes, level_start_index, s.spatial);
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  auto out = new_output(s, value);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_emu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = pick_vector_width<scalar_t>(s, {in.value.const_data_ptr(), out.const_data_ptr()}, force_vector);
    const Geometry g = make_geometry(s, vec);
    with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      msda_emu::launch(dim3(num_blocks(g)), dim3(kThreads), forward_kernel<scalar_t, VEC>,
                       checked<const scalar_t>(in.value, "value"),
                       checked<const int64_t>(in.spatial_shapes, "spatial_shapes"),
                       checked<const int64_t>(in.level_start_index, "level_start_index"),
                       checked<const acc_t>(in.sampling_locations, "sampling_locations"),
                       checked<const acc_t>(in.attention_weights, "attention_weights"),
                       checked<scalar_t>(out, "output"), g);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights, bool force_vector) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn (emulated CUDA): tensors must be on the CPU");
  check_grad_output(grad_output, value, s);
  read_levels(spatial_shapes, level_start_index, s.spatial);
  const auto go = grad_output.contiguous();
  const Inputs in = contiguous_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  Gradients grad = zero_gradients(in);
  if (go.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_emulated",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int vec = pick_vector_width<scalar_t>(
          s, {in.value.const_data_ptr(), go.const_data_ptr(), grad.value_acc.const_data_ptr()}, force_vector);
      const Geometry g = make_geometry(s, vec);
      with_vector_width<scalar_t>(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        msda_emu::launch(dim3(num_blocks(g)), dim3(kThreads), backward_kernel<scalar_t, VEC>,
                         checked<const scalar_t>(go, "grad_output"), checked<const scalar_t>(in.value, "value"),
                         checked<const int64_t>(in.spatial_shapes, "spatial_shapes"),
                         checked<const int64_t>(in.level_start_index, "level_start_index"),
                         checked<const acc_t>(in.sampling_locations, "sampling_locations"),
                         checked<const acc_t>(in.attention_weights, "attention_weights"),
                         checked<acc_t>(grad.value_acc, "grad_value"),
                         checked<acc_t>(grad.sampling_locations, "grad_sampling_locations"),
                         checked<acc_t>(grad.attention_weights, "grad_attention_weights"), g);
      });
    });
  }
  return {grad.value_acc.to(value.scalar_type()), grad.sampling_locations, grad.attention_weights};
}

}  // namespace ddetr_msda::MSDA_ARCH_NAMESPACE

#undef __CUDA_ARCH__
