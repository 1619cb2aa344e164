// The emulated CUDA launchers, one namespace per emulated __CUDA_ARCH__ (see emulated_launchers.h).
// force_vector: use 16-byte vectors whenever D allows, even on misaligned tensors (the alignment
// check must then fail, as the GPU would fault).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#define MSDA_DECLARE_EMULATED_OPS(ns)                                                                              \
  namespace ddetr_msda::ns {                                                                                       \
  at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, \
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights, bool force_vector); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(                                                         \
      const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,                    \
      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,                                   \
      const at::Tensor& attention_weights, bool force_vector);                                                     \
  }

MSDA_DECLARE_EMULATED_OPS(sm80)
MSDA_DECLARE_EMULATED_OPS(sm90)
