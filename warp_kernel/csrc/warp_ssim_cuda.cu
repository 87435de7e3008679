// Launchers of the CUDA kernels (warp_ssim_kernels.cuh), on the caller's stream.
#include <cuda_runtime.h>

#include <utility>

#include "warp_ssim_cuda.h"
#include "warp_ssim_kernels.cuh"

namespace warp_kernel {
namespace {

// kernel<<<grid, block>>> on the stream; after a failed launch, nothing more is launched and
// err keeps the first error.
struct StreamLaunch {
  cudaStream_t stream;
  cudaError_t err = cudaSuccess;
  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
    if (err != cudaSuccess) return;
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    err = cudaGetLastError();
  }
};

}  // namespace

template <typename T>
cudaError_t launch_flow_warp_forward(const T* img, const T* flow, T* out, Shape s, int padding,
                                     cudaStream_t stream) {
  StreamLaunch launch{stream};
  launch_flow_warp_forward(launch, img, flow, out, s, padding);
  return launch.err;
}

template <typename T>
cudaError_t launch_flow_warp_backward(const T* grad_out, const T* img, const T* flow, T* grad_img,
                                      T* grad_flow, Shape s, int padding, cudaStream_t stream) {
  StreamLaunch launch{stream};
  launch_flow_warp_backward(launch, grad_out, img, flow, grad_img, grad_flow, s, padding);
  return launch.err;
}

template <typename T>
cudaError_t launch_ssim(const SSIMArgs<T>& a, cudaStream_t stream) {
  StreamLaunch launch{stream};
  launch_ssim(launch, a);
  return launch.err;
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
