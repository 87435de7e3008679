// CUDA kernels of the fused flow-warp + SSIM ops (float32 and float64) and their launchers.
// Included by warp_ssim_cuda.cu, which launches them on a CUDA stream, and by
// warp_ssim_emulated.cpp, which runs the very same code on CPU threads, so that machines without
// a GPU can test it; the includer first defines StreamLaunch (see the launchers at the end).
//
// Every grid is one-dimensional with the batch folded in (grid.x may reach 2^31 - 1 blocks,
// grid.y and grid.z only 65535), so every size the input checks admit can launch; offsets past
// one plane are 64-bit. No kernel adds floating-point numbers with atomics: each output element
// is written by one thread, which sums in a fixed order, so results are the same bit for bit on
// every run.
//
// Plain warp, one thread per output pixel:
//   flow_warp_forward_kernel: the bilinear sample of every channel.
//   flow_warp_backward_kernel: the flow gradient, summed over channels, and, for the image
//     gradient, the top-left corner the pixel's sample reads. The host then sorts each image's
//     output pixels by that corner (at::sort, stable) and finds where each corner's run starts
//     (at::searchsorted), and
//   flow_warp_image_grad_kernel: one thread per image pixel q gathers, in that order, the
//     samples that have q among their 2 x 2 corners: the runs of top-left corners q, q - 1,
//     q - W and q - W - 1. (Where all samples land on one pixel, one thread sums them all.)
//
// The fused SSIM runs as two kernels over 16x16 tiles of pixels, one thread per pixel, each
// tile loading a 5-pixel halo into shared memory and looping over the channels:
//   ssim_forward_kernel: warped pixels sampled on the fly (and written out) with bilinear taps
//     computed once for all channels (kept in shared memory), horizontal then vertical
//     Gaussian pass for the four moments (x, y, x^2 + y^2, xy), the SSIM summed over the tile
//     into its slot of tile_sums (which the host adds up in a fixed order); for a gradient,
//     the SSIM partial derivatives of every window, per unit of grad_ssim.
//   ssim_grad_kernel: the partials blurred back onto the pixels (the window is symmetric, so
//     the transposed pass uses the same taps), the gradient of x and y at every pixel, and of
//     the flow, summed over channels in registers (one thread owns one pixel).
// The per-pixel maths is in warp_ssim_math.h, shared with the CPU path. The Gaussian taps live
// in __constant__ memory.
#pragma once

#include "warp_ssim_cuda.h"
#include "warp_ssim_math.h"

namespace warp_kernel {

constexpr int kSpan = kTile + 2 * kRadius;  // 26: the tile with its halo
constexpr int kThreads = kTile * kTile;     // one thread per pixel of the tile
constexpr int kWarpThreads = 256;           // block of the plain-warp kernels
constexpr int kChannelChunk = 4;  // channels the image gradient sums per pass over its runs

__constant__ float c_taps_f[kTaps] = {WARP_KERNEL_GAUSS_TAPS};
__constant__ double c_taps_d[kTaps] = {WARP_KERNEL_GAUSS_TAPS};

template <typename T>
__device__ __forceinline__ T gauss(int k);
template <>
__device__ __forceinline__ float gauss<float>(int k) { return c_taps_f[k]; }
template <>
__device__ __forceinline__ double gauss<double>(int k) { return c_taps_d[k]; }

// Where img is sampled for output pixel (x, y) of an image whose flow is fl (2, H, W).
template <typename T>
__device__ __forceinline__ BilinearTap<T> tap_of(const T* fl, int x, int y, const Shape& s,
                                                 int padding) {
  const size_t at = size_t(y) * s.W + x, plane = size_t(s.H) * s.W;
  return bilinear_tap(T(x) + fl[at], T(y) + fl[plane + at], s.H, s.W, padding);
}

// This thread's item of a one-dimensional grid (64-bit: the batch is folded in).
__device__ __forceinline__ int64_t flat_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ---------------------------------------------------------------------------------------------
// Plain warp
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void flow_warp_forward_kernel(WarpArgs<T> a) {
  const int64_t plane = int64_t(a.s.H) * a.s.W, n = flat_index();
  if (n >= a.s.B * plane) return;
  const int b = int(n / plane), i = int(n % plane);  // image, pixel within it
  const BilinearTap<T> t = tap_of(a.flow + size_t(b) * 2 * plane, i % a.s.W, i / a.s.W, a.s,
                                  a.padding);
  for (int c = 0; c < a.s.C; ++c) {
    const size_t pc = (size_t(b) * a.s.C + c) * plane;
    a.out[pc + i] = bilinear_sample(a.img + pc, t);
  }
}

// The flow gradient (if a.grad_flow) and the corner each sample reads (if a.corner).
template <typename T>
__global__ void flow_warp_backward_kernel(WarpArgs<T> a) {
  const int64_t plane = int64_t(a.s.H) * a.s.W, n = flat_index();
  if (n >= a.s.B * plane) return;
  const int b = int(n / plane), i = int(n % plane);
  const BilinearTap<T> t = tap_of(a.flow + size_t(b) * 2 * plane, i % a.s.W, i / a.s.W, a.s,
                                  a.padding);
  if (a.corner != nullptr) a.corner[n] = t.offset;
  if (a.grad_flow == nullptr) return;
  T gfx = 0, gfy = 0;
  for (int c = 0; c < a.s.C; ++c) {
    const size_t pc = (size_t(b) * a.s.C + c) * plane;
    const T g = a.grad_out[pc + i];
    T dfx, dfy;
    bilinear_sample_grad(a.img + pc, t, &dfx, &dfy);
    gfx += g * dfx;
    gfy += g * dfy;
  }
  T* gf = a.grad_flow + size_t(b) * 2 * plane + i;
  gf[0] = gfx;
  gf[plane] = gfy;
}

// grad_img[q] = sum over the samples p with q among their corners of weight * grad_out[p]. The
// samples whose corner k (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) is q have
// top-left corner q - (k & 1) - (k >> 1) W: one run of a.order each. (A sample on the last
// column or row has its right or bottom weight 0, and is left out of that corner.)
template <typename T>
__global__ void flow_warp_image_grad_kernel(WarpArgs<T> a) {
  const int W = a.s.W, C = a.s.C;
  const int64_t plane = int64_t(a.s.H) * W, n = flat_index();
  if (n >= a.s.B * plane) return;
  const int b = int(n / plane), q = int(n % plane), x = q % W, y = q / W;
  const T* fl = a.flow + size_t(b) * 2 * plane;
  const int64_t* order = a.order + size_t(b) * plane;
  const int* first = a.first + size_t(b) * (plane + 1);
  for (int c0 = 0; c0 < C; c0 += kChannelChunk) {
    const int nc = C - c0 < kChannelChunk ? C - c0 : kChannelChunk;
    const T* go = a.grad_out + (size_t(b) * C + c0) * plane;
    T acc[kChannelChunk] = {};
    for (int k = 0; k < 4; ++k) {
      const int dx = k & 1, dy = k >> 1;
      if (x < dx || y < dy) continue;
      const int corner = q - dy * W - dx;
      for (int r = first[corner]; r < first[corner + 1]; ++r) {
        const int p = int(order[r]);
        const T w = bilinear_weight(tap_of(fl, p % W, p / W, a.s, a.padding), k);
        for (int j = 0; j < nc; ++j) acc[j] += w * go[size_t(j) * plane + p];
      }
    }
    for (int j = 0; j < nc; ++j) a.grad_img[(size_t(b) * C + c0 + j) * plane + q] = acc[j];
  }
}

// A bilinear tap as the SSIM forward keeps it for every channel, in shared memory: 16 bytes
// (float) where BilinearTap takes 36, and no registers (held in registers across the channel
// loop, the taps doubled the kernel's registers, 32 -> 72 for sm_80).
template <typename T>
struct SpanTap {
  int offset;
  int steps;  // 1: step_x = 1, 2: step_y = W
  T wx, wy;
};

template <typename T>
__device__ __forceinline__ SpanTap<T> pack(const BilinearTap<T>& t) {
  return SpanTap<T>{t.offset, (t.step_x ? 1 : 0) | (t.step_y ? 2 : 0), t.wx, t.wy};
}

// What bilinear_sample reads of a tap (not its corner or padding gradients).
template <typename T>
__device__ __forceinline__ BilinearTap<T> unpack(const SpanTap<T>& p, int W) {
  BilinearTap<T> t{};
  t.offset = p.offset;
  t.step_x = p.steps & 1;
  t.step_y = p.steps & 2 ? W : 0;
  t.wx = p.wx;
  t.wy = p.wy;
  return t;
}

// The image and origin of tile `block` of a grid of B * tiles_per_image blocks (columns of
// tiles fastest, then rows of tiles, then images).
struct Tile {
  int b, x0, y0;
};

__device__ __forceinline__ Tile tile_of(unsigned block, const Shape& s) {
  const unsigned tiles_x = (s.W + kTile - 1) / kTile, tiles_y = (s.H + kTile - 1) / kTile;
  const unsigned row = block / tiles_x;
  return Tile{int(row / tiles_y), int(block % tiles_x) * kTile, int(row % tiles_y) * kTile};
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
  __shared__ SpanTap<T> taps[kWarp ? kSpan * kSpan : 1];

  const int H = a.s.H, W = a.s.W, C = a.s.C, plane = H * W;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const Tile tile = tile_of(blockIdx.x, a.s);
  const int b = tile.b, x0 = tile.x0, y0 = tile.y0;
  const int cx = x0 + tx, cy = y0 + ty;  // the window centre this thread owns
  const bool in_image = cx < W && cy < H;
  const bool valid = cx >= kRadius && cx < W - kRadius && cy >= kRadius && cy < H - kRadius;
  const int K = a.grad_y != nullptr ? 4 : 3;
  const T inv_count = T(1.0 / (double(C) * (H - 2 * kRadius) * (W - 2 * kRadius)));
  double local = 0;

  // ---- Phase 0: the bilinear taps of the tile and its halo, once for all channels ----
  // (each thread reads back only the taps it wrote: no barrier needed)
  if (kWarp) {
    const T* fl = a.flow + size_t(b) * 2 * plane;
    for (int i = tid; i < kSpan * kSpan; i += kThreads) {
      const int gy = y0 - kRadius + i / kSpan, gx = x0 - kRadius + i % kSpan;
      if (gy >= 0 && gy < H && gx >= 0 && gx < W)
        taps[i] = pack(tap_of(fl, gx, gy, a.s, a.padding));
    }
  }

  for (int c = 0; c < C; ++c) {
    const size_t pc = (size_t(b) * C + c) * plane;

    // ---- Phase 1: tile load with a 5-px halo; warped pixels sampled on the fly ----
    for (int i = tid; i < kSpan * kSpan; i += kThreads) {
      const int ly = i / kSpan, lx = i % kSpan;
      const int gy = y0 - kRadius + ly, gx = x0 - kRadius + lx;
      T xv = 0, yv = 0;
      if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
        const int at = gy * W + gx;
        if (kWarp) {
          xv = bilinear_sample(a.img + pc, unpack(taps[i], W));
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
        d[size_t(plane)] = inv_count * p.sq;
        d[size_t(2) * plane] = inv_count * p.xy;
        if (K == 4) d[size_t(3) * plane] = inv_count * p.mu_y;
      } else {
        local += double(ssim_from_moments(u[0], u[1], u[2], u[3], a.c1, a.c2));
      }
    } else if (kGrad && in_image) {
      T* d = a.partials + (size_t(b) * C + c) * K * plane + cy * W + cx;
      for (int k = 0; k < K; ++k) d[size_t(k) * plane] = T(0);  // no window is centred here
    }
    __syncthreads();  // the next channel overwrites the tiles
  }

  // ---- Phase 4: block reduction of the SSIM sum into the tile's slot ----
  for (int offset = 16; offset > 0; offset /= 2)
    local += __shfl_down_sync(0xffffffff, local, offset);
  if (tid % 32 == 0) warp_sums[tid / 32] = local;
  __syncthreads();
  if (tid == 0) {
    double sum = 0;
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w];
    a.tile_sums[blockIdx.x] = sum;
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
  const Tile tile = tile_of(blockIdx.x, a.s);
  const int b = tile.b, x0 = tile.x0, y0 = tile.y0;
  const int qx = x0 + tx, qy = y0 + ty;  // the pixel this thread owns
  const bool inside = qx < W && qy < H;
  const int K = a.grad_y != nullptr ? 4 : 3;
  const bool flow_grad = kWarp && a.grad_flow != nullptr;

  BilinearTap<T> tap{};
  if (flow_grad && inside) tap = tap_of(a.flow + size_t(b) * 2 * plane, qx, qy, a.s, a.padding);
  T gfx = 0, gfy = 0;

  for (int c = 0; c < C; ++c) {
    const size_t pc = (size_t(b) * C + c) * plane;
    const T* part = a.partials + (size_t(b) * C + c) * K * plane;

    // ---- Phase 1: tile load of the partial maps with a 5-px halo (zero outside) ----
    for (int i = tid; i < kSpan * kSpan; i += kThreads) {
      const int ly = i / kSpan, lx = i % kSpan;
      const int gy = y0 - kRadius + ly, gx = x0 - kRadius + lx;
      const bool in = gy >= 0 && gy < H && gx >= 0 && gx < W;
      for (int k = 0; k < K; ++k)
        sd[k][ly][lx] = in ? part[size_t(k) * plane + gy * W + gx] : T(0);
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
// Launchers (declared in warp_ssim_cuda.h). StreamLaunch, defined by the includer, is
// constructed from the stream; launch(grid, block, kernel, args...) runs the kernel over the
// grid there (<<<>>> on a GPU, CPU threads in the emulation) and keeps the first error in
// launch.err, after which it launches nothing more.
// ---------------------------------------------------------------------------------------------

// kernel over one thread per pixel of every image.
template <typename T>
cudaError_t launch_per_pixel(void (*kernel)(WarpArgs<T>), const WarpArgs<T>& a,
                             cudaStream_t stream) {
  StreamLaunch launch(stream);
  const int64_t pixels = int64_t(a.s.B) * a.s.H * a.s.W;
  launch(dim3(unsigned((pixels + kWarpThreads - 1) / kWarpThreads)), dim3(kWarpThreads), kernel, a);
  return launch.err;
}

template <typename T>
cudaError_t launch_warp_forward(const WarpArgs<T>& a, cudaStream_t stream) {
  return launch_per_pixel(flow_warp_forward_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_warp_backward(const WarpArgs<T>& a, cudaStream_t stream) {
  return launch_per_pixel(flow_warp_backward_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_warp_image_grad(const WarpArgs<T>& a, cudaStream_t stream) {
  return launch_per_pixel(flow_warp_image_grad_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_ssim(const SSIMArgs<T>& a, cudaStream_t stream) {
  StreamLaunch launch(stream);
  const dim3 grid(unsigned(a.s.B * tiles_per_image(a.s)));
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
  if (grad) {
    if (warp)
      launch(grid, block, ssim_grad_kernel<T, true>, a);
    else
      launch(grid, block, ssim_grad_kernel<T, false>, a);
  }
  return launch.err;
}

}  // namespace warp_kernel
