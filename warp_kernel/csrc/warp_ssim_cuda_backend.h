// The backend (see warp_ssim_ops.h) of the CUDA kernels, shared by the CUDA extension and its
// emulation on CPU threads, which differ only in the Runtime:
//   static constexpr bool kCuda;                    // the tensors are CUDA tensors
//   struct Guard { explicit Guard(at::Device); };  // makes the tensors' device current
//   static cudaStream_t current_stream();           // PyTorch's current stream there
// So the tests on CPU threads run this host-side code too: device guard, stream, launch-error
// checks, scratch tensors, the sort of the image gradient and the SSIM's final sum.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "warp_ssim_cuda.h"
#include "warp_ssim_math.h"

namespace warp_kernel {

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "warp_kernel: CUDA launch of ", op,
              " failed: ", cudaGetErrorString(err));
}

template <typename Runtime>
struct CudaBackend {
  static constexpr bool kCuda = Runtime::kCuda;

  struct Scope {
    typename Runtime::Guard guard;  // first: the stream is the current one of that device
    cudaStream_t stream;
    explicit Scope(const at::Tensor& t) : guard(t.device()), stream(Runtime::current_stream()) {}
  };

  template <typename T>
  static void warp(const WarpArgs<T>& a, const at::Tensor&, Scope& scope) {
    check_launch(launch_warp_forward(a, scope.stream), "flow_warp_forward");
  }

  // The image gradient is gathered, not scattered with atomics (which add in a different order
  // on every run): each image's output pixels are sorted by the top-left corner they sample
  // (stable: by pixel within a corner), and every image pixel sums the runs of the corners that
  // reach it in that order. The at:: ops run on the current stream, as the kernels do.
  template <typename T>
  static void warp_backward(WarpArgs<T>& a, const at::Tensor& like, Scope& scope) {
    const int64_t plane = int64_t(a.s.H) * a.s.W;
    at::Tensor corner;
    if (a.grad_img != nullptr) {
      corner = at::empty({a.s.B, plane}, like.options().dtype(at::kInt));
      a.corner = corner.data_ptr<int>();
    }
    check_launch(launch_warp_backward(a, scope.stream), "flow_warp_backward");
    if (a.grad_img == nullptr) return;
    const auto [sorted, order] = at::sort(corner, /*stable=*/std::optional<bool>(true), 1);
    const at::Tensor corners =
        at::arange(plane + 1, corner.options()).expand({a.s.B, plane + 1}).contiguous();
    const at::Tensor first = at::searchsorted(sorted, corners, /*out_int32=*/true);
    const at::Tensor order_c = order.contiguous();
    a.order = order_c.data_ptr<int64_t>();
    a.first = first.data_ptr<int>();
    check_launch(launch_warp_image_grad(a, scope.stream), "flow_warp_image_grad");
  }

  // Each tile's SSIM sum goes to its own slot, added up here in a fixed order (no atomics).
  template <typename T>
  static at::Tensor ssim(SSIMArgs<T>& a, const at::Tensor& like, Scope& scope) {
    const at::Tensor tile_sums =
        at::empty({a.s.B, tiles_per_image(a.s)}, like.options().dtype(at::kDouble));
    at::Tensor partials;
    if (a.wants_grad()) {
      partials = at::empty({a.s.B, a.s.C, a.grad_y ? 4 : 3, a.s.H, a.s.W}, like.options());
      a.partials = partials.data_ptr<T>();
    }
    a.tile_sums = tile_sums.data_ptr<double>();
    check_launch(launch_ssim(a, scope.stream), "ssim");
    const double windows = double(a.s.C) * (a.s.H - 2 * kRadius) * (a.s.W - 2 * kRadius);
    return (tile_sums.sum(1) / windows).to(like.scalar_type());
  }
};

}  // namespace warp_kernel
