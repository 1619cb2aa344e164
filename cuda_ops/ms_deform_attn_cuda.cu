// CUDA kernels of multi-scale deformable attention, registered into the `ddetr` operators that
// ms_deform_attn_cpu.cpp defines. The per-point math is the shared ms_deform_attn_math.h.
//
// Work decomposition (forward and backward alike): one GROUP of G adjacent threads per
// (batch, query, head). Each thread owns VEC consecutive channels (a 16-byte vector when D allows),
// so a group reads a corner's D channels as one contiguous, coalesced run: with D = 32 in fp32,
// G = 8 threads x float4 = 128 bytes = one cache line per corner. G is a power of two <= 32 so a
// group never straddles a warp, which is what lets the backward reduce across it with shuffles.
//
// Backward: every thread computes its channels' share of each point's dot products; since the
// location/weight gradients are linear in those dots (see point_grad), each thread turns its share
// into partial gradients and the group sums them with __shfl_xor_sync — no global atomics for
// sampling_locations / attention_weights, each written once by the group's first lane. Only
// grad_value, which many queries scatter into, uses atomics (into an fp32 buffer for half types).
// No im2col_step: the grid covers B*Q*M groups directly, any batch size.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_math.h"

namespace ddetr_msda {
namespace {

constexpr int kThreads = 256;

// VEC consecutive elements moved with one aligned load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

// Sizes passed by value to the kernels.
struct Geometry {
  int64_t batch, spatial, heads, channels, queries;
  int levels, points;
  int vectors;  // channel vectors per head: D / VEC
  int group;    // threads per (b, q, m): power of two <= 32, >= min(vectors, 32)
};

// Adds v to *p. On sm_90 float2/float4 vector atomics do several channels in one instruction (the
// grad_value atomics are the backward's bottleneck); elsewhere one atomic per channel.
template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_vec(acc_t* p, const acc_t (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool vector_atomics = std::is_same_v<acc_t, float> && VEC % 2 == 0;
#else
  constexpr bool vector_atomics = false;
#endif
  if constexpr (vector_atomics && VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
  } else if constexpr (vector_atomics) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) atomicAdd(reinterpret_cast<float2*>(p + j), make_float2(v[j], v[j + 1]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, v[j]);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                   const int64_t* __restrict__ level_start_index,
                   const at::opmath_type<scalar_t>* __restrict__ locations,
                   const at::opmath_type<scalar_t>* __restrict__ weights, scalar_t* __restrict__ out, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(thread & (g.group - 1));
  const int64_t bqm = thread / g.group;
  if (bqm >= g.batch * g.queries * g.heads) return;  // no shuffles in the forward: leaving early is safe
  const int64_t m = bqm % g.heads;
  const int64_t b = bqm / (g.heads * g.queries);
  const int64_t row = g.heads * g.channels;  // stride between two pixels of value
  const scalar_t* value_bm = value + b * g.spatial * row + m * g.channels;

  // Usually one iteration (D <= 32 * VEC); wider heads loop over further channel vectors.
  for (int vec = lane; vec < g.vectors; vec += g.group) {
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
    const scalar_t* value_vec = value_bm + vec * VEC;
    for (int l = 0; l < g.levels; ++l) {
      const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
      const scalar_t* value_level = value_vec + level_start_index[l] * row;
      const int64_t p0 = point_index(bqm, l, g.levels, g.points);
      for (int k = 0; k < g.points; ++k) {
        Footprint<acc_t> fp;
        if (!footprint(locations[2 * (p0 + k)], locations[2 * (p0 + k) + 1], height, width, fp)) continue;
        const acc_t a = weights[p0 + k];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (fp.offset[i] < 0) continue;
          const auto px = load_pack<scalar_t, VEC>(value_level + fp.offset[i] * row);
          const acc_t w = fp.weight[i] * a;
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += w * static_cast<acc_t>(px.v[j]);
        }
      }
    }
    Pack<scalar_t, VEC> res;
#pragma unroll
    for (int j = 0; j < VEC; ++j) res.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + bqm * g.channels + vec * VEC) = res;
  }
}

// Sum over the `group` lanes that share a (b, q, m); every lane gets the total.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, group);
  return v;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                    const at::opmath_type<scalar_t>* __restrict__ locations,
                    const at::opmath_type<scalar_t>* __restrict__ weights,
                    at::opmath_type<scalar_t>* __restrict__ grad_value, at::opmath_type<scalar_t>* __restrict__ grad_loc,
                    at::opmath_type<scalar_t>* __restrict__ grad_attn, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(thread & (g.group - 1));
  const int64_t total = g.batch * g.queries * g.heads;
  // Threads past the end must still take part in the shuffles of their warp: they run on a valid
  // row with no channels and write nothing.
  const bool active = thread / g.group < total;
  const int64_t bqm = active ? thread / g.group : 0;
  const int64_t m = bqm % g.heads;
  const int64_t b = bqm / (g.heads * g.queries);
  const int64_t row = g.heads * g.channels;
  const int64_t base = b * g.spatial * row + m * g.channels;

  // Channel vectors in rounds of `group`; the rounds are uniform across the warp (same bound).
  for (int round = 0; round < g.vectors; round += g.group) {
    const int vec = round + lane;
    const bool has_channels = active && vec < g.vectors;
    acc_t top[VEC];  // this thread's channels of grad_output
    if (has_channels) {
      const auto pg = load_pack<scalar_t, VEC>(grad_out + bqm * g.channels + vec * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) top[j] = static_cast<acc_t>(pg.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) top[j] = acc_t(0);
    }
    for (int l = 0; l < g.levels; ++l) {
      const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
      const int64_t level_base = base + level_start_index[l] * row + static_cast<int64_t>(vec) * VEC;
      const int64_t p0 = point_index(bqm, l, g.levels, g.points);
      for (int k = 0; k < g.points; ++k) {
        // No early `continue` here: lanes of other groups in this warp may need the shuffles below.
        Footprint<acc_t> fp;
        footprint(locations[2 * (p0 + k)], locations[2 * (p0 + k) + 1], height, width, fp);
        const acc_t a = weights[p0 + k];
        acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        if (has_channels) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (fp.offset[i] < 0) continue;
            const int64_t off = level_base + fp.offset[i] * row;
            const auto pv = load_pack<scalar_t, VEC>(value + off);
            const acc_t coef = fp.weight[i] * a;
            acc_t add[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              dot[i] += top[j] * static_cast<acc_t>(pv.v[j]);
              add[j] = coef * top[j];
            }
            atomic_add_vec<acc_t, VEC>(grad_value + off, add);
          }
        }
        // Partial gradients from this thread's channels, then summed over the group.
        const PointGrad<acc_t> part = point_grad(fp, dot, a, height, width);
        const acc_t gx = group_sum(part.loc_x, g.group);
        const acc_t gy = group_sum(part.loc_y, g.group);
        const acc_t gw = group_sum(part.weight, g.group);
        if (active && lane == 0) {
          // Several rounds (D > 32 * VEC) accumulate; the buffers start at zero.
          grad_loc[2 * (p0 + k)] += gx;
          grad_loc[2 * (p0 + k) + 1] += gy;
          grad_attn[p0 + k] += gw;
        }
      }
    }
  }
}

// Channels per thread: a 16-byte vector when D and every pointer allow it, else one.
template <typename scalar_t>
int vector_width(int64_t channels, std::initializer_list<const void*> pointers) {
  constexpr int full = 16 / sizeof(scalar_t);
  if (channels % full != 0) return 1;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return full;
}

Geometry make_geometry(const Sizes& s, int vec) {
  Geometry g{s.batch, s.spatial, s.heads, s.channels, s.queries, static_cast<int>(s.levels),
             static_cast<int>(s.points), static_cast<int>(s.channels / vec), 1};
  while (g.group < g.vectors && g.group < 32) g.group *= 2;
  return g;
}

int64_t num_blocks(const Geometry& g) {
  const int64_t threads = g.batch * g.queries * g.heads * g.group;
  return (threads + kThreads - 1) / kThreads;
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_forward (CUDA): value must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(value.device());
  const auto v = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  auto out = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = vector_width<scalar_t>(s.channels, {v.const_data_ptr(), out.const_data_ptr()});
    const Geometry g = make_geometry(s, vec);
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      forward_kernel<scalar_t, VEC><<<num_blocks(g), kThreads, 0, stream>>>(
          v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), g);
    };
    if (vec == 1) {
      launch(std::integral_constant<int, 1>{});
    } else {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    }
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
  const c10::cuda::CUDAGuard guard(value.device());
  const auto go = grad_output.contiguous();
  const auto v = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const auto acc_dtype = accumulate_dtype(value.scalar_type());
  // fp32 (fp64) gradients accumulate in place; fp16/bf16 ones in an fp32 buffer, rounded once at the end.
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::zeros(loc.sizes(), loc.options());
  auto grad_attn = at::zeros(attn.sizes(), attn.options());
  if (go.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // The grad_value buffer holds acc_t: its alignment follows from the same offsets as value's.
      const int vec = vector_width<scalar_t>(s.channels, {v.const_data_ptr(), go.const_data_ptr(),
                                                          grad_value_acc.const_data_ptr()});
      const Geometry g = make_geometry(s, vec);
      auto launch = [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        backward_kernel<scalar_t, VEC><<<num_blocks(g), kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(),
            grad_value_acc.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
            grad_attn.mutable_data_ptr<acc_t>(), g);
      };
      if (vec == 1) {
        launch(std::integral_constant<int, 1>{});
      } else {
        launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};  // no copy when the dtypes match
}

}  // namespace
}  // namespace ddetr_msda

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ddetr_msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &ddetr_msda::backward_cuda);
}
