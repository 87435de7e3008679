// Launchers of the CUDA kernels (warp_ssim_kernels.cuh), on the caller's stream.
#include <cuda_runtime.h>

#include "warp_ssim_cuda.h"
#include "warp_ssim_kernels.cuh"

namespace warp_kernel {

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_flow_warp_forward(const T* img, const T* flow, T* out, Shape s, int padding,
                                     cudaStream_t stream) {
  const dim3 grid((s.H * s.W + 255) / 256, s.B);
  flow_warp_forward_kernel<T><<<grid, 256, 0, stream>>>(img, flow, out, s, padding);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_flow_warp_backward(const T* grad_out, const T* img, const T* flow, T* grad_img,
                                      T* grad_flow, Shape s, int padding, cudaStream_t stream) {
  const dim3 grid((s.H * s.W + 255) / 256, s.B);
  flow_warp_backward_kernel<T><<<grid, 256, 0, stream>>>(grad_out, img, flow, grad_img,
                                                         grad_flow, s, padding);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ssim(const SSIMArgs<T>& a, cudaStream_t stream) {
  const dim3 grid((a.s.W + kTile - 1) / kTile, (a.s.H + kTile - 1) / kTile, a.s.B);
  const dim3 block(kTile, kTile);
  const bool warp = a.img != nullptr;
  const bool grad = a.grad_x != nullptr || a.grad_y != nullptr || a.grad_flow != nullptr;
  if (warp && grad)
    ssim_forward_kernel<T, true, true><<<grid, block, 0, stream>>>(a);
  else if (warp)
    ssim_forward_kernel<T, true, false><<<grid, block, 0, stream>>>(a);
  else if (grad)
    ssim_forward_kernel<T, false, true><<<grid, block, 0, stream>>>(a);
  else
    ssim_forward_kernel<T, false, false><<<grid, block, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !grad) return err;
  if (warp)
    ssim_grad_kernel<T, true><<<grid, block, 0, stream>>>(a);
  else
    ssim_grad_kernel<T, false><<<grid, block, 0, stream>>>(a);
  return cudaGetLastError();
}

#define WARP_KERNEL_INSTANTIATE(T)                                                          \
  template cudaError_t launch_flow_warp_forward<T>(const T*, const T*, T*, Shape, int,     \
                                                   cudaStream_t);                           \
  template cudaError_t launch_flow_warp_backward<T>(const T*, const T*, const T*, T*, T*,  \
                                                    Shape, int, cudaStream_t);              \
  template cudaError_t launch_ssim<T>(const SSIMArgs<T>&, cudaStream_t);

WARP_KERNEL_INSTANTIATE(float)
WARP_KERNEL_INSTANTIATE(double)

}  // namespace warp_kernel
