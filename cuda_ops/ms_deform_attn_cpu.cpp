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
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_math.h"

namespace ddetr_msda {
namespace {

// out[c] += sum_i w[i] * row_i[c] over the D channels of one head, for the four corners at once
// (corners outside the map point at a zero row with weight 0, so the loop has no branches).
template <typename scalar_t, typename acc_t>
inline void gather4(acc_t* __restrict out, const scalar_t* __restrict r0, const scalar_t* __restrict r1,
                    const scalar_t* __restrict r2, const scalar_t* __restrict r3, const acc_t w[4], int64_t channels) {
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < channels; ++c) {
    out[c] += w0 * static_cast<acc_t>(r0[c]) + w1 * static_cast<acc_t>(r1[c]) + w2 * static_cast<acc_t>(r2[c]) +
              w3 * static_cast<acc_t>(r3[c]);
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& value, const std::vector<Level>& levels, const at::Tensor& locations,
                    const at::Tensor& weights, at::Tensor& out, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value_ptr = value.const_data_ptr<scalar_t>();
  const acc_t* loc_ptr = locations.const_data_ptr<acc_t>();
  const acc_t* attn_ptr = weights.const_data_ptr<acc_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const int64_t D = s.channels, M = s.heads, L = s.levels, K = s.points;
  const int64_t row = M * D;  // stride between two pixels of value

  // One task = one (batch, query) pair: all its heads' outputs are written by that task only.
  at::parallel_for(0, s.batch * s.queries, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / s.queries;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t bqm = bq * M + m;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const scalar_t* value_bm = value_ptr + b * s.spatial * row + m * D;
        for (int64_t l = 0; l < L; ++l) {
          const Level& lv = levels[l];
          const scalar_t* value_level = value_bm + lv.start * row;
          const int64_t p0 = point_index(bqm, l, L, K);
          for (int64_t k = 0; k < K; ++k) {
            Footprint<acc_t> fp;
            if (!footprint(loc_ptr[2 * (p0 + k)], loc_ptr[2 * (p0 + k) + 1], lv.height, lv.width, fp)) continue;
            const acc_t a = attn_ptr[p0 + k];
            const scalar_t* rows[4];
            acc_t w[4];
            for (int i = 0; i < 4; ++i) {
              rows[i] = fp.offset[i] >= 0 ? value_level + fp.offset[i] * row : zeros.data();
              w[i] = fp.weight[i] * a;
            }
            gather4(acc.data(), rows[0], rows[1], rows[2], rows[3], w, D);
          }
        }
        scalar_t* o = out_ptr + bqm * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// One point's backward over the D channels of one corner: returns <g, row> and adds coef * g to
// the corner's grad_value row. The dot product keeps kLanes partial sums: a single running sum is
// a reduction the compiler may not vectorise without -ffast-math (it would reorder float adds).
template <typename scalar_t, typename acc_t>
inline acc_t dot_and_scatter(const acc_t* __restrict g, const scalar_t* __restrict row, acc_t* __restrict grad_row,
                             acc_t coef, int64_t channels) {
  constexpr int kLanes = 8;
  acc_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      partial[j] += g[c + j] * static_cast<acc_t>(row[c + j]);
      grad_row[c + j] += coef * g[c + j];
    }
  }
  acc_t dot = 0;
  for (; c < channels; ++c) {
    dot += g[c] * static_cast<acc_t>(row[c]);
    grad_row[c] += coef * g[c];
  }
  for (int j = 0; j < kLanes; ++j) dot += partial[j];
  return dot;
}

template <typename scalar_t>
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
  const int64_t D = s.channels, M = s.heads, L = s.levels, K = s.points;
  const int64_t row = M * D;

  // One task = one (batch, head, level): the grad_value rows it scatters into (that head's channels
  // of that level's pixels) belong to it alone, so there are no races and no atomics. Every level
  // receives K points per query, so the B*M*L tasks are of equal size.
  at::parallel_for(0, s.batch * M * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % L;
      const int64_t m = (task / L) % M;
      const int64_t b = task / (L * M);
      const Level& lv = levels[l];
      const int64_t base = (b * s.spatial + lv.start) * row + m * D;
      const scalar_t* value_level = value_ptr + base;
      acc_t* grad_level = gv_ptr + base;
      for (int64_t q = 0; q < s.queries; ++q) {
        const int64_t bqm = (b * s.queries + q) * M + m;
        const scalar_t* go = g_ptr + bqm * D;
        for (int64_t c = 0; c < D; ++c) g[c] = static_cast<acc_t>(go[c]);
        const int64_t p0 = point_index(bqm, l, L, K);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t p = p0 + k;
          Footprint<acc_t> fp;
          if (!footprint(loc_ptr[2 * p], loc_ptr[2 * p + 1], lv.height, lv.width, fp)) continue;
          const acc_t a = attn_ptr[p];
          acc_t dot[4] = {0, 0, 0, 0};
          for (int i = 0; i < 4; ++i) {
            if (fp.offset[i] < 0) continue;
            const int64_t off = fp.offset[i] * row;
            dot[i] = dot_and_scatter(g.data(), value_level + off, grad_level + off, fp.weight[i] * a, D);
          }
          const PointGrad<acc_t> pg = point_grad(fp, dot, a, lv.height, lv.width);
          gl_ptr[2 * p] = pg.loc_x;
          gl_ptr[2 * p + 1] = pg.loc_y;
          ga_ptr[p] = pg.weight;
        }
      }
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto levels = read_levels(spatial_shapes, level_start_index, s.spatial);
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  auto out = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(v, levels, loc, attn, out, s); });
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
  // Low-precision values accumulate their gradient in float and are rounded once at the end.
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  // Points that touch no map are skipped by the kernel: their gradients must read as zero.
  auto grad_loc = at::zeros(loc.sizes(), loc.options());
  auto grad_attn = at::zeros(attn.sizes(), attn.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(go, v, levels, loc, attn, grad_value_acc, grad_loc, grad_attn, s);
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
