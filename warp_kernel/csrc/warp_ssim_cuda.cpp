// Python bindings of the CUDA ops: input checks, device guard, current stream, dtype dispatch.
// Same functions and signatures as the CPU extension (warp_ssim_cpu.cpp).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <vector>

#include "warp_ssim_checks.h"
#include "warp_ssim_cuda.h"

namespace warp_kernel {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "warp_kernel: CUDA launch of ", op,
              " failed: ", cudaGetErrorString(err));
}

Shape shape_of(const at::Tensor& t) {
  return Shape{int(t.size(0)), int(t.size(1)), int(t.size(2)), int(t.size(3))};
}

template <typename T>
T* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor flow_warp_forward(const at::Tensor& img, const at::Tensor& flow, int64_t padding) {
  check_image(img, "img", true);
  check_flow(flow, img, true);
  check_padding(padding);
  const c10::cuda::CUDAGuard guard(img.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor out = at::empty_like(img);
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "flow_warp_forward_cuda", [&] {
    check_launch(launch_flow_warp_forward(img.data_ptr<scalar_t>(), flow.data_ptr<scalar_t>(),
                                          out.data_ptr<scalar_t>(), shape_of(img), int(padding),
                                          stream),
                 "flow_warp_forward");
  });
  return out;
}

std::vector<at::Tensor> flow_warp_backward(const at::Tensor& grad_out, const at::Tensor& img,
                                           const at::Tensor& flow, int64_t padding,
                                           bool need_img, bool need_flow) {
  check_image(img, "img", true);
  check_flow(flow, img, true);
  check_same_shape(grad_out, "grad_out", img, "img", true);
  check_padding(padding);
  const c10::cuda::CUDAGuard guard(img.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor grad_img = need_img ? at::zeros_like(img) : at::Tensor();
  at::Tensor grad_flow = need_flow ? at::empty_like(flow) : at::Tensor();
  if (!need_img && !need_flow) return {grad_img, grad_flow};
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "flow_warp_backward_cuda", [&] {
    check_launch(launch_flow_warp_backward(grad_out.data_ptr<scalar_t>(),
                                           img.data_ptr<scalar_t>(), flow.data_ptr<scalar_t>(),
                                           ptr_or_null<scalar_t>(grad_img),
                                           ptr_or_null<scalar_t>(grad_flow), shape_of(img),
                                           int(padding), stream),
                 "flow_warp_backward");
  });
  return {grad_img, grad_flow};
}

// Shared by ssim_forward and warp_ssim_forward: runs the fused kernels, returns ssim (B,).
template <typename T>
at::Tensor run_ssim(SSIMArgs<T>& args, const at::Tensor& like, cudaStream_t stream) {
  const bool grad = args.grad_x || args.grad_y || args.grad_flow;
  at::Tensor acc = at::zeros({args.s.B}, like.options().dtype(at::kDouble));
  at::Tensor partials;
  if (grad) {
    const int K = args.grad_y ? 4 : 3;
    partials = at::empty({args.s.B, args.s.C, K, args.s.H, args.s.W}, like.options());
    args.partials = partials.data_ptr<T>();
  }
  args.ssim = acc.data_ptr<double>();
  check_launch(launch_ssim(args, stream), "ssim");
  return acc.to(like.scalar_type());
}

std::vector<at::Tensor> ssim_forward(const at::Tensor& x, const at::Tensor& y, double data_range,
                                     bool want_grad_x, bool want_grad_y) {
  check_image(x, "x", true);
  check_same_shape(y, "y", x, "x", true);
  check_ssim_size(x);
  check_data_range(data_range);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor grad_x = want_grad_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_y = want_grad_y ? at::empty_like(y) : at::Tensor();
  at::Tensor ssim;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_forward_cuda", [&] {
    SSIMArgs<scalar_t> a;
    a.s = shape_of(x);
    a.x = x.data_ptr<scalar_t>();
    a.y = y.data_ptr<scalar_t>();
    a.c1 = scalar_t((0.01 * data_range) * (0.01 * data_range));
    a.c2 = scalar_t((0.03 * data_range) * (0.03 * data_range));
    a.grad_x = ptr_or_null<scalar_t>(grad_x);
    a.grad_y = ptr_or_null<scalar_t>(grad_y);
    ssim = run_ssim(a, x, stream);
  });
  return {ssim, grad_x, grad_y};
}

std::vector<at::Tensor> warp_ssim_forward(const at::Tensor& img, const at::Tensor& flow,
                                          const at::Tensor& ref, int64_t padding,
                                          double data_range, bool want_grad_warped,
                                          bool want_grad_flow, bool want_grad_ref) {
  check_image(img, "img", true);
  check_flow(flow, img, true);
  check_same_shape(ref, "ref", img, "img", true);
  check_ssim_size(img);
  check_padding(padding);
  check_data_range(data_range);
  const c10::cuda::CUDAGuard guard(img.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor warped = at::empty_like(img);
  at::Tensor grad_warped = want_grad_warped ? at::empty_like(img) : at::Tensor();
  at::Tensor grad_flow = want_grad_flow ? at::empty_like(flow) : at::Tensor();
  at::Tensor grad_ref = want_grad_ref ? at::empty_like(ref) : at::Tensor();
  at::Tensor ssim;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "warp_ssim_forward_cuda", [&] {
    SSIMArgs<scalar_t> a;
    a.s = shape_of(img);
    a.img = img.data_ptr<scalar_t>();
    a.flow = flow.data_ptr<scalar_t>();
    a.padding = int(padding);
    a.y = ref.data_ptr<scalar_t>();
    a.c1 = scalar_t((0.01 * data_range) * (0.01 * data_range));
    a.c2 = scalar_t((0.03 * data_range) * (0.03 * data_range));
    a.warped = warped.data_ptr<scalar_t>();
    a.grad_x = ptr_or_null<scalar_t>(grad_warped);
    a.grad_y = ptr_or_null<scalar_t>(grad_ref);
    a.grad_flow = ptr_or_null<scalar_t>(grad_flow);
    ssim = run_ssim(a, img, stream);
  });
  return {ssim, warped, grad_warped, grad_flow, grad_ref};
}

at::Tensor gaussian_taps() {
  const double d[kTaps] = {WARP_KERNEL_GAUSS_TAPS};
  at::Tensor t = at::empty({kTaps}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(t.data_ptr<double>(), d, sizeof(d));
  return t;
}

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace warp_kernel;
  m.doc() = "warp_kernel CUDA ops: fused bilinear flow-warp + SSIM (float32/float64)";
  m.def("flow_warp_forward", &flow_warp_forward, "img (B,C,H,W), flow (B,2,H,W), padding code");
  m.def("flow_warp_backward", &flow_warp_backward,
        "grad_out, img, flow, padding, need_img, need_flow -> [grad_img, grad_flow]");
  m.def("ssim_forward", &ssim_forward,
        "x, y, data_range, want_grad_x, want_grad_y -> [ssim (B,), unit grad_x, unit grad_y]");
  m.def("warp_ssim_forward", &warp_ssim_forward,
        "img, flow, ref, padding, data_range, want_grad_warped, want_grad_flow, want_grad_ref"
        " -> [ssim (B,), warped, unit grad_warped, unit grad_flow, unit grad_ref]");
  m.def("gaussian_taps", &gaussian_taps, "the 11 window taps (float64)");
}
