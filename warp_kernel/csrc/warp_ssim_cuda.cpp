// Python bindings of the CUDA ops (warp_ssim_ops.h) on the tensors' device and PyTorch's
// current stream there.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "warp_ssim_cuda_backend.h"
#include "warp_ssim_ops.h"

namespace warp_kernel {
namespace {

struct CudaRuntime {
  static constexpr bool kCuda = true;
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
};

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  warp_kernel::Ops<warp_kernel::CudaBackend<warp_kernel::CudaRuntime>>::define(
      m, "warp_kernel CUDA ops: fused bilinear flow-warp + SSIM (float32/float64)");
}
