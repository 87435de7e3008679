// The CUDA kernels of warp_ssim_kernels.cuh run on CPU threads (cuda_emulation.h), behind the
// same Python functions as the real extensions, for tests on machines without a GPU. The
// grids and blocks are those of warp_ssim_cuda.cu's launchers; the allocations those of
// warp_ssim_cuda.cpp.
#include "cuda_emulation.h"  // first: defines the CUDA keywords the kernels use

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "warp_ssim_checks.h"
#include "warp_ssim_kernels.cuh"

namespace warp_kernel {
namespace {

using emulation::launch;

Shape shape_of(const at::Tensor& t) {
  return Shape{int(t.size(0)), int(t.size(1)), int(t.size(2)), int(t.size(3))};
}

template <typename T>
T* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor flow_warp_forward(const at::Tensor& img, const at::Tensor& flow, int64_t padding) {
  check_image(img, "img", false);
  check_flow(flow, img, false);
  at::Tensor out = at::empty_like(img);
  const Shape s = shape_of(img);
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "flow_warp_forward_emulated", [&] {
    const scalar_t* i = img.data_ptr<scalar_t>();
    const scalar_t* f = flow.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    launch(dim3((s.H * s.W + 255) / 256, s.B), dim3(256),
           [&] { flow_warp_forward_kernel<scalar_t>(i, f, o, s, int(padding)); });
  });
  return out;
}

std::vector<at::Tensor> flow_warp_backward(const at::Tensor& grad_out, const at::Tensor& img,
                                           const at::Tensor& flow, int64_t padding,
                                           bool need_img, bool need_flow) {
  check_image(img, "img", false);
  check_flow(flow, img, false);
  check_same_shape(grad_out, "grad_out", img, "img", false);
  at::Tensor grad_img = need_img ? at::zeros_like(img) : at::Tensor();
  at::Tensor grad_flow = need_flow ? at::empty_like(flow) : at::Tensor();
  const Shape s = shape_of(img);
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "flow_warp_backward_emulated", [&] {
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* i = img.data_ptr<scalar_t>();
    const scalar_t* f = flow.data_ptr<scalar_t>();
    scalar_t* gi = ptr_or_null<scalar_t>(grad_img);
    scalar_t* gf = ptr_or_null<scalar_t>(grad_flow);
    launch(dim3((s.H * s.W + 255) / 256, s.B), dim3(256),
           [&] { flow_warp_backward_kernel<scalar_t>(go, i, f, gi, gf, s, int(padding)); });
  });
  return {grad_img, grad_flow};
}

template <typename T>
at::Tensor run_ssim(SSIMArgs<T>& a, const at::Tensor& like) {
  const bool grad = a.grad_x || a.grad_y || a.grad_flow;
  at::Tensor acc = at::zeros({a.s.B}, like.options().dtype(at::kDouble));
  at::Tensor partials;
  if (grad) {
    partials = at::empty({a.s.B, a.s.C, a.grad_y ? 4 : 3, a.s.H, a.s.W}, like.options());
    a.partials = partials.data_ptr<T>();
  }
  a.ssim = acc.data_ptr<double>();
  const dim3 grid((a.s.W + kTile - 1) / kTile, (a.s.H + kTile - 1) / kTile, a.s.B);
  const dim3 block(kTile, kTile);
  const bool warp = a.img != nullptr;
  launch(grid, block, [&] {
    if (warp && grad)
      ssim_forward_kernel<T, true, true>(a);
    else if (warp)
      ssim_forward_kernel<T, true, false>(a);
    else if (grad)
      ssim_forward_kernel<T, false, true>(a);
    else
      ssim_forward_kernel<T, false, false>(a);
  });
  if (grad)
    launch(grid, block, [&] {
      if (warp)
        ssim_grad_kernel<T, true>(a);
      else
        ssim_grad_kernel<T, false>(a);
    });
  return acc.to(like.scalar_type());
}

std::vector<at::Tensor> ssim_forward(const at::Tensor& x, const at::Tensor& y, double data_range,
                                     bool want_grad_x, bool want_grad_y) {
  check_image(x, "x", false);
  check_same_shape(y, "y", x, "x", false);
  check_ssim_size(x);
  at::Tensor grad_x = want_grad_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_y = want_grad_y ? at::empty_like(y) : at::Tensor();
  at::Tensor ssim;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_forward_emulated", [&] {
    SSIMArgs<scalar_t> a;
    a.s = shape_of(x);
    a.x = x.data_ptr<scalar_t>();
    a.y = y.data_ptr<scalar_t>();
    a.c1 = scalar_t((0.01 * data_range) * (0.01 * data_range));
    a.c2 = scalar_t((0.03 * data_range) * (0.03 * data_range));
    a.grad_x = ptr_or_null<scalar_t>(grad_x);
    a.grad_y = ptr_or_null<scalar_t>(grad_y);
    ssim = run_ssim(a, x);
  });
  return {ssim, grad_x, grad_y};
}

std::vector<at::Tensor> warp_ssim_forward(const at::Tensor& img, const at::Tensor& flow,
                                          const at::Tensor& ref, int64_t padding,
                                          double data_range, bool want_grad_warped,
                                          bool want_grad_flow, bool want_grad_ref) {
  check_image(img, "img", false);
  check_flow(flow, img, false);
  check_same_shape(ref, "ref", img, "img", false);
  check_ssim_size(img);
  at::Tensor warped = at::empty_like(img);
  at::Tensor grad_warped = want_grad_warped ? at::empty_like(img) : at::Tensor();
  at::Tensor grad_flow = want_grad_flow ? at::empty_like(flow) : at::Tensor();
  at::Tensor grad_ref = want_grad_ref ? at::empty_like(ref) : at::Tensor();
  at::Tensor ssim;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "warp_ssim_forward_emulated", [&] {
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
    ssim = run_ssim(a, img);
  });
  return {ssim, warped, grad_warped, grad_flow, grad_ref};
}

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace warp_kernel;
  m.doc() = "warp_kernel's CUDA kernels run on CPU threads (for tests without a GPU)";
  m.def("flow_warp_forward", &flow_warp_forward);
  m.def("flow_warp_backward", &flow_warp_backward);
  m.def("ssim_forward", &ssim_forward);
  m.def("warp_ssim_forward", &warp_ssim_forward);
}
