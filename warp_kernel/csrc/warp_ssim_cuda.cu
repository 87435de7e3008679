// The CUDA kernels (warp_ssim_kernels.cuh), launched on the caller's stream.
#include <cuda_runtime.h>

#include <utility>

#include "warp_ssim_cuda.h"

namespace warp_kernel {
namespace {

// kernel<<<grid, block>>> on the stream; after a failed launch, nothing more is launched and
// err keeps the first error.
struct StreamLaunch {
  explicit StreamLaunch(cudaStream_t s) : stream(s) {}
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
}  // namespace warp_kernel

#include "warp_ssim_kernels.cuh"

namespace warp_kernel {

#define WARP_KERNEL_INSTANTIATE(T)                                                       \
  template cudaError_t launch_warp_forward<T>(const WarpArgs<T>&, cudaStream_t);        \
  template cudaError_t launch_warp_backward<T>(const WarpArgs<T>&, cudaStream_t);       \
  template cudaError_t launch_warp_image_grad<T>(const WarpArgs<T>&, cudaStream_t);     \
  template cudaError_t launch_ssim<T>(const SSIMArgs<T>&, cudaStream_t);

WARP_KERNEL_INSTANTIATE(float)
WARP_KERNEL_INSTANTIATE(double)

}  // namespace warp_kernel
