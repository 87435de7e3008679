// The arguments of one op call on raw pointers, shared by every backend. Free of torch and
// CUDA headers, so that nvcc compiles warp_ssim_cuda.cu quickly and g++ the CPU path alone.
#pragma once

namespace warp_kernel {

struct Shape {
  int B, C, H, W;
};

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
  double* ssim = nullptr;   // CUDA out (B,), zero-initialised: the mean SSIM accumulates here

  bool wants_grad() const { return grad_x || grad_y || grad_flow; }
};

}  // namespace warp_kernel
