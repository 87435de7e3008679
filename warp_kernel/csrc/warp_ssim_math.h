// Per-pixel maths of the fused flow-warp + SSIM ops, shared by the C++ (CPU) and CUDA paths so
// that the CPU tests exercise the arithmetic the GPU runs. Plain C++: g++ compiles it without any
// CUDA header, nvcc compiles every function for both host and device.
//
// Conventions (identical to F.grid_sample(mode="bilinear", align_corners=True)):
//   a sample coordinate is in pixels, x in [0, W - 1] inside the image; the warp samples
//   img at (x + flow_x, y + flow_y); "border" clamps, "reflection" mirrors about the pixel
//   centres 0 and W - 1 and then clamps. Where a coordinate is clamped its gradient is 0.
// SSIM (Wang et al. 2004, scikit-image gaussian_weights=True, sigma=1.5,
// use_sample_covariance=False): an 11-tap Gaussian window, the 'valid' region only.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define WK_HD __host__ __device__ __forceinline__
#else
#define WK_HD inline
#endif

// exp(-k^2 / (2 * 1.5^2)) for k = -5..5, normalised to sum 1 (computed in float64; the
// tests compare these literals with the formula).
#define WARP_KERNEL_GAUSS_TAPS                                                          \
  0.00102838008447911, 0.007598758135239185, 0.03600077212843083, 0.10936068950970002, \
      0.2130055377112537, 0.26601172486179436, 0.2130055377112537, 0.10936068950970002, \
      0.03600077212843083, 0.007598758135239185, 0.00102838008447911

namespace warp_kernel {

constexpr int kRadius = 5;                // Gaussian window radius; also the tile halo
constexpr int kTaps = 2 * kRadius + 1;    // 11
constexpr int kMinSize = kTaps;           // SSIM needs at least one full window
constexpr int kBorder = 0;                // padding codes, same order as in Python
constexpr int kReflection = 1;

WK_HD float wk_floor(float v) { return floorf(v); }
WK_HD double wk_floor(double v) { return floor(v); }

// ---------------------------------------------------------------------------------------------
// Bilinear sampling with padding
// ---------------------------------------------------------------------------------------------

// Clamp a coordinate to [0, size - 1]; *d_coord = d(result)/d(coord), 0 on (and beyond) the
// border as in ATen's clip_coordinates_set_grad. NaN maps to 0, so indices stay in range.
// Branch-free (selects only), so loops over a row of pixels vectorise.
template <typename T>
WK_HD T clip_coordinate(T coord, int size, T* d_coord) {
  const T hi = T(size - 1);
  const T lo = coord > T(0) ? coord : T(0);
  const T clipped = lo < hi ? lo : hi;
  *d_coord = T(clipped > T(0)) * T(clipped < hi);  // 1 strictly inside, else 0
  return clipped;
}

// Mirror a coordinate about the pixel centres 0 and size - 1 (align_corners=True), as ATen's
// reflect_coordinates_set_grad; a - floor(a / span) * span stands in for fmod(a, span).
// Non-finite input gives NaN, which the clip that follows maps to 0.
template <typename T>
WK_HD T reflect_coordinate(T coord, int size, T* d_coord) {
  const T span = T(size - 1);
  const T sign = coord < T(0) ? T(-1) : T(1);
  const T a = coord * sign;
  const T flips = wk_floor(a / span);
  const T extra = a - flips * span;
  const bool even = flips - T(2) * wk_floor(flips * T(0.5)) == T(0);
  *d_coord = span > T(0) ? (even ? sign : -sign) : T(0);
  return span > T(0) ? (even ? extra : span - extra) : T(0);
}

template <typename T>
WK_HD T pad_coordinate(T coord, int size, int padding, T* d_coord) {
  if (padding == kReflection) {
    T d_reflect, d_clip;
    const T mirrored = reflect_coordinate(coord, size, &d_reflect);
    const T clipped = clip_coordinate(mirrored, size, &d_clip);
    *d_coord = d_reflect * d_clip;
    return clipped;
  }
  return clip_coordinate(coord, size, d_coord);
}

// Where one output pixel samples the image: the top-left corner (always inside), the offsets
// to the right / bottom neighbours (0 where they would fall outside; their weight is then 0),
// the weights of the right column and bottom row, and d(sample coordinate)/d(flow).
template <typename T>
struct BilinearTap {
  int x0, y0;     // the top-left corner
  int offset;     // y0 * W + x0
  int step_x;     // 1, or 0 when x0 == W - 1
  int step_y;     // W, or 0 when y0 == H - 1
  T wx, wy;       // fractional parts: weights of x0 + 1 and y0 + 1
  T dx, dy;       // padding gradients (0 or +-1)
};

// ix, iy: sample position in pixels, i.e. (x + flow_x, y + flow_y).
template <typename T>
WK_HD BilinearTap<T> bilinear_tap(T ix, T iy, int H, int W, int padding) {
  T dx, dy;
  const T cx = pad_coordinate(ix, W, padding, &dx);
  const T cy = pad_coordinate(iy, H, padding, &dy);
  const T fx = wk_floor(cx);
  const T fy = wk_floor(cy);
  const int x0 = int(fx);
  const int y0 = int(fy);
  BilinearTap<T> t;
  t.x0 = x0;
  t.y0 = y0;
  t.offset = y0 * W + x0;
  t.step_x = x0 + 1 < W ? 1 : 0;
  t.step_y = y0 + 1 < H ? W : 0;
  t.wx = cx - fx;
  t.wy = cy - fy;
  t.dx = dx;
  t.dy = dy;
  return t;
}

// The blend of the four corner values (top-left, top-right, bottom-left, bottom-right).
template <typename T>
WK_HD T bilinear_blend(T v00, T v01, T v10, T v11, const BilinearTap<T>& t) {
  const T top = v00 + t.wx * (v01 - v00);
  const T bottom = v10 + t.wx * (v11 - v10);
  return top + t.wy * (bottom - top);
}

// The blend, and its derivatives with respect to flow_x and flow_y.
template <typename T>
WK_HD T bilinear_blend_grad(T v00, T v01, T v10, T v11, const BilinearTap<T>& t, T* d_flow_x,
                            T* d_flow_y) {
  const T top = v00 + t.wx * (v01 - v00);
  const T bottom = v10 + t.wx * (v11 - v10);
  *d_flow_x = t.dx * ((T(1) - t.wy) * (v01 - v00) + t.wy * (v11 - v10));
  *d_flow_y = t.dy * (bottom - top);
  return top + t.wy * (bottom - top);
}

// The four corner values a sample reads from `plane` (top-left, top-right, bottom-left,
// bottom-right). Integer index arithmetic (not pointer arithmetic) lets the CPU loops use 32-bit
// gathers.
template <typename T>
WK_HD void bilinear_corners(const T* plane, const BilinearTap<T>& t, T* v00, T* v01, T* v10,
                            T* v11) {
  const int i = t.offset, k = i + t.step_y;
  *v00 = plane[i];
  *v01 = plane[i + t.step_x];
  *v10 = plane[k];
  *v11 = plane[k + t.step_x];
}

template <typename T>
WK_HD T bilinear_sample(const T* plane, const BilinearTap<T>& t) {
  T v00, v01, v10, v11;
  bilinear_corners(plane, t, &v00, &v01, &v10, &v11);
  return bilinear_blend(v00, v01, v10, v11, t);
}

template <typename T>
WK_HD T bilinear_sample_grad(const T* plane, const BilinearTap<T>& t, T* d_flow_x,
                             T* d_flow_y) {
  T v00, v01, v10, v11;
  bilinear_corners(plane, t, &v00, &v01, &v10, &v11);
  return bilinear_blend_grad(v00, v01, v10, v11, t, d_flow_x, d_flow_y);
}

// The weight of corner k of a sample (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right,
// at offset, +step_x, +step_y, +both): how much of a gradient at the output pixel flows there.
template <typename T>
WK_HD T bilinear_weight(const BilinearTap<T>& t, int k) {
  return (k & 1 ? t.wx : T(1) - t.wx) * (k & 2 ? t.wy : T(1) - t.wy);
}

template <typename T>
WK_HD void bilinear_weights(const BilinearTap<T>& t, T* w00, T* w01, T* w10, T* w11) {
  *w00 = bilinear_weight(t, 0);
  *w01 = bilinear_weight(t, 1);
  *w10 = bilinear_weight(t, 2);
  *w11 = bilinear_weight(t, 3);
}

// ---------------------------------------------------------------------------------------------
// SSIM from the Gaussian-weighted moments of one window
// ---------------------------------------------------------------------------------------------
// mu_x = E[x], mu_y = E[y], sq = E[x^2] + E[y^2], xy = E[xy] under the window;
// c1 = (0.01 L)^2, c2 = (0.03 L)^2.
//   S = (2 mu_x mu_y + c1)(2 cov_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2))
// The variances only appear as their sum var_x + var_y = sq - mu_x^2 - mu_y^2, so four moment
// maps suffice, not five.

// The four factors of S = (a1 a2) / (b1 b2).
template <typename T>
struct SSIMTerms {
  T a1, a2, b1, b2;
};

template <typename T>
WK_HD SSIMTerms<T> ssim_terms(T mu_x, T mu_y, T sq, T xy, T c1, T c2) {
  const T mu_xy = mu_x * mu_y;
  const T mu_sq = mu_x * mu_x + mu_y * mu_y;
  SSIMTerms<T> t;
  t.a1 = T(2) * mu_xy + c1;
  t.a2 = T(2) * (xy - mu_xy) + c2;
  t.b1 = mu_sq + c1;
  t.b2 = (sq - mu_sq) + c2;
  return t;
}

template <typename T>
WK_HD T ssim_from_moments(T mu_x, T mu_y, T sq, T xy, T c1, T c2) {
  const SSIMTerms<T> t = ssim_terms(mu_x, mu_y, sq, xy, c1, c2);
  return (t.a1 * t.a2) / (t.b1 * t.b2);
}

// S and its partial derivatives with respect to the four moments.
template <typename T>
struct SSIMPartials {
  T s, mu_x, mu_y, sq, xy;
};

template <typename T>
WK_HD SSIMPartials<T> ssim_partials(T mu_x, T mu_y, T sq, T xy, T c1, T c2) {
  const SSIMTerms<T> t = ssim_terms(mu_x, mu_y, sq, xy, c1, c2);
  // One division instead of two: 1 / b1 = b2 / (b1 b2), 1 / b2 = b1 / (b1 b2).
  const T inv_b = T(1) / (t.b1 * t.b2);
  const T inv_b1 = t.b2 * inv_b;
  const T inv_b2 = t.b1 * inv_b;
  const T s = t.a1 * t.a2 * inv_b;
  const T mix = T(2) * (t.a2 - t.a1) * inv_b;     // from the mu_x mu_y terms of a1 and a2
  const T spread = T(2) * s * (inv_b2 - inv_b1);  // from mu^2 in b1 and in var = E[.^2] - mu^2
  SSIMPartials<T> d;
  d.s = s;
  d.mu_x = mu_y * mix + mu_x * spread;
  d.mu_y = mu_x * mix + mu_y * spread;
  d.sq = -s * inv_b2;
  d.xy = T(2) * t.a1 * inv_b;
  return d;
}

// d(sum_p S_p)/d x_q given the partials blurred back onto pixel q (transposed window):
// each window p sees x_q in mu_x, in E[x^2] (as x_q^2) and in E[xy] (as x_q y_q).
template <typename T>
WK_HD T ssim_grad_pixel(T blur_d_mu, T blur_d_sq, T blur_d_xy, T self, T other) {
  return blur_d_mu + T(2) * self * blur_d_sq + other * blur_d_xy;
}

}  // namespace warp_kernel
