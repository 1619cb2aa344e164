// The innermost loops of the CPU kernels (ms_deform_attn_cpu.cpp): a row of one head's D channels
// as an accumulator (forward) or an incoming gradient (backward), on float vectors held in
// registers where the row is 8n floats; streaming stores, lane sums and prefetching.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "ms_deform_attn_common.h"

namespace ddetr_msda {

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

}  // namespace ddetr_msda
