// CUDA kernels of multi-scale deformable attention and the host-side choices of their launch
// (vector width, group size, grid). One copy of the kernel code, compiled twice:
//   - by nvcc, included by ms_deform_attn_cuda.cu (the launchers, registered as the ddetr ops' CUDA
//     kernels), where Ptr<T> is a plain `T* __restrict__`;
//   - by the host C++ compiler, included by cuda_ops/emulation/ (MSDA_EMULATION defined), which
//     runs these very kernels on the CPU with CUDA's thread/warp semantics; there Ptr<T> is a
//     pointer that checks the bounds and alignment of every access.
// The per-point math is the shared ms_deform_attn_math.h.
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
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_math.h"

namespace ddetr_msda {
namespace {

#if defined(MSDA_EMULATION)
template <typename T>
using Ptr = msda_emu::Checked<T>;
using msda_emu::vector_cast;
#else
// A kernel's pointer to global memory.
template <typename T>
using Ptr = T* __restrict__;

// p seen as a pointer to U (a Pack or a CUDA vector type): U's alignment is the caller's promise.
template <typename U, typename T>
__device__ __forceinline__ U* vector_cast(T* p) {
  return reinterpret_cast<U*>(p);
}
#endif

constexpr int kThreads = 256;

// VEC consecutive elements moved with one aligned load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename scalar_t, int VEC, typename P>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(P p) {
  return *vector_cast<const Pack<scalar_t, VEC>>(p);
}

template <typename scalar_t, int VEC, typename P>
__device__ __forceinline__ void store_pack(P p, const Pack<scalar_t, VEC>& pack) {
  *vector_cast<Pack<scalar_t, VEC>>(p) = pack;
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
template <typename acc_t, int VEC, typename P>
__device__ __forceinline__ void atomic_add_vec(P p, const acc_t (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool vector_atomics = std::is_same_v<acc_t, float> && VEC % 2 == 0;
#else
  constexpr bool vector_atomics = false;
#endif
  if constexpr (vector_atomics && VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(vector_cast<float4>(p + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
  } else if constexpr (vector_atomics) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) atomicAdd(vector_cast<float2>(p + j), make_float2(v[j], v[j + 1]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, v[j]);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Ptr<const scalar_t> value, Ptr<const int64_t> spatial_shapes, Ptr<const int64_t> level_start_index,
                   Ptr<const at::opmath_type<scalar_t>> locations, Ptr<const at::opmath_type<scalar_t>> weights,
                   Ptr<scalar_t> out, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(thread & (g.group - 1));
  const int64_t bqm = thread / g.group;
  if (bqm >= g.batch * g.queries * g.heads) return;  // no shuffles in the forward: leaving early is safe
  const int64_t m = bqm % g.heads;
  const int64_t b = bqm / (g.heads * g.queries);
  const int64_t row = g.heads * g.channels;  // stride between two pixels of value
  const auto value_bm = value + b * g.spatial * row + m * g.channels;

  // Usually one iteration (D <= 32 * VEC); wider heads loop over further channel vectors.
  for (int vec = lane; vec < g.vectors; vec += g.group) {
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
    const auto value_vec = value_bm + vec * VEC;
    for (int l = 0; l < g.levels; ++l) {
      const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
      const auto value_level = value_vec + level_start_index[l] * row;
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
    store_pack<scalar_t, VEC>(out + bqm * g.channels + vec * VEC, res);
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
    backward_kernel(Ptr<const scalar_t> grad_out, Ptr<const scalar_t> value, Ptr<const int64_t> spatial_shapes,
                    Ptr<const int64_t> level_start_index, Ptr<const at::opmath_type<scalar_t>> locations,
                    Ptr<const at::opmath_type<scalar_t>> weights, Ptr<at::opmath_type<scalar_t>> grad_value,
                    Ptr<at::opmath_type<scalar_t>> grad_loc, Ptr<at::opmath_type<scalar_t>> grad_attn, Geometry g) {
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

// Calls launch(std::integral_constant<int, VEC>{}) for the runtime width vec (1 or the full 16 bytes).
template <typename scalar_t, typename F>
void with_vector_width(int vec, F&& launch) {
  if (vec == 1) {
    launch(std::integral_constant<int, 1>{});
  } else {
    launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  }
}

inline Geometry make_geometry(const Sizes& s, int vec) {
  Geometry g{s.batch, s.spatial, s.heads, s.channels, s.queries, static_cast<int>(s.levels),
             static_cast<int>(s.points), static_cast<int>(s.channels / vec), 1};
  while (g.group < g.vectors && g.group < 32) g.group *= 2;
  return g;
}

inline int64_t num_blocks(const Geometry& g) {
  const int64_t threads = g.batch * g.queries * g.heads * g.group;
  return (threads + kThreads - 1) / kThreads;
}

}  // namespace
}  // namespace ddetr_msda
