// The CUDA kernels (warp_ssim_kernels.cuh) and the CUDA extension's host-side code
// (warp_ssim_cuda_backend.h) on CPU threads (cuda_emulation.h), behind the same Python functions
// as the real extensions (warp_ssim_ops.h), for tests on machines without a GPU. Only the
// runtime differs: the device guard and the streams are labels, and every launch records the
// stream it was given and the device its guard made current, for the tests to read back.
#include "cuda_emulation.h"  // first: defines the CUDA keywords the kernels use

#include <string>
#include <utility>
#include <vector>

namespace warp_kernel {
namespace emulation {

inline std::vector<std::pair<int64_t, std::string>> launch_log;  // (stream, device) per launch
inline std::string guarded_device;  // what the innermost Guard made current; "" outside one
inline int64_t current_stream = 0;  // what EmulatedRuntime::current_stream() returns

}  // namespace emulation

namespace {

// The kernel over the grid on CPU threads, after recording the launch.
struct StreamLaunch {
  explicit StreamLaunch(cudaStream_t s) : stream(s) {}
  cudaStream_t stream;
  cudaError_t err = cudaSuccess;
  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, void (*kernel)(Params...), const Args&... args) {
    if (err != cudaSuccess) return;
    emulation::launch_log.emplace_back(reinterpret_cast<int64_t>(stream),
                                       emulation::guarded_device);
    err = emulation::launch(grid, block, [&] { kernel(args...); });
  }
};

}  // namespace
}  // namespace warp_kernel

#include "warp_ssim_kernels.cuh"
#include "warp_ssim_cuda_backend.h"
#include "warp_ssim_ops.h"

namespace warp_kernel {
namespace {

struct EmulatedRuntime {
  static constexpr bool kCuda = false;

  struct Guard {
    explicit Guard(at::Device device) : previous(emulation::guarded_device) {
      emulation::guarded_device = device.str();
    }
    ~Guard() { emulation::guarded_device = previous; }
    std::string previous;
  };

  static cudaStream_t current_stream() {
    return reinterpret_cast<cudaStream_t>(emulation::current_stream);
  }
};

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace warp_kernel;
  Ops<CudaBackend<EmulatedRuntime>>::define(
      m, "warp_kernel's CUDA kernels and host code run on CPU threads (for tests without a GPU)");
  m.attr("tile") = kTile;
  m.def(
      "set_stream", [](int64_t stream) { emulation::current_stream = stream; },
      "the stream (a number; 0 is the default stream) PyTorch's current stream stands for");
  m.def(
      "launches", [] { return std::exchange(emulation::launch_log, {}); },
      "[(stream, device made current)] of every kernel launch since the last call");
  m.def(
      "set_block_ranges",
      [](std::vector<std::pair<int64_t, int64_t>> ranges) {
        emulation::block_ranges = std::move(ranges);
      },
      "run only the blocks [start, stop) of every grid (negative: from the end); [] runs all");
}
