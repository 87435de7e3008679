// CUDA kernels of the fused flow-warp + SSIM ops (float32 and float64), included by
// warp_ssim_cuda.cu (which launches them) and by warp_ssim_emulated.cpp (which runs the very
// same code on CPU threads, so that machines without a GPU can test it).
//
// The fused SSIM runs as two kernels over 16x16 tiles of pixels, one thread per pixel, each
// tile loading a 5-pixel halo into shared memory and looping over the channels:
//   ssim_forward_kernel: warped pixels sampled on the fly (and written out), horizontal then
//     vertical Gaussian pass for the four moments (x, y, x^2 + y^2, xy), SSIM reduced inside the block and added to
//     the image's total with one atomicAdd per block; for a gradient, the SSIM partial
//     derivatives of every window, per unit of grad_ssim.
//   ssim_grad_kernel: the partials blurred back onto the pixels (the window is symmetric, so
//     the transposed pass uses the same taps), the gradient of x and y at every pixel, and of
//     the flow, summed over channels in registers (no atomics: one thread owns one pixel).
// The per-pixel maths is in warp_ssim_math.h, shared with the CPU path. The Gaussian taps live
// in __constant__ memory.
#pragma once

#include "warp_ssim_cuda.h"
#include "warp_ssim_math.h"

namespace warp_kernel {

constexpr int kTile = 16;                  // tile of 16 x 16 pixels, one per thread
constexpr int kSpan = kTile + 2 * kRadius;  // 26: the tile with its halo
constexpr int kThreads = kTile * kTile;
constexpr int kSpanSlots = (kSpan * kSpan + kThreads - 1) / kThreads;  // 3 span pixels a thread

__constant__ float c_taps_f[kTaps] = {WARP_KERNEL_GAUSS_TAPS};
__constant__ double c_taps_d[kTaps] = {WARP_KERNEL_GAUSS_TAPS};

template <typename T>
__device__ __forceinline__ T gauss(int k);
template <>
__device__ __forceinline__ float gauss<float>(int k) { return c_taps_f[k]; }
template <>
__device__ __forceinline__ double gauss<double>(int k) { return c_taps_d[k]; }

// ---------------------------------------------------------------------------------------------
// Plain warp
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void flow_warp_forward_kernel(const T* __restrict__ img, const T* __restrict__ flow,
                                         T* __restrict__ out, Shape s, int padding) {
  const int plane = s.H * s.W;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;  // pixel within the image
  const int b = blockIdx.y;
  if (i >= plane) return;
  const int y = i / s.W, x = i % s.W;
  const T* fl = flow + size_t(b) * 2 * plane;
  const BilinearTap<T> t = bilinear_tap(T(x) + fl[i], T(y) + fl[plane + i], s.H, s.W, padding);
  for (int c = 0; c < s.C; ++c) {
    const size_t pc = (size_t(b) * s.C + c) * plane;
    out[pc + i] = bilinear_sample(img + pc, t);
  }
}

template <typename T>
__global__ void flow_warp_backward_kernel(const T* __restrict__ grad_out,
                                          const T* __restrict__ img, const T* __restrict__ flow,
                                          T* grad_img, T* __restrict__ grad_flow, Shape s,
                                          int padding) {
  const int plane = s.H * s.W;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (i >= plane) return;
  const int y = i / s.W, x = i % s.W;
  const T* fl = flow + size_t(b) * 2 * plane;
  const BilinearTap<T> t = bilinear_tap(T(x) + fl[i], T(y) + fl[plane + i], s.H, s.W, padding);
  T w00, w01, w10, w11;
  bilinear_weights(t, &w00, &w01, &w10, &w11);
  T gfx = 0, gfy = 0;
  for (int c = 0; c < s.C; ++c) {
    const size_t pc = (size_t(b) * s.C + c) * plane;
    const T g = grad_out[pc + i];
    if (grad_flow != nullptr) {
      T dfx, dfy;
      bilinear_sample_grad(img + pc, t, &dfx, &dfy);
      gfx += g * dfx;
      gfy += g * dfy;
    }
    if (grad_img != nullptr) {  // several output pixels sample the same corner: atomics
      T* gi = grad_img + pc + t.offset;
      atomicAdd(gi, g * w00);
      atomicAdd(gi + t.step_x, g * w01);
      atomicAdd(gi + t.step_y, g * w10);
      atomicAdd(gi + t.step_y + t.step_x, g * w11);
    }
  }
  if (grad_flow != nullptr) {
    grad_flow[size_t(b) * 2 * plane + i] = gfx;
    grad_flow[size_t(b) * 2 * plane + plane + i] = gfy;
  }
}

// ---------------------------------------------------------------------------------------------
// Fused SSIM, kernel 1: moments, SSIM, partials
// ---------------------------------------------------------------------------------------------

template <typename T, bool kWarp, bool kGrad>
__global__ void __launch_bounds__(kThreads) ssim_forward_kernel(SSIMArgs<T> a) {
  __shared__ T sx[kSpan][kSpan + 1];
  __shared__ T sy[kSpan][kSpan + 1];
  __shared__ T sh[4][kSpan][kTile];
  __shared__ double warp_sums[kThreads / 32];

  const int H = a.s.H, W = a.s.W, C = a.s.C, plane = H * W;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const int b = blockIdx.z;
  const int x0 = blockIdx.x * kTile, y0 = blockIdx.y * kTile;
  const int cx = x0 + tx, cy = y0 + ty;  // the window centre this thread owns
  const bool in_image = cx < W && cy < H;
  const bool valid = cx >= kRadius && cx < W - kRadius && cy >= kRadius && cy < H - kRadius;
  const int K = a.grad_y != nullptr ? 4 : 3;
  const T inv_count = T(1.0 / (double(C) * (H - 2 * kRadius) * (W - 2 * kRadius)));
  double local = 0;

  // The bilinear taps of this thread's pixels of the tile and its halo (thread tid loads span
  // pixels tid, tid + 256, tid + 512), computed once for all channels and kept in registers.
  BilinearTap<T> taps[kSpanSlots] = {};
  if (kWarp) {
    const T* fl = a.flow + size_t(b) * 2 * plane;
#pragma unroll
    for (int j = 0; j < kSpanSlots; ++j) {
      const int i = tid + j * kThreads;
      const int gy = y0 - kRadius + i / kSpan, gx = x0 - kRadius + i % kSpan;
      if (i < kSpan * kSpan && gy >= 0 && gy < H && gx >= 0 && gx < W) {
        const int at = gy * W + gx;
        taps[j] = bilinear_tap(T(gx) + fl[at], T(gy) + fl[plane + at], H, W, a.padding);
      }
    }
  }

  for (int c = 0; c < C; ++c) {
    const size_t pc = (size_t(b) * C + c) * plane;

    // ---- Phase 1: tile load with a 5-px halo; warped pixels sampled on the fly ----
#pragma unroll
    for (int j = 0; j < kSpanSlots; ++j) {
      const int i = tid + j * kThreads;
      if (i >= kSpan * kSpan) break;
      const int ly = i / kSpan, lx = i % kSpan;
      const int gy = y0 - kRadius + ly, gx = x0 - kRadius + lx;
      T xv = 0, yv = 0;
      if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
        const int at = gy * W + gx;
        if (kWarp) {
          xv = bilinear_sample(a.img + pc, taps[j]);
          const bool core = ly >= kRadius && ly < kRadius + kTile && lx >= kRadius &&
                            lx < kRadius + kTile;
          if (core) a.warped[pc + at] = xv;  // each pixel is the core of exactly one tile
        } else {
          xv = a.x[pc + at];
        }
        yv = a.y[pc + at];
      }
      sx[ly][lx] = xv;
      sy[ly][lx] = yv;
    }
    __syncthreads();

    // ---- Phase 2: horizontal pass over the 26 rows of the 16 centre columns ----
    for (int i = tid; i < kSpan * kTile; i += kThreads) {
      const int ly = i / kTile, lx = i % kTile;
      T m0 = 0, m1 = 0, m2 = 0, m3 = 0;
#pragma unroll
      for (int k = 0; k < kTaps; ++k) {
        const T g = gauss<T>(k), xv = sx[ly][lx + k], yv = sy[ly][lx + k];
        m0 += g * xv;
        m1 += g * yv;
        m2 += g * (xv * xv + yv * yv);
        m3 += g * xv * yv;
      }
      sh[0][ly][lx] = m0;
      sh[1][ly][lx] = m1;
      sh[2][ly][lx] = m2;
      sh[3][ly][lx] = m3;
    }
    __syncthreads();

    // ---- Phase 3: vertical pass, SSIM and its partials at this thread's centre ----
    if (valid) {
      T u[4] = {0, 0, 0, 0};
#pragma unroll
      for (int k = 0; k < kTaps; ++k) {
        const T g = gauss<T>(k);
#pragma unroll
        for (int q = 0; q < 4; ++q) u[q] += g * sh[q][ty + k][tx];
      }
      if (kGrad) {
        const SSIMPartials<T> p = ssim_partials(u[0], u[1], u[2], u[3], a.c1, a.c2);
        local += double(p.s);
        T* d = a.partials + (size_t(b) * C + c) * K * plane + cy * W + cx;
        d[0] = inv_count * p.mu_x;
        d[plane] = inv_count * p.sq;
        d[2 * plane] = inv_count * p.xy;
        if (K == 4) d[3 * plane] = inv_count * p.mu_y;
      } else {
        local += double(ssim_from_moments(u[0], u[1], u[2], u[3], a.c1, a.c2));
      }
    } else if (kGrad && in_image) {
      T* d = a.partials + (size_t(b) * C + c) * K * plane + cy * W + cx;
      for (int k = 0; k < K; ++k) d[k * plane] = T(0);  // no window is centred here
    }
    __syncthreads();  // the next channel overwrites the tiles
  }

  // ---- Phase 4: block reduction of the SSIM sum, one atomicAdd per block ----
  for (int offset = 16; offset > 0; offset /= 2)
    local += __shfl_down_sync(0xffffffff, local, offset);
  if (tid % 32 == 0) warp_sums[tid / 32] = local;
  __syncthreads();
  if (tid == 0) {
    double sum = 0;
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w];
    atomicAdd(a.ssim + b, sum * (1.0 / (double(C) * (H - 2 * kRadius) * (W - 2 * kRadius))));
  }
}

// ---------------------------------------------------------------------------------------------
// Fused SSIM, kernel 2: partials blurred back onto the pixels; gradients of x, y and flow
// ---------------------------------------------------------------------------------------------

template <typename T, bool kWarp>
__global__ void __launch_bounds__(kThreads) ssim_grad_kernel(SSIMArgs<T> a) {
  __shared__ T sd[4][kSpan][kSpan + 1];
  __shared__ T sh[4][kSpan][kTile];

  const int H = a.s.H, W = a.s.W, C = a.s.C, plane = H * W;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const int b = blockIdx.z;
  const int x0 = blockIdx.x * kTile, y0 = blockIdx.y * kTile;
  const int qx = x0 + tx, qy = y0 + ty;  // the pixel this thread owns
  const bool inside = qx < W && qy < H;
  const int K = a.grad_y != nullptr ? 4 : 3;
  const bool flow_grad = kWarp && a.grad_flow != nullptr;

  BilinearTap<T> tap{};
  if (flow_grad && inside) {
    const T* fl = a.flow + size_t(b) * 2 * plane;
    const int at = qy * W + qx;
    tap = bilinear_tap(T(qx) + fl[at], T(qy) + fl[plane + at], H, W, a.padding);
  }
  T gfx = 0, gfy = 0;

  for (int c = 0; c < C; ++c) {
    const size_t pc = (size_t(b) * C + c) * plane;
    const T* part = a.partials + (size_t(b) * C + c) * K * plane;

    // ---- Phase 1: tile load of the partial maps with a 5-px halo (zero outside) ----
    for (int i = tid; i < kSpan * kSpan; i += kThreads) {
      const int ly = i / kSpan, lx = i % kSpan;
      const int gy = y0 - kRadius + ly, gx = x0 - kRadius + lx;
      const bool in = gy >= 0 && gy < H && gx >= 0 && gx < W;
      for (int k = 0; k < K; ++k) sd[k][ly][lx] = in ? part[k * plane + gy * W + gx] : T(0);
    }
    __syncthreads();

    // ---- Phase 2: horizontal pass ----
    for (int i = tid; i < kSpan * kTile; i += kThreads) {
      const int ly = i / kTile, lx = i % kTile;
      for (int k = 0; k < K; ++k) {
        T acc = 0;
#pragma unroll
        for (int t = 0; t < kTaps; ++t) acc += gauss<T>(t) * sd[k][ly][lx + t];
        sh[k][ly][lx] = acc;
      }
    }
    __syncthreads();

    // ---- Phase 3: vertical pass and the gradients at this thread's pixel ----
    if (inside) {
      T f[4] = {0, 0, 0, 0};
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const T g = gauss<T>(t);
        f[0] += g * sh[0][ty + t][tx];
        f[1] += g * sh[1][ty + t][tx];
        f[2] += g * sh[2][ty + t][tx];
        if (K == 4) f[3] += g * sh[3][ty + t][tx];
      }
      const int at = qy * W + qx;
      const T xv = kWarp ? a.warped[pc + at] : a.x[pc + at];
      const T yv = a.y[pc + at];
      const T dx = ssim_grad_pixel(f[0], f[1], f[2], xv, yv);
      if (a.grad_x != nullptr) a.grad_x[pc + at] = dx;
      if (a.grad_y != nullptr) a.grad_y[pc + at] = ssim_grad_pixel(f[3], f[1], f[2], yv, xv);
      if (flow_grad) {
        T dfx, dfy;
        bilinear_sample_grad(a.img + pc, tap, &dfx, &dfy);
        gfx += dx * dfx;
        gfy += dx * dfy;
      }
    }
    __syncthreads();
  }
  if (flow_grad && inside) {
    T* gf = a.grad_flow + size_t(b) * 2 * plane + qy * W + qx;
    gf[0] = gfx;
    gf[plane] = gfy;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configurations, shared by warp_ssim_cuda.cu and the CPU emulation: launch(grid, block,
// kernel, args...) runs the kernel over the grid (with <<<>>> on a stream, or on CPU threads).
// ---------------------------------------------------------------------------------------------

template <typename T, typename Launch>
void launch_flow_warp_forward(Launch& launch, const T* img, const T* flow, T* out, Shape s,
                              int padding) {
  launch(dim3((s.H * s.W + 255) / 256, s.B), dim3(256), flow_warp_forward_kernel<T>, img, flow,
         out, s, padding);
}

template <typename T, typename Launch>
void launch_flow_warp_backward(Launch& launch, const T* grad_out, const T* img, const T* flow,
                               T* grad_img, T* grad_flow, Shape s, int padding) {
  launch(dim3((s.H * s.W + 255) / 256, s.B), dim3(256), flow_warp_backward_kernel<T>, grad_out,
         img, flow, grad_img, grad_flow, s, padding);
}

// a.partials and a.ssim must be set (see SSIMArgs).
template <typename T, typename Launch>
void launch_ssim(Launch& launch, const SSIMArgs<T>& a) {
  const dim3 grid((a.s.W + kTile - 1) / kTile, (a.s.H + kTile - 1) / kTile, a.s.B);
  const dim3 block(kTile, kTile);
  const bool warp = a.img != nullptr;
  const bool grad = a.wants_grad();
  if (warp && grad)
    launch(grid, block, ssim_forward_kernel<T, true, true>, a);
  else if (warp)
    launch(grid, block, ssim_forward_kernel<T, true, false>, a);
  else if (grad)
    launch(grid, block, ssim_forward_kernel<T, false, true>, a);
  else
    launch(grid, block, ssim_forward_kernel<T, false, false>, a);
  if (!grad) return;
  if (warp)
    launch(grid, block, ssim_grad_kernel<T, true>, a);
  else
    launch(grid, block, ssim_grad_kernel<T, false>, a);
}

}  // namespace warp_kernel
