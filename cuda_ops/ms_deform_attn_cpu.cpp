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
// What the speed comes from (BENCHMARKS.md has the figures): the (batch, query, head) rows are
// walked in memory order, so the per-query inputs are read as streams; the footprints of the next
// row are computed, and the value / grad_value rows they touch prefetched, before the current row
// is processed (the sampled rows are scattered, which the hardware prefetchers cannot follow);
// for float rows of 8n channels (the model's D = 32) the channel loops run on explicit 8-lane
// vectors held in registers; the backward needs no atomics (a head's grad_value rows belong to
// one thread) and no memset passes over its outputs.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_math.h"

namespace ddetr_msda {
namespace {

// ---- Rows of D channels: the innermost loops ----

// The D channels of one head as a local buffer: on the stack when D is known at compile time, on
// the heap otherwise.
template <typename T, int kD>
struct Channels {
  explicit Channels(int64_t) {}
  T* data() { return values; }
  T values[kD];
};

template <typename T>
struct Channels<T, 0> {
  explicit Channels(int64_t count) : values(count) {}
  T* data() { return values.data(); }
  std::vector<T> values;
};

// A kernel instance is compiled for one channel count kD (0: any, read at run time).
template <int kD>
inline int64_t channel_count(const Sizes& s) {
  return kD > 0 ? kD : s.channels;
}

// Eight float lanes: one AVX register (GCC and Clang lower it to whatever vectors the target has).
typedef float Float8 __attribute__((vector_size(32)));

inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, Float8 v) { std::memcpy(p, &v, sizeof v); }

inline float sum8(Float8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// Asks for the cache lines of the `bytes` bytes at `p` ahead of their use.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// One sampling point ready to gather: its four corner rows (the zero row for corners outside the
// map) and their bilinear weights multiplied by the point's attention weight.
template <typename scalar_t, typename acc_t>
struct Taps {
  const scalar_t* row[4];
  acc_t weight[4];
};

// The per-row arithmetic of both kernels, in acc_t over the D channels of one head: a portable
// loop for any dtype and D (the compiler vectorises what it can), and below it the same on Float8
// vectors kept in registers for float rows of 8n channels.
template <typename scalar_t, int kD, bool kFloat8 = (std::is_same<scalar_t, float>::value && kD > 0 && kD % 8 == 0)>
class ChannelRow {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  explicit ChannelRow(int64_t channels) : d_(channels), v_(channels) {}

  // Forward: the row is an accumulator; v += sum_i weight_i * row_i, then stored as scalar_t.
  void zero() { std::fill(v_.data(), v_.data() + d_, acc_t(0)); }
  void add(const Taps<scalar_t, acc_t>& t) {
    acc_t* __restrict v = v_.data();
    for (int64_t c = 0; c < d_; ++c) {
      v[c] += t.weight[0] * static_cast<acc_t>(t.row[0][c]) + t.weight[1] * static_cast<acc_t>(t.row[1][c]) +
              t.weight[2] * static_cast<acc_t>(t.row[2][c]) + t.weight[3] * static_cast<acc_t>(t.row[3][c]);
    }
  }
  void store(scalar_t* out) const {
    for (int64_t c = 0; c < d_; ++c) out[c] = static_cast<scalar_t>(v_.values[c]);
  }

  // Backward: the row holds the incoming gradient g of one (batch, query, head). For one corner,
  // adds coef * g to its grad_value row and returns <g, row>. The dot product keeps kLanes partial
  // sums: one running sum is a reduction the compiler may not vectorise without -ffast-math.
  void load(const scalar_t* grad_out) {
    for (int64_t c = 0; c < d_; ++c) v_.data()[c] = static_cast<acc_t>(grad_out[c]);
  }
  acc_t dot_and_scatter(const scalar_t* __restrict row, acc_t* __restrict grad_row, acc_t coef) {
    constexpr int kLanes = 8;
    const acc_t* __restrict g = v_.data();
    acc_t partial[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= d_; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        partial[j] += g[c + j] * static_cast<acc_t>(row[c + j]);
        grad_row[c + j] += coef * g[c + j];
      }
    }
    acc_t dot = 0;
    for (; c < d_; ++c) {
      dot += g[c] * static_cast<acc_t>(row[c]);
      grad_row[c] += coef * g[c];
    }
    for (int j = 0; j < kLanes; ++j) dot += partial[j];
    return dot;
  }

 private:
  int64_t d_;
  Channels<acc_t, kD> v_;
};

template <int kD>
class ChannelRow<float, kD, true> {
 public:
  explicit ChannelRow(int64_t) {}

  void zero() {
    for (Float8& v : v_) v = Float8{};
  }
  void add(const Taps<float, float>& t) {
    for (int j = 0; j < kVectors; ++j) {
      v_[j] += t.weight[0] * load8(t.row[0] + 8 * j) + t.weight[1] * load8(t.row[1] + 8 * j) +
               t.weight[2] * load8(t.row[2] + 8 * j) + t.weight[3] * load8(t.row[3] + 8 * j);
    }
  }
  void store(float* out) const {
    for (int j = 0; j < kVectors; ++j) store8(out + 8 * j, v_[j]);
  }

  void load(const float* grad_out) {
    for (int j = 0; j < kVectors; ++j) v_[j] = load8(grad_out + 8 * j);
  }
  float dot_and_scatter(const float* row, float* grad_row, float coef) {
    Float8 dot = {};
    for (int j = 0; j < kVectors; ++j) {
      dot += v_[j] * load8(row + 8 * j);
      store8(grad_row + 8 * j, load8(grad_row + 8 * j) + coef * v_[j]);
    }
    return sum8(dot);
  }

 private:
  static constexpr int kVectors = kD / 8;
  Float8 v_[kVectors];
};

// ---- Forward ----

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
void forward_kernel(const at::Tensor& value, const std::vector<Level>& levels, const at::Tensor& locations,
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
    with_channels(s.channels, [&](auto kD) { forward_kernel<scalar_t, kD>(v, levels, loc, attn, out, s); });
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
      backward_kernel<scalar_t, kD>(go, v, levels, loc, attn, grad_value_acc, grad_loc, grad_attn, s);
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
