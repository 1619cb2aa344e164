// The CPU kernels' path for calls with many sampling points per value pixel (the encoder): each
// thread works head by head on a padded, head-major copy of that head's value (and, backward, of its
// gradient), sized to stay in its L2 cache. ms_deform_attn_cpu.cpp chooses between this path and
// reading value in place (`worth_padding`).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_cpu_rows.h"
#include "ms_deform_attn_math.h"

namespace ddetr_msda {

// ---- Forward on a padded, head-major copy (calls with many points per pixel: the encoder) ----

// One level of a head's padded slice: the map with a one-pixel zero border, so every corner of a
// point near the map (px in [-1, W), py in [-1, H)) lies inside the slice and no corner needs a
// test; the two corners of a bilinear row, (y, x) and (y, x + 1), are one contiguous 2*D run.
struct PaddedLevel {
  int64_t height, width;
  int64_t start;   // the level's first pixel in value
  int32_t pitch;   // pixels per padded row: width + 2
  int32_t origin;  // index of pixel (0, 0) in the slice
};

// The padded levels and the slice's size in pixels.
inline std::vector<PaddedLevel> pad_levels(const std::vector<Level>& levels, int64_t& slice_pixels) {
  std::vector<PaddedLevel> padded;
  slice_pixels = 0;
  for (const Level& lv : levels) {
    const int64_t pitch = lv.width + 2;
    padded.push_back({lv.height, lv.width, lv.start, static_cast<int32_t>(pitch),
                      static_cast<int32_t>(slice_pixels + pitch + 1)});
    slice_pixels += pitch * (lv.height + 2);
  }
  TORCH_CHECK(slice_pixels < (int64_t(1) << 31), "ms_deform_attn: levels too large (", slice_pixels, " pixels)");
  return padded;
}

constexpr int64_t kCopyAhead = 16;  // pixels between prefetching a value row and copying it

// Copies one head of value (`value_bm`: its channels of the batch's first pixel; `row`: the stride
// between pixels, M*D) into `slice` [pixels, D], each level with its zero border.
template <typename scalar_t, int kD>
void copy_head(const scalar_t* value_bm, int64_t row, int64_t D, const std::vector<PaddedLevel>& levels,
               scalar_t* slice) {
  D = kD > 0 ? kD : D;
  for (const PaddedLevel& lv : levels) {
    scalar_t* level = slice + (lv.origin - lv.pitch - 1) * D;
    std::fill(level, level + lv.pitch * D, scalar_t(0));  // the top border
    for (int64_t y = 0; y < lv.height; ++y) {
      scalar_t* dst = level + (y + 1) * lv.pitch * D;
      const scalar_t* src = value_bm + (lv.start + y * lv.width) * row;
      std::fill(dst, dst + D, scalar_t(0));
      for (int64_t x = 0; x < lv.width; ++x) {
        if (x + kCopyAhead < lv.width) prefetch(src + (x + kCopyAhead) * row, D * sizeof(scalar_t));
        std::memcpy(dst + (x + 1) * D, src + x * row, D * sizeof(scalar_t));
      }
      std::fill(dst + (lv.width + 1) * D, dst + (lv.width + 2) * D, scalar_t(0));
    }
    scalar_t* bottom = level + (lv.height + 1) * lv.pitch * D;
    std::fill(bottom, bottom + lv.pitch * D, scalar_t(0));
  }
}

// Memory owned by the calling thread and reused by its later calls (grown when too small): a fresh
// multi-megabyte buffer per call would cost more in page faults than the copy into it.
inline void* thread_scratch(size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (bytes > buffer.size) {
    std::free(buffer.data);
    buffer.size = (bytes + 63) / 64 * 64;
    buffer.data = std::aligned_alloc(64, buffer.size);
    TORCH_CHECK(buffer.data != nullptr, "ms_deform_attn: out of memory (", buffer.size, " bytes)");
  }
  return buffer.data;
}

// The sampling points of one (batch, query, head) on a padded slice, those near a map only: the
// slice indices of the top-left and bottom-left corners (each row's right corner follows it) and the
// four bilinear weights times the attention weight, ordered (top-left, top-right, bottom-left,
// bottom-right). Sized for whole 16-lane stores past the last point.
template <typename acc_t>
struct RowTaps {
  explicit RowTaps(int64_t points) : top(points + 16), bottom(points + 16) {
    for (auto& w : weight) w.resize(points + 16);
  }
  std::vector<int32_t> top, bottom;
  std::vector<acc_t> weight[4];
  int64_t count = 0;
};

// Per-point constants of the L*K points of every row, in the points' order (level-major).
template <typename acc_t>
struct PointLevels {
  PointLevels(const std::vector<PaddedLevel>& levels, int64_t points_per_level) {
    for (const PaddedLevel& lv : levels) {
      for (int64_t k = 0; k < points_per_level; ++k) {
        width.push_back(static_cast<acc_t>(lv.width));
        height.push_back(static_cast<acc_t>(lv.height));
        pitch.push_back(lv.pitch);
        origin.push_back(lv.origin);
      }
    }
    count = static_cast<int64_t>(width.size());
    width.resize(count + 16, acc_t(1));  // whole 16-lane loads past the last point
    height.resize(count + 16, acc_t(1));
    pitch.resize(count + 16, 0);
    origin.resize(count + 16, 0);
  }
  std::vector<acc_t> width, height;
  std::vector<int32_t> pitch, origin;
  int64_t count;
};

// The taps of one row from its locations `loc` [L*K, 2] and attention weights `attn` [L*K]: the
// same arithmetic as `footprint` (ms_deform_attn_math.h) on padded slices.
template <typename acc_t>
inline void make_row_taps(const PointLevels<acc_t>& pl, const acc_t* loc, const acc_t* attn, RowTaps<acc_t>& t) {
  int64_t n = 0;
  for (int64_t p = 0; p < pl.count; ++p) {
    const acc_t px = loc[2 * p] * pl.width[p] - acc_t(0.5), py = loc[2 * p + 1] * pl.height[p] - acc_t(0.5);
    if (!(py >= acc_t(-1) && px >= acc_t(-1) && py < pl.height[p] && px < pl.width[p])) continue;
    const acc_t fx = floor_(px), fy = floor_(py);
    const acc_t lx = px - fx, ly = py - fy, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    t.top[n] = pl.origin[p] + static_cast<int32_t>(fy) * pl.pitch[p] + static_cast<int32_t>(fx);
    t.bottom[n] = t.top[n] + pl.pitch[p];
    t.weight[0][n] = hy * hx * attn[p];
    t.weight[1][n] = hy * lx * attn[p];
    t.weight[2][n] = ly * hx * attn[p];
    t.weight[3][n] = ly * lx * attn[p];
    ++n;
  }
  t.count = n;
}

#ifdef __AVX512F__
// The same, 16 points at a time on AVX-512 registers; the points near a map are packed to the front
// of each output with compress.
template <>
inline void make_row_taps<float>(const PointLevels<float>& pl, const float* loc, const float* attn,
                                 RowTaps<float>& t) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  int64_t n = 0;
  for (int64_t p = 0; p < pl.count; p += 16) {
    const int64_t lanes = std::min<int64_t>(16, pl.count - p);
    const __mmask16 valid = static_cast<__mmask16>((uint32_t(1) << lanes) - 1);
    const __mmask16 first = static_cast<__mmask16>((uint32_t(1) << (2 * std::min<int64_t>(lanes, 8))) - 1);
    const __mmask16 second = static_cast<__mmask16>((uint32_t(1) << (2 * std::max<int64_t>(lanes - 8, 0))) - 1);
    const __m512 xy0 = _mm512_maskz_loadu_ps(first, loc + 2 * p), xy1 = _mm512_maskz_loadu_ps(second, loc + 2 * p + 16);
    const __m512 width = _mm512_loadu_ps(&pl.width[p]), height = _mm512_loadu_ps(&pl.height[p]);
    const __m512 px = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutex2var_ps(xy0, even, xy1), width), half);
    const __m512 py = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutex2var_ps(xy0, odd, xy1), height), half);
    __mmask16 near = _mm512_mask_cmp_ps_mask(valid, py, minus_one, _CMP_GE_OQ);
    near = _mm512_mask_cmp_ps_mask(near, px, minus_one, _CMP_GE_OQ);
    near = _mm512_mask_cmp_ps_mask(near, py, height, _CMP_LT_OQ);
    near = _mm512_mask_cmp_ps_mask(near, px, width, _CMP_LT_OQ);
    const __m512 fx = _mm512_roundscale_ps(px, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 fy = _mm512_roundscale_ps(py, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 lx = _mm512_sub_ps(px, fx), ly = _mm512_sub_ps(py, fy);
    const __m512 hx = _mm512_sub_ps(one, lx), hy = _mm512_sub_ps(one, ly);
    const __m512 a = _mm512_maskz_loadu_ps(valid, attn + p);
    const __m512i pitch = _mm512_loadu_si512(&pl.pitch[p]);
    // Far points may hold any integer here (or NaN's); compress leaves them out.
    const __m512i top = _mm512_add_epi32(
        _mm512_loadu_si512(&pl.origin[p]),
        _mm512_add_epi32(_mm512_mullo_epi32(_mm512_cvttps_epi32(fy), pitch), _mm512_cvttps_epi32(fx)));
    _mm512_storeu_si512(&t.top[n], _mm512_maskz_compress_epi32(near, top));
    _mm512_storeu_si512(&t.bottom[n], _mm512_maskz_compress_epi32(near, _mm512_add_epi32(top, pitch)));
    _mm512_storeu_ps(&t.weight[0][n], _mm512_maskz_compress_ps(near, _mm512_mul_ps(_mm512_mul_ps(hy, hx), a)));
    _mm512_storeu_ps(&t.weight[1][n], _mm512_maskz_compress_ps(near, _mm512_mul_ps(_mm512_mul_ps(hy, lx), a)));
    _mm512_storeu_ps(&t.weight[2][n], _mm512_maskz_compress_ps(near, _mm512_mul_ps(_mm512_mul_ps(ly, hx), a)));
    _mm512_storeu_ps(&t.weight[3][n], _mm512_maskz_compress_ps(near, _mm512_mul_ps(_mm512_mul_ps(ly, lx), a)));
    n += __builtin_popcount(near);
  }
  t.count = n;
}
#endif

// Queries per task of the padded forward: tasks are (batch, head, block of queries).
constexpr int64_t kQueryBlock = 256;

template <typename scalar_t, int kD>
void forward_padded(const at::Tensor& value, const std::vector<Level>& levels, const at::Tensor& locations,
                    const at::Tensor& weights, at::Tensor& out, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value_ptr = value.const_data_ptr<scalar_t>();
  const acc_t* loc_ptr = locations.const_data_ptr<acc_t>();
  const acc_t* attn_ptr = weights.const_data_ptr<acc_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const int64_t D = channel_count<kD>(s), M = s.heads, LK = s.levels * s.points, Q = s.queries;
  const int64_t acc_size = sizeof(acc_t);
  int64_t slice_pixels = 0;
  const auto padded = pad_levels(levels, slice_pixels);
  const PointLevels<acc_t> point_levels(padded, s.points);
  const int64_t blocks = (Q + kQueryBlock - 1) / kQueryBlock;
  constexpr int64_t kInputsAhead = 8;  // rows between prefetching a row's inputs and reading them

  // Each thread takes a contiguous range of (batch, head, query block) tasks, so it works head by
  // head: it copies the head's value into its padded slice (2.9 MB at the encoder shape, which then
  // stays in its L2 cache for every sample of that head), then walks the head's rows in query
  // order. Those rows lie 1 KB apart in the inputs and the output: the inputs are prefetched a few
  // rows ahead, and the output rows are written with streaming stores (a plain store would first
  // read each line). Prefetching the slice rows a row ahead, as the direct forward does, was slower
  // here: they are in L2. Each output row is written by one task.
  at::parallel_for(0, s.batch * M * blocks, 1, [&](int64_t begin, int64_t end) {
    scalar_t* slice = static_cast<scalar_t*>(thread_scratch(slice_pixels * D * sizeof(scalar_t)));
    int64_t slice_head = -1;  // the (batch, head) in `slice`
    RowTaps<acc_t> taps(LK);
    ChannelRow<scalar_t, kD> acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bm = task / blocks, b = bm / M, m = bm % M;
      const int64_t q_begin = task % blocks * kQueryBlock, q_end = std::min(q_begin + kQueryBlock, Q);
      if (bm != slice_head) {
        copy_head<scalar_t, kD>(value_ptr + b * s.spatial * M * D + m * D, M * D, D, padded, slice);
        slice_head = bm;
      }
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t bqm = (b * Q + q) * M + m;
        if (q + kInputsAhead < Q) {
          prefetch(loc_ptr + 2 * (bqm + kInputsAhead * M) * LK, 2 * LK * acc_size);
          prefetch(attn_ptr + (bqm + kInputsAhead * M) * LK, LK * acc_size);
        }
        make_row_taps(point_levels, loc_ptr + 2 * bqm * LK, attn_ptr + bqm * LK, taps);
        acc.zero();
        for (int64_t p = 0; p < taps.count; ++p) {
          Taps<scalar_t, acc_t> t;
          t.row[0] = slice + taps.top[p] * D;
          t.row[1] = t.row[0] + D;
          t.row[2] = slice + taps.bottom[p] * D;
          t.row[3] = t.row[2] + D;
          for (int i = 0; i < 4; ++i) t.weight[i] = taps.weight[i][p];
          acc.add(t);
        }
        acc.stream(out_ptr + bqm * D);
      }
    }
    finish_streaming();
  });
}

// The padded copies cost a pass over value per call; they pay when the call gathers many corner
// rows per value row (the encoder: 64 per pixel; the decoder's 300 queries: 0.2). They also need the
// levels laid end to end from pixel 0, as the model has them (a level's gradient is then written
// once, not added to another's).
inline bool worth_padding(const Sizes& s, const std::vector<Level>& levels) {
  if (levels.empty()) return false;
  int64_t next = 0;
  for (const Level& lv : levels) {
    if (lv.start != next) return false;
    next += lv.height * lv.width;
  }
  return s.queries * s.levels * s.points >= 4 * s.spatial;
}

// ---- Backward on padded, head-major copies (the encoder; see forward_padded) ----

// Writes a head's gradient slice (acc_t, padded) back to its channels of grad_value [B, S, M, D]
// (`grad_bm`: the head's channels of the batch's first pixel; `row`: M*D), borders left out: they
// hold the gradient of corners outside the maps, which has nowhere to go.
template <typename acc_t, int kD>
void store_head(const acc_t* slice, int64_t row, int64_t D, const std::vector<PaddedLevel>& levels, acc_t* grad_bm) {
  D = kD > 0 ? kD : D;
  for (const PaddedLevel& lv : levels) {
    for (int64_t y = 0; y < lv.height; ++y) {
      const acc_t* src = slice + (lv.origin + y * lv.pitch) * D;
      acc_t* dst = grad_bm + (lv.start + y * lv.width) * row;
      for (int64_t x = 0; x < lv.width; ++x) stream_values(dst + x * row, src + x * D, D);
    }
  }
}

// The gradients of the L*K points of one (batch, query, head) whose incoming gradient is in `g`,
// on the head's padded value slice and gradient slice. Every corner of a point near a map lies in
// the slices (a corner outside reads zeros: its dot product is 0, as `point_grad` expects, and its
// gradient lands in a border); far points get zero gradients.
template <typename scalar_t, int kD, typename acc_t>
__attribute__((flatten)) void backward_row(ChannelRow<scalar_t, kD>& g, const scalar_t* value_slice,
                                           acc_t* grad_slice, const std::vector<PaddedLevel>& levels,
                                           int64_t points, int64_t D, const acc_t* loc, const acc_t* attn,
                                           acc_t* grad_loc, acc_t* grad_attn) {
  D = kD > 0 ? kD : D;
  for (const PaddedLevel& lv : levels) {
    const acc_t width = static_cast<acc_t>(lv.width), height = static_cast<acc_t>(lv.height);
    for (int64_t k = 0; k < points; ++k, loc += 2, ++attn, grad_loc += 2, ++grad_attn) {
      const acc_t px = loc[0] * width - acc_t(0.5), py = loc[1] * height - acc_t(0.5);
      if (!(py >= acc_t(-1) && px >= acc_t(-1) && py < height && px < width)) {
        grad_loc[0] = grad_loc[1] = *grad_attn = acc_t(0);
        continue;
      }
      const acc_t fx = floor_(px), fy = floor_(py);
      Footprint<acc_t> fp;
      fp.lx = px - fx;
      fp.ly = py - fy;
      fp.hx = acc_t(1) - fp.lx;
      fp.hy = acc_t(1) - fp.ly;
      fp.weight[0] = fp.hy * fp.hx;
      fp.weight[1] = fp.hy * fp.lx;
      fp.weight[2] = fp.ly * fp.hx;
      fp.weight[3] = fp.ly * fp.lx;
      const int64_t top = lv.origin + static_cast<int64_t>(fy) * lv.pitch + static_cast<int64_t>(fx);
      const int64_t corner[4] = {top * D, (top + 1) * D, (top + lv.pitch) * D, (top + lv.pitch + 1) * D};
      const scalar_t* rows[4];
      acc_t* grad_rows[4];
      acc_t coef[4], dot[4];
      for (int i = 0; i < 4; ++i) {
        rows[i] = value_slice + corner[i];
        grad_rows[i] = grad_slice + corner[i];
        coef[i] = fp.weight[i] * *attn;
      }
      g.dot_and_scatter4(rows, grad_rows, coef, dot);
      const PointGrad<acc_t> pg = point_grad(fp, dot, *attn, lv.height, lv.width);
      grad_loc[0] = pg.loc_x;
      grad_loc[1] = pg.loc_y;
      *grad_attn = pg.weight;
    }
  }
}

template <typename scalar_t, int kD>
void backward_padded(const at::Tensor& grad_out, const at::Tensor& value, const std::vector<Level>& levels,
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
  int64_t slice_pixels = 0;
  const auto padded = pad_levels(levels, slice_pixels);
  const int64_t value_bytes = (slice_pixels * D * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64 * 64;
  constexpr int64_t kInputsAhead = 8;  // queries between prefetching a query's inputs and reading them

  // Tasks are (batch, head) pairs, as in backward_kernel: a head's gradient slice is its own (no
  // atomics, no reduction). A thread copies the head's value into a padded slice, zeroes a padded
  // gradient slice (together 5.8 MB at the encoder shape: mostly in its L2 cache), walks the head's
  // rows in query order, then writes the gradient slice into grad_value (which needs no memset).
  at::parallel_for(0, s.batch * M, 1, [&](int64_t begin, int64_t end) {
    char* scratch = static_cast<char*>(thread_scratch(value_bytes + slice_pixels * D * acc_size));
    scalar_t* value_slice = reinterpret_cast<scalar_t*>(scratch);
    acc_t* grad_slice = reinterpret_cast<acc_t*>(scratch + value_bytes);
    ChannelRow<scalar_t, kD> g(D);
    std::vector<acc_t> row_grad_loc(2 * LK), row_grad_attn(LK);  // a row's, streamed out when complete
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      copy_head<scalar_t, kD>(value_ptr + b * s.spatial * row + m * D, row, D, padded, value_slice);
      std::fill(grad_slice, grad_slice + slice_pixels * D, acc_t(0));
      for (int64_t q = 0; q < s.queries; ++q) {
        const int64_t bqm = (b * s.queries + q) * M + m;
        if (q + kInputsAhead < s.queries) {
          const int64_t ahead = bqm + kInputsAhead * M;
          prefetch(loc_ptr + 2 * ahead * LK, 2 * LK * acc_size);
          prefetch(attn_ptr + ahead * LK, LK * acc_size);
          prefetch(g_ptr + ahead * D, row_bytes);
        }
        g.load(g_ptr + bqm * D);
        backward_row(g, value_slice, grad_slice, padded, s.points, D, loc_ptr + 2 * bqm * LK, attn_ptr + bqm * LK,
                     row_grad_loc.data(), row_grad_attn.data());
        stream_values(gl_ptr + 2 * bqm * LK, row_grad_loc.data(), 2 * LK);
        stream_values(ga_ptr + bqm * LK, row_grad_attn.data(), LK);
      }
      acc_t* grad_bm = gv_ptr + b * s.spatial * row + m * D;
      store_head<acc_t, kD>(grad_slice, row, D, padded, grad_bm);
      const int64_t level_pixels = padded.back().start + padded.back().height * padded.back().width;
      for (int64_t pixel = level_pixels; pixel < s.spatial; ++pixel) {  // in no level: zero gradient
        std::fill(grad_bm + pixel * row, grad_bm + pixel * row + D, acc_t(0));
      }
    }
    finish_streaming();
  });
}

}  // namespace ddetr_msda
