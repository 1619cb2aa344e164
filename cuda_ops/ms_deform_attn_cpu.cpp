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
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

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

// Float vectors of kLanes lanes (GCC and Clang lower them to whatever registers the target has):
// 16 lanes (one AVX-512 register) where the build targets AVX-512 and the row holds 16n floats,
// else 8 (one AVX register, or two SSE ones).
template <int kLanes>
struct FloatLanes;
template <>
struct FloatLanes<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct FloatLanes<16> {
  typedef float type __attribute__((vector_size(64)));
};

#ifdef __AVX512F__
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif

template <int kLanes>
inline typename FloatLanes<kLanes>::type load_lanes(const float* p) {
  typename FloatLanes<kLanes>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename Vec>
inline void store_lanes(float* p, Vec v) {
  std::memcpy(p, &v, sizeof v);
}

#if defined(__AVX512F__) || defined(__AVX__)
inline void stream_lanes(float* p, FloatLanes<8>::type v) { _mm256_stream_ps(p, reinterpret_cast<__m256&>(v)); }
#endif
#ifdef __AVX512F__
inline void stream_lanes(float* p, FloatLanes<16>::type v) { _mm512_stream_ps(p, reinterpret_cast<__m512&>(v)); }
#endif

// Orders a thread's non-temporal stores before its later stores (the end of its part of a kernel).
inline void finish_streaming() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Copies n values to `dst`, with streaming stores where they apply (float, n a multiple of 8, `dst`
// aligned): for fresh outputs written at a stride, which plain stores would first read.
template <typename T>
inline void stream_values(T* dst, const T* src, int64_t n) {
#if defined(__AVX512F__) || defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    if (n % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
      for (int64_t c = 0; c < n; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
      return;
    }
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

template <int kLanes>
inline float sum_lanes(typename FloatLanes<kLanes>::type v) {
  float partial[kLanes / 2];  // pairwise: a fixed, short dependency chain
  for (int j = 0; j < kLanes / 2; ++j) partial[j] = v[j] + v[j + kLanes / 2];
  for (int width = kLanes / 4; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) partial[j] += partial[j + width];
  }
  return partial[0];
}

// The lane sums of four vectors into sums[4].
template <typename Vec>
inline void sum_lanes4(const Vec v[4], float sums[4]) {
#if defined(__AVX512F__) || defined(__AVX__)
  __m256 half[4];  // each vector's 8 (or 16 folded to 8) lanes
  for (int i = 0; i < 4; ++i) {
#ifdef __AVX512F__
    if constexpr (sizeof(Vec) == 64) {
      const __m512 w = reinterpret_cast<const __m512&>(v[i]);
      const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1));
      half[i] = _mm256_add_ps(_mm512_castps512_ps256(w), upper);
      continue;
    }
#endif
    half[i] = reinterpret_cast<const __m256&>(v[i]);
  }
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
  _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
#else
  for (int i = 0; i < 4; ++i) sums[i] = sum_lanes<sizeof(Vec) / 4>(v[i]);
#endif
}

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
// loop for any dtype and D (the compiler vectorises what it can), and below it the same on float
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
  void stream(scalar_t* out) const { store(out); }

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
  // dot_and_scatter for the four corners of a point at once.
  void dot_and_scatter4(const scalar_t* const rows[4], acc_t* const grad_rows[4], const acc_t coef[4], acc_t dot[4]) {
    for (int i = 0; i < 4; ++i) dot[i] = dot_and_scatter(rows[i], grad_rows[i], coef[i]);
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
    for (Vec& v : v_) v = Vec{};
  }
  void add(const Taps<float, float>& t) {
    for (int j = 0; j < kVectors; ++j) {
      const int c = kLanes * j;
      v_[j] += t.weight[0] * load_lanes<kLanes>(t.row[0] + c) + t.weight[1] * load_lanes<kLanes>(t.row[1] + c) +
               t.weight[2] * load_lanes<kLanes>(t.row[2] + c) + t.weight[3] * load_lanes<kLanes>(t.row[3] + c);
    }
  }
  void store(float* out) const {
    for (int j = 0; j < kVectors; ++j) store_lanes(out + kLanes * j, v_[j]);
  }
  // The same with non-temporal stores where the row is aligned for them: rows written at a stride
  // then cost no read of their cache lines (see `finish_streaming`).
  void stream(float* out) const {
#if defined(__AVX512F__) || defined(__AVX__)
    if (reinterpret_cast<uintptr_t>(out) % (4 * kLanes) == 0) {
      for (int j = 0; j < kVectors; ++j) stream_lanes(out + kLanes * j, v_[j]);
      return;
    }
#endif
    store(out);
  }

  void load(const float* grad_out) {
    for (int j = 0; j < kVectors; ++j) v_[j] = load_lanes<kLanes>(grad_out + kLanes * j);
  }
  float dot_and_scatter(const float* row, float* grad_row, float coef) {
    Vec dot = {};
    for (int j = 0; j < kVectors; ++j) {
      const int c = kLanes * j;
      dot += v_[j] * load_lanes<kLanes>(row + c);
      store_lanes(grad_row + c, load_lanes<kLanes>(grad_row + c) + coef * v_[j]);
    }
    return sum_lanes<kLanes>(dot);
  }
  // The same for the four corners of a point, whose dot products are summed across lanes together.
  void dot_and_scatter4(const float* const rows[4], float* const grad_rows[4], const float coef[4], float dot[4]) {
    Vec dots[4] = {};
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < kVectors; ++j) {
        const int c = kLanes * j;
        dots[i] += v_[j] * load_lanes<kLanes>(rows[i] + c);
        store_lanes(grad_rows[i] + c, load_lanes<kLanes>(grad_rows[i] + c) + coef[i] * v_[j]);
      }
    }
    sum_lanes4(dots, dot);
  }

 private:
  static constexpr int kLanes = kAvx512 && kD % 16 == 0 ? 16 : 8;
  static constexpr int kVectors = kD / kLanes;
  using Vec = typename FloatLanes<kLanes>::type;
  Vec v_[kVectors];
};

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

// Copies one head of value (`value_bm`: its channels of the batch's first pixel; `row`: the stride
// between pixels, M*D) into `slice` [pixels, D], each level with its zero border.
constexpr int64_t kCopyAhead = 16;  // pixels between prefetching a value row and copying it

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
        prefetch(src + (x + kCopyAhead) * row, D * sizeof(scalar_t));
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
