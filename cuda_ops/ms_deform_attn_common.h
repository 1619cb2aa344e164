// Host-side pieces shared by the CPU (.cpp), CUDA (.cu) and emulated (emulation/) translation units:
// shape/dtype checks, the levels' fit in `value`, contiguous inputs and fresh outputs. Only light
// ATen headers (and the empty/zeros ops) are included, to keep the JIT build short.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <vector>

namespace ddetr_msda {

// Sizes of one call, read from the checked inputs.
struct Sizes {
  int64_t batch, spatial, heads, channels;  // value [B, S, M, D]
  int64_t queries, levels, points;          // sampling_locations [B, Q, M, L, K, 2]
};

// The accumulate dtype: float for float/half/bfloat16 values, double for double. Sampling locations
// and attention weights are taken in this dtype (ddetr_cli.ops casts them) so that low-precision
// values do not cost location precision: bf16 has 8 mantissa bits, i.e. ~0.4 px on a 167-wide map.
inline c10::ScalarType accumulate_dtype(c10::ScalarType value_dtype) {
  return value_dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [B, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [B, Q, M, L, K, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be [B, Q, M, L, K], got ",
              attention_weights.sizes());
  Sizes s{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
          sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.batch && sampling_locations.size(2) == s.heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
              sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2] with L = ", s.levels, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
              "ms_deform_attn: level_start_index must be [L], got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == c10::kLong && level_start_index.scalar_type() == c10::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const auto acc = accumulate_dtype(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == acc && attention_weights.scalar_type() == acc,
              "ms_deform_attn: for ", value.scalar_type(), " value, sampling_locations and attention_weights must be ",
              acc, ", got ", sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on ", value.device(),
                ", got one on ", t->device());
  }
  return s;
}

// The per-level geometry, read once per call from the small int64 tensors.
struct Level {
  int64_t height, width, start;
};

// The levels of spatial_shapes [L, 2] / level_start_index [L], refused unless each lies inside
// value's S pixels: the kernels (CPU, CUDA and emulated alike) index `value` with them unchecked.
// CUDA tensors are copied to the host (L * 3 integers).
inline std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                      int64_t spatial) {
  const auto shapes = spatial_shapes.cpu().contiguous();
  const auto starts = level_start_index.cpu().contiguous();
  const int64_t* sp = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  std::vector<Level> levels(shapes.size(0));
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = {sp[2 * l], sp[2 * l + 1], st[l]};
    TORCH_CHECK(levels[l].height > 0 && levels[l].width > 0 && levels[l].start >= 0 &&
                    levels[l].start + levels[l].height * levels[l].width <= spatial,
                "ms_deform_attn: level ", l, " (", levels[l].height, "x", levels[l].width, " at ", levels[l].start,
                ") does not fit in value's S = ", spatial);
  }
  return levels;
}

// The backward's incoming gradient: [B, Q, M*D] (any strides) of value's dtype and device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Sizes& s) {
  TORCH_CHECK(grad_output.numel() == s.batch * s.queries * s.heads * s.channels &&
                  grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "ms_deform_attn_backward: grad_output must be [B, Q, M*D] of value's dtype and device, got ",
              grad_output.sizes(), " ", grad_output.scalar_type());
}

// The inputs of one call, contiguous (no copy for the contiguous tensors the op normally gets).
struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
};

inline Inputs contiguous_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                const at::Tensor& attention_weights) {
  return {value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
          sampling_locations.contiguous(), attention_weights.contiguous()};
}

// The forward's output [B, Q, M*D] in value's dtype and device.
inline at::Tensor new_output(const Sizes& s, const at::Tensor& value) {
  return at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
}

// The backward's outputs, zero-filled for the kernels that scatter-add into them: grad_value in the
// accumulate dtype (fp16/bf16 gradients sum in fp32, rounded once at the end), the others as the inputs.
struct Gradients {
  at::Tensor value_acc, sampling_locations, attention_weights;
};

inline Gradients zero_gradients(const Inputs& in) {
  return {at::zeros(in.value.sizes(), in.value.options().dtype(accumulate_dtype(in.value.scalar_type()))),
          at::zeros(in.sampling_locations.sizes(), in.sampling_locations.options()),
          at::zeros(in.attention_weights.sizes(), in.attention_weights.options())};
}

}  // namespace ddetr_msda
