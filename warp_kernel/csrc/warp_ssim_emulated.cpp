// The CUDA kernels of warp_ssim_kernels.cuh run on CPU threads (cuda_emulation.h), behind the
// same Python functions as the real extensions (warp_ssim_ops.h), for tests on machines
// without a GPU. The launch configurations are the CUDA launchers' own (warp_ssim_kernels.cuh),
// the allocations those of warp_ssim_cuda.cpp.
#include "cuda_emulation.h"  // first: defines the CUDA keywords the kernels use


#include "warp_ssim_kernels.cuh"
#include "warp_ssim_ops.h"

namespace warp_kernel {
namespace {

// Runs the kernel over the grid on CPU threads, one per thread of a block.
struct ThreadLaunch {
  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, void (*kernel)(Params...), const Args&... args) {
    emulation::launch(grid, block, [&] { kernel(args...); });
  }
};

struct EmulatedBackend {
  static constexpr bool kCuda = false;

  struct Scope {
    explicit Scope(const at::Tensor&) {}
  };

  template <typename T>
  static void warp(const T* img, const T* flow, T* out, Shape s, int padding, Scope&) {
    ThreadLaunch launch;
    launch_flow_warp_forward(launch, img, flow, out, s, padding);
  }

  template <typename T>
  static void warp_backward(const T* grad_out, const T* img, const T* flow, T* grad_img,
                            T* grad_flow, Shape s, int padding, Scope&) {
    ThreadLaunch launch;
    launch_flow_warp_backward(launch, grad_out, img, flow, grad_img, grad_flow, s, padding);
  }

  template <typename T>
  static at::Tensor ssim(SSIMArgs<T>& a, const at::Tensor& like, Scope&) {
    return ssim_with_scratch(a, like, [](const SSIMArgs<T>& args) {
      ThreadLaunch launch;
      launch_ssim(launch, args);
    });
  }
};

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  warp_kernel::Ops<warp_kernel::EmulatedBackend>::define(
      m, "warp_kernel's CUDA kernels run on CPU threads (for tests without a GPU)");
}
