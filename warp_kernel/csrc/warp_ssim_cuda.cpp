// Python bindings of the CUDA ops (warp_ssim_ops.h) on the current device and stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "warp_ssim_cuda.h"
#include "warp_ssim_ops.h"

namespace warp_kernel {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "warp_kernel: CUDA launch of ", op,
              " failed: ", cudaGetErrorString(err));
}

struct CudaBackend {
  static constexpr bool kCuda = true;

  struct Scope {
    c10::cuda::CUDAGuard guard;
    cudaStream_t stream;
    explicit Scope(const at::Tensor& t)
        : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
  };

  template <typename T>
  static void warp(const T* img, const T* flow, T* out, Shape s, int padding, Scope& scope) {
    check_launch(launch_flow_warp_forward(img, flow, out, s, padding, scope.stream),
                 "flow_warp_forward");
  }

  template <typename T>
  static void warp_backward(const T* grad_out, const T* img, const T* flow, T* grad_img,
                            T* grad_flow, Shape s, int padding, Scope& scope) {
    check_launch(launch_flow_warp_backward(grad_out, img, flow, grad_img, grad_flow, s, padding,
                                           scope.stream),
                 "flow_warp_backward");
  }

  template <typename T>
  static at::Tensor ssim(SSIMArgs<T>& a, const at::Tensor& like, Scope& scope) {
    return ssim_with_scratch(a, like, [&](const SSIMArgs<T>& args) {
      check_launch(launch_ssim(args, scope.stream), "ssim");
    });
  }
};

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  warp_kernel::Ops<warp_kernel::CudaBackend>::define(
      m, "warp_kernel CUDA ops: fused bilinear flow-warp + SSIM (float32/float64)");
}
