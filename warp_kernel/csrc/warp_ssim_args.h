// The arguments of one op call on raw pointers, shared by every backend. Free of torch and
// CUDA headers, so that nvcc compiles warp_ssim_cuda.cu quickly and g++ the CPU path alone.
#pragma once

#include <cstdint>

namespace warp_kernel {

struct Shape {
  int B, C, H, W;
};

// One plain warp (forward: img, flow -> out) or its gradient (grad_out -> grad_img, grad_flow).
template <typename T>
struct WarpArgs {
  Shape s;
  int padding = 0;
  const T* img = nullptr;       // (B, C, H, W)
  const T* flow = nullptr;      // (B, 2, H, W)
  T* out = nullptr;             // forward out (B, C, H, W)
  const T* grad_out = nullptr;  // backward in (B, C, H, W)
  T* grad_img = nullptr;        // backward out (B, C, H, W), optional, zero-initialised
  T* grad_flow = nullptr;       // backward out (B, 2, H, W), optional
  // CUDA scratch of the image gradient, which is gathered (warp_ssim_kernels.cuh):
  int* corner = nullptr;           // (B, H * W) top-left corner each output pixel samples
  const int64_t* order = nullptr;  // (B, H * W) output pixels sorted (stably) by that corner
  const int* first = nullptr;      // (B, H * W + 1) where each corner's run starts in `order`
};

// The CUDA SSIM kernels work on tiles of kTile x kTile pixels, one block each.
constexpr int kTile = 16;

inline int64_t tiles_per_image(const Shape& s) {
  return int64_t((s.H + kTile - 1) / kTile) * ((s.W + kTile - 1) / kTile);
}

// One fused SSIM call. x comes from `x` or, when `img` is set, is the warp of img by flow.
// Outputs marked optional are skipped when null; grads are per unit of grad_ssim.
template <typename T>
struct SSIMArgs {
  Shape s;
  const T* x = nullptr;     // (B, C, H, W), or
  const T* img = nullptr;   // (B, C, H, W) and
  const T* flow = nullptr;  // (B, 2, H, W)
  int padding = 0;
  const T* y = nullptr;     // (B, C, H, W)
  T c1 = 0, c2 = 0;
  T* warped = nullptr;      // out (B, C, H, W), required when img is set
  T* grad_x = nullptr;      // out (B, C, H, W), optional
  T* grad_y = nullptr;      // out (B, C, H, W), optional
  T* grad_flow = nullptr;   // out (B, 2, H, W), optional
  T* partials = nullptr;    // CUDA scratch (B, C, K, H, W), K = grad_y ? 4 : 3, for any grad
  double* tile_sums = nullptr;  // CUDA out (B, tiles_per_image): the SSIM summed over a tile

  bool wants_grad() const { return grad_x || grad_y || grad_flow; }
};

}  // namespace warp_kernel
