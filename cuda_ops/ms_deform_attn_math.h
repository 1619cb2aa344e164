// Per-sample math of multi-scale deformable attention, shared by the CPU and the CUDA kernels.
//
// Everything here is about ONE sampling point on ONE feature level: where its four bilinear
// corners are, how much each weighs, and how the gradient of a projected sample flows back to the
// point's location and attention weight. The kernels around it only decide how to loop over
// (batch, query, head, level, point) and channels; keeping the math in one place means the CPU
// kernel, which CI compiles and tests on every run, exercises the very code the GPU runs.
//
// Conventions (those of torch.nn.functional.grid_sample with align_corners=False and zero padding,
// which is also the official Deformable-DETR kernel's):
//   a location (x, y) in [0, 1] maps to pixel coordinates  px = x * W - 0.5,  py = y * H - 0.5,
//   pixel (i, j) has its centre at integer coordinates, and corners outside the map read as zero.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace ddetr_msda {

MSDA_HOST_DEVICE float floor_(float v) { return floorf(v); }
MSDA_HOST_DEVICE double floor_(double v) { return floor(v); }

// The bilinear footprint of one sampling point on one level of size height x width.
// Corners are ordered (y0,x0), (y0,x1), (y1,x0), (y1,x1) with y1 = y0 + 1, x1 = x0 + 1.
template <typename acc_t>
struct Footprint {
  int32_t offset[4];  // spatial index y * width + x of each corner within the level; -1 if outside
  acc_t weight[4];    // bilinear weight of each corner; 0 for corners outside the map
  acc_t ly, lx;       // fractional position inside the cell: py - y0, px - x0
  acc_t hy, hx;       // 1 - ly, 1 - lx
};

// Fills `fp` for the point at normalised location (x, y). Returns false when no corner touches the
// map (the point then contributes nothing and receives no gradient); `fp` is still filled with
// "all corners outside" so that branch-free callers (the CUDA warp code) can use it as is.
//
// The range test keeps px == -1 (and py == -1): there the only in-map corner has weight 0 but a
// non-zero derivative, exactly as grid_sample computes it. (The official kernel tests px > -1; the
// two differ only in that measure-zero gradient.) NaN locations fail every comparison: no output.
template <typename acc_t>
MSDA_HOST_DEVICE bool footprint(acc_t x, acc_t y, int64_t height, int64_t width, Footprint<acc_t>& fp) {
  const acc_t py = y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t px = x * static_cast<acc_t>(width) - acc_t(0.5);
  const bool near_map = py >= acc_t(-1) && px >= acc_t(-1) && py < static_cast<acc_t>(height) &&
                        px < static_cast<acc_t>(width);
  if (!near_map) {
    for (int i = 0; i < 4; ++i) {
      fp.offset[i] = -1;
      fp.weight[i] = acc_t(0);
    }
    fp.ly = fp.lx = fp.hy = fp.hx = acc_t(0);
    return false;
  }
  const acc_t fy = floor_(py);
  const acc_t fx = floor_(px);
  const int32_t y0 = static_cast<int32_t>(fy);
  const int32_t x0 = static_cast<int32_t>(fx);
  fp.ly = py - fy;
  fp.lx = px - fx;
  fp.hy = acc_t(1) - fp.ly;
  fp.hx = acc_t(1) - fp.lx;

  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < height;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < width;
  const int32_t w = static_cast<int32_t>(width);
  const bool inside[4] = {y0_in && x0_in, y0_in && x1_in, y1_in && x0_in, y1_in && x1_in};
  const int32_t offset[4] = {y0 * w + x0, y0 * w + x0 + 1, (y0 + 1) * w + x0, (y0 + 1) * w + x0 + 1};
  const acc_t weight[4] = {fp.hy * fp.hx, fp.hy * fp.lx, fp.ly * fp.hx, fp.ly * fp.lx};
  for (int i = 0; i < 4; ++i) {
    fp.offset[i] = inside[i] ? offset[i] : -1;
    fp.weight[i] = inside[i] ? weight[i] : acc_t(0);
  }
  return true;
}

// Gradients of one sampling point.
template <typename acc_t>
struct PointGrad {
  acc_t loc_x;   // d loss / d sampling_locations[..., 0]
  acc_t loc_y;   // d loss / d sampling_locations[..., 1]
  acc_t weight;  // d loss / d attention_weights[...]
};

// Gradient contributions of one point, given dot[i] = <grad_output, value at corner i> over the
// channels of the head (0 for corners outside the map) and the point's attention weight.
//
// The sample is s = sum_i w_i v_i, the output receives a * s, so
//   d/da = <g, s> = sum_i w_i dot_i,
//   d/dpy = a * sum_i (dw_i/dpy) dot_i, with w = (hy hx, hy lx, ly hx, ly lx), dly/dpy = 1,
//   d/dy = d/dpy * H (because py = y H - 0.5), and likewise for x.
// The result is linear in `dot`, so callers may apply it to partial dot products (a subset of the
// channels) and sum the results afterwards — the CUDA kernel relies on this for its warp reduction.
template <typename acc_t>
MSDA_HOST_DEVICE PointGrad<acc_t> point_grad(const Footprint<acc_t>& fp, const acc_t dot[4], acc_t attn,
                                             int64_t height, int64_t width) {
  const acc_t d_py = fp.hx * (dot[2] - dot[0]) + fp.lx * (dot[3] - dot[1]);
  const acc_t d_px = fp.hy * (dot[1] - dot[0]) + fp.ly * (dot[3] - dot[2]);
  PointGrad<acc_t> g;
  g.loc_x = attn * d_px * static_cast<acc_t>(width);
  g.loc_y = attn * d_py * static_cast<acc_t>(height);
  g.weight = fp.weight[0] * dot[0] + fp.weight[1] * dot[1] + fp.weight[2] * dot[2] + fp.weight[3] * dot[3];
  return g;
}

// Flat index of the first of the point's K sampling points for (batch-query-head row bqm, level l):
// sampling_locations is [B, Q, M, L, K, 2] and attention_weights [B, Q, M, L, K], both contiguous.
MSDA_HOST_DEVICE int64_t point_index(int64_t bqm, int64_t level, int64_t num_levels, int64_t num_points) {
  return (bqm * num_levels + level) * num_points;
}

}  // namespace ddetr_msda
