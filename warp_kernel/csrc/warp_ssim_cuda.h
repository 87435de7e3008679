// Arguments and launchers of the CUDA kernels, on raw pointers. Kept free of torch headers so
// that nvcc compiles warp_ssim_cuda.cu quickly; warp_ssim_cuda.cpp checks the tensors and calls
// the launchers.
#pragma once

#ifndef WARP_KERNEL_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif

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
  T* partials = nullptr;    // scratch (B, C, K, H, W), K = grad_y ? 4 : 3; needed for any grad
  double* ssim = nullptr;   // out (B,), zero-initialised: the mean SSIM is accumulated here
};

#ifndef WARP_KERNEL_CUDA_EMULATION
template <typename T>
cudaError_t launch_flow_warp_forward(const T* img, const T* flow, T* out, Shape s, int padding,
                                     cudaStream_t stream);

// grad_img (zero-initialised) and grad_flow are optional.
template <typename T>
cudaError_t launch_flow_warp_backward(const T* grad_out, const T* img, const T* flow, T* grad_img,
                                      T* grad_flow, Shape s, int padding, cudaStream_t stream);

template <typename T>
cudaError_t launch_ssim(const SSIMArgs<T>& args, cudaStream_t stream);
#endif

}  // namespace warp_kernel
