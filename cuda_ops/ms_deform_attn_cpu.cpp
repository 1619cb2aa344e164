// CPU kernels of multi-scale deformable attention and the operator registration.
//
// This translation unit owns the `ddetr` operator library: the schemas below are the op's
// contract, the CPU implementations live here, and the CUDA extension (ms_deform_attn_cuda.cu)
// only adds its kernels to the same ops. Autograd, the fake (meta) implementation and the
// dtype handling are registered from Python (ddetr_cli/ops.py).
//
// Layout: value [B, S, M, D] (S = all levels' pixels, row-major per level), so the D channels of
// one head at one pixel are contiguous. Both kernels are organised so the innermost loop runs
// over those D channels: it vectorises, and each corner gather reads one contiguous run.
//
// What the speed comes from (BENCHMARKS.md has the figures). Calls with many points per value
// pixel (the encoder) work head by head on a padded, head-major copy of that head's value (one per
// thread, 2.9 MB at the encoder shape: it stays in L2 for the head's scattered reads; a zero border
// makes every corner of a point near the map a plain read, and a bilinear row's two corners one
// contiguous run); with AVX-512 the footprints of 16 points are made at once; outputs written at a
// stride use streaming stores. Calls with few points per pixel (the decoder) read value in place,
// row by row in memory order, making the next row's footprints and prefetching the value rows they
// touch before the current row is processed. Float rows of 8n channels (the model's D = 32) run on
// explicit 8- or 16-lane vectors held in registers; the backward needs no atomics (a head's
// gradient belongs to one thread) and no memset passes over its outputs.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_cpu_padded.h"
#include "ms_deform_attn_cpu_rows.h"
#include "ms_deform_attn_math.h"

namespace ddetr_msda {
namespace {

// ---- Forward on value as it is (calls with few points per pixel: the decoder) ----

// The taps of the L*K points of one (batch, query, head) into `taps`, prefetching their rows;
// returns how many points touch a map (the others are left out). `value_bm`: the head's channels
// of the batch's first pixel; `row`: the stride between pixels (M*D).
template <typename scalar_t, typename acc_t>
__attribute__((flatten)) int64_t make_taps(const scalar_t* value_bm, const std::vector<Level>& levels,
                                           const acc_t* loc, const acc_t* attn, const scalar_t* zeros, int64_t row,
                                           int64_t points, int64_t row_bytes, Taps<scalar_t, acc_t>* taps) {
  int64_t n = 0;
  for (const Level& lv : levels) {
    const scalar_t* value_level = value_bm + lv.start * row;
    for (int64_t k = 0; k < points; ++k, loc += 2, ++attn) {
      Footprint<acc_t> fp;
      if (!footprint(loc[0], loc[1], lv.height, lv.width, fp)) continue;
      Taps<scalar_t, acc_t>& t = taps[n++];
      for (int i = 0; i < 4; ++i) {
        t.row[i] = fp.offset[i] >= 0 ? value_level + fp.offset[i] * row : zeros;
        t.weight[i] = fp.weight[i] * *attn;
        prefetch(t.row[i], row_bytes);
      }
    }
  }
  return n;
}

template <typename scalar_t, int kD>
void forward_direct(const at::Tensor& value, const std::vector<Level>& levels, const at::Tensor& locations,
                    const at::Tensor& weights, at::Tensor& out, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value_ptr = value.const_data_ptr<scalar_t>();
  const acc_t* loc_ptr = locations.const_data_ptr<acc_t>();
  const acc_t* attn_ptr = weights.const_data_ptr<acc_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const int64_t D = channel_count<kD>(s), M = s.heads, LK = s.levels * s.points;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const std::vector<scalar_t> zeros(D, scalar_t(0));

  // One task = one (batch, query) pair: all its heads' outputs are written by that task only. The
  // (batch, query, head) rows are visited in memory order, so sampling_locations and
  // attention_weights are read as one stream; the taps of the next row are made (and the value
  // rows they sample prefetched) before the current row is gathered.
  at::parallel_for(0, s.batch * s.queries, 16, [&](int64_t begin, int64_t end) {
    std::vector<Taps<scalar_t, acc_t>> current(LK), next(LK);
    auto make = [&](int64_t bqm, Taps<scalar_t, acc_t>* taps) {
      const int64_t b = bqm / (s.queries * M), m = bqm % M;
      return make_taps(value_ptr + b * s.spatial * M * D + m * D, levels, loc_ptr + 2 * bqm * LK,
                       attn_ptr + bqm * LK, zeros.data(), M * D, s.points, row_bytes, taps);
    };
    ChannelRow<scalar_t, kD> acc(D);
    int64_t count = make(begin * M, current.data());
    for (int64_t bqm = begin * M; bqm < end * M; ++bqm) {
      const int64_t next_count = bqm + 1 < end * M ? make(bqm + 1, next.data()) : 0;
      acc.zero();
      for (int64_t p = 0; p < count; ++p) acc.add(current[p]);
      acc.store(out_ptr + bqm * D);
      std::swap(current, next);
      count = next_count;
    }
  });
}

// ---- Backward ----

// The footprints of the L*K points of one (batch, query, head) into `fps` and whether each
// touches a map into `touches`, prefetching their value and grad_value rows.
template <typename scalar_t, typename acc_t>
__attribute__((flatten)) void make_footprints(const scalar_t* value_bm, const acc_t* grad_bm,
                                              const std::vector<Level>& levels, const acc_t* loc, int64_t row,
                                              int64_t points, int64_t row_bytes, Footprint<acc_t>* fps,
                                              bool* touches) {
  for (const Level& lv : levels) {
    for (int64_t k = 0; k < points; ++k, loc += 2, ++fps, ++touches) {
      *touches = footprint(loc[0], loc[1], lv.height, lv.width, *fps);
      for (int i = 0; *touches && i < 4; ++i) {
        if (fps->offset[i] < 0) continue;
        prefetch(value_bm + (lv.start + fps->offset[i]) * row, row_bytes);
        prefetch(grad_bm + (lv.start + fps->offset[i]) * row, row_bytes);
      }
    }
  }
}

// The gradients of the L*K points of one (batch, query, head), whose incoming gradient is in `g`.
// `p0`: the index of its first point in sampling_locations / attention_weights.
template <typename scalar_t, int kD, typename acc_t>
__attribute__((flatten)) void backward_query(ChannelRow<scalar_t, kD>& g, const scalar_t* value_bm, acc_t* grad_bm,
                                             const std::vector<Level>& levels, const Footprint<acc_t>* fps,
                                             const bool* touches, const acc_t* attn, acc_t* grad_loc,
                                             acc_t* grad_attn, int64_t row, int64_t points) {
  for (const Level& lv : levels) {
    for (int64_t k = 0; k < points; ++k, ++fps, ++touches, ++attn, grad_loc += 2, ++grad_attn) {
      acc_t dot[4] = {0, 0, 0, 0};
      for (int i = 0; *touches && i < 4; ++i) {
        if (fps->offset[i] < 0) continue;
        const int64_t off = (lv.start + fps->offset[i]) * row;
        dot[i] = g.dot_and_scatter(value_bm + off, grad_bm + off, fps->weight[i] * *attn);
      }
      // A point that touches no map gets zero gradients (the outputs come uninitialised).
      const PointGrad<acc_t> pg = point_grad(*fps, dot, *attn, lv.height, lv.width);
      grad_loc[0] = *touches ? pg.loc_x : acc_t(0);
      grad_loc[1] = *touches ? pg.loc_y : acc_t(0);
      *grad_attn = *touches ? pg.weight : acc_t(0);
    }
  }
}

template <typename scalar_t, int kD>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& value, const std::vector<Level>& levels,
                     const at::Tensor& locations, const at::Tensor& weights, at::Tensor& grad_value_acc,
                     at::Tensor& grad_loc, at::Tensor& grad_attn, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* value_ptr = value.const_data_ptr<scalar_t>();
  const acc_t* loc_ptr = locations.const_data_ptr<acc_t>();
  const acc_t* attn_ptr = weights.const_data_ptr<acc_t>();
  acc_t* gv_ptr = grad_value_acc.mutable_data_ptr<acc_t>();
  acc_t* gl_ptr = grad_loc.mutable_data_ptr<acc_t>();
  acc_t* ga_ptr = grad_attn.mutable_data_ptr<acc_t>();
  const int64_t D = channel_count<kD>(s), M = s.heads, LK = s.levels * s.points, row = M * D;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t)), acc_size = sizeof(acc_t);
  constexpr int64_t kInputsAhead = 8;  // queries between prefetching a query's inputs and reading them

  // Tasks are (batch, head) pairs, and each thread takes a contiguous range of them: the grad_value
  // rows a head scatters into (its channels of every pixel) belong to that head alone, so there
  // are no races and no atomics, and all heads have the same Q*L*K points. A thread zeroes its
  // rows first (grad_value comes uninitialised): in parallel, and they are then in cache. It then
  // visits its (query, head) rows in memory order, so the per-query inputs are read as streams,
  // making the footprints of the next row (and prefetching its rows) before the current one.
  at::parallel_for(0, s.batch * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<Footprint<acc_t>> fps(2 * LK);  // footprints of the current and the next row
    std::unique_ptr<bool[]> touches(new bool[2 * LK]);
    ChannelRow<scalar_t, kD> g(D);
    for (int64_t b = begin / M; b <= (end - 1) / M; ++b) {
      const int64_t m_begin = std::max(begin - b * M, int64_t(0)), m_end = std::min(end - b * M, M);
      const int64_t heads = m_end - m_begin;
      const scalar_t* value_b = value_ptr + b * s.spatial * row;
      acc_t* grad_b = gv_ptr + b * s.spatial * row;
      for (int64_t pixel = 0; pixel < s.spatial; ++pixel) {
        std::fill(grad_b + pixel * row + m_begin * D, grad_b + pixel * row + m_end * D, acc_t(0));
      }
      // Row r of this batch's walk is (query r / heads, head m_begin + r % heads).
      auto bqm_of = [&](int64_t r) { return (b * s.queries + r / heads) * M + m_begin + r % heads; };
      auto make = [&](int64_t r) {
        const int64_t bqm = bqm_of(r), m = bqm % M, slot = (r & 1) * LK;
        if (r + kInputsAhead * heads < s.queries * heads) {
          const int64_t ahead = bqm + kInputsAhead * M;
          prefetch(loc_ptr + 2 * ahead * LK, 2 * LK * acc_size);
          prefetch(attn_ptr + ahead * LK, LK * acc_size);
          prefetch(g_ptr + ahead * D, row_bytes);
          prefetch(gl_ptr + 2 * ahead * LK, 2 * LK * acc_size);
          prefetch(ga_ptr + ahead * LK, LK * acc_size);
        }
        make_footprints(value_b + m * D, grad_b + m * D, levels, loc_ptr + 2 * bqm * LK, row, s.points, row_bytes,
                        &fps[slot], &touches[slot]);
      };
      if (s.queries > 0) make(0);
      for (int64_t r = 0; r < s.queries * heads; ++r) {
        if (r + 1 < s.queries * heads) make(r + 1);
        const int64_t bqm = bqm_of(r), m = bqm % M, slot = (r & 1) * LK;
        g.load(g_ptr + bqm * D);
        backward_query(g, value_b + m * D, grad_b + m * D, levels, &fps[slot], &touches[slot], attn_ptr + bqm * LK,
                       gl_ptr + 2 * bqm * LK, ga_ptr + bqm * LK, row, s.points);
      }
    }
  });
}

// Runs `kernel(std::integral_constant<int, kD>)` with kD = D for the common head sizes (compiled
// for that D), else with kD = 0 (any D).
template <typename Fn>
void with_channels(int64_t channels, Fn&& kernel) {
  switch (channels) {
    case 32: return kernel(std::integral_constant<int, 32>());
    case 64: return kernel(std::integral_constant<int, 64>());
    case 16: return kernel(std::integral_constant<int, 16>());
    default: return kernel(std::integral_constant<int, 0>());
  }
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto levels = read_levels(spatial_shapes, level_start_index, s.spatial);
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  auto out = new_output(s, value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    with_channels(s.channels, [&](auto kD) {
      if (worth_padding(s, levels)) {
        forward_padded<scalar_t, kD>(v, levels, loc, attn, out, s);
      } else {
        forward_direct<scalar_t, kD>(v, levels, loc, attn, out, s);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& value,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_locations,
                                                            const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, s);
  const auto levels = read_levels(spatial_shapes, level_start_index, s.spatial);
  const auto go = grad_output.contiguous();
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const auto acc_dtype = accumulate_dtype(value.scalar_type());
  // Low-precision values accumulate their gradient in float and are rounded once at the end. The
  // kernel writes every element of the three (zeroing grad_value as it goes): no memset first.
  auto grad_value_acc = at::empty(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    with_channels(s.channels, [&](auto kD) {
      if (worth_padding(s, levels)) {
        backward_padded<scalar_t, kD>(go, v, levels, loc, attn, grad_value_acc, grad_loc, grad_attn, s);
      } else {
        backward_kernel<scalar_t, kD>(go, v, levels, loc, attn, grad_value_acc, grad_loc, grad_attn, s);
      }
    });
  });
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};  // no copy when the dtypes match
}

}  // namespace
}  // namespace ddetr_msda

TORCH_LIBRARY(ddetr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ddetr_msda::forward_cpu);
  m.impl("ms_deform_attn_backward", &ddetr_msda::backward_cpu);
}
