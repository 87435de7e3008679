// The Python-visible ops, shared by the CPU, CUDA and emulated-CUDA extensions: input checks,
// output allocation, dtype dispatch and the module's functions. Each extension supplies a
// Backend with
//   static constexpr bool kCuda;                       // the device the tensors must be on
//   struct Scope { explicit Scope(const at::Tensor&); };  // e.g. device guard + stream
//   template <typename T> static void warp(const WarpArgs<T>&, const at::Tensor& like, Scope&);
//   template <typename T> static void warp_backward(WarpArgs<T>&, const at::Tensor& like,
//                                                   Scope&);  // grad_img zeroed, or null
//   template <typename T> static at::Tensor ssim(SSIMArgs<T>&, const at::Tensor& like,
//                                                Scope&);  // -> (B,) mean SSIM, like's dtype
// (like: an input, whose options scratch tensors take).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>  // tensor <-> Python (much lighter than torch/extension.h)

#include <cstring>
#include <vector>

#include "warp_ssim_args.h"
#include "warp_ssim_checks.h"

namespace warp_kernel {

template <typename Backend>
struct Ops {
  static at::Tensor flow_warp_forward(const at::Tensor& img, const at::Tensor& flow,
                                      int64_t padding) {
    check_image(img, "img", Backend::kCuda);
    check_flow(flow, img, Backend::kCuda);
    check_padding(padding);
    typename Backend::Scope scope(img);
    at::Tensor out = at::empty_like(img);
    AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "flow_warp_forward", [&] {
      WarpArgs<scalar_t> a = warp_args<scalar_t>(img, flow, padding);
      a.out = out.data_ptr<scalar_t>();
      Backend::warp(a, img, scope);
    });
    return out;
  }

  // -> [grad_img or None, grad_flow or None]
  static std::vector<at::Tensor> flow_warp_backward(const at::Tensor& grad_out,
                                                    const at::Tensor& img,
                                                    const at::Tensor& flow, int64_t padding,
                                                    bool need_img, bool need_flow) {
    check_image(img, "img", Backend::kCuda);
    check_flow(flow, img, Backend::kCuda);
    check_same_shape(grad_out, "grad_out", img, "img", Backend::kCuda);
    check_padding(padding);
    typename Backend::Scope scope(img);
    at::Tensor grad_img = need_img ? at::zeros_like(img) : at::Tensor();  // scattered into
    at::Tensor grad_flow = need_flow ? at::empty_like(flow) : at::Tensor();
    if (!need_img && !need_flow) return {grad_img, grad_flow};
    AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "flow_warp_backward", [&] {
      WarpArgs<scalar_t> a = warp_args<scalar_t>(img, flow, padding);
      a.grad_out = grad_out.data_ptr<scalar_t>();
      a.grad_img = ptr_or_null<scalar_t>(grad_img);
      a.grad_flow = ptr_or_null<scalar_t>(grad_flow);
      Backend::warp_backward(a, img, scope);
    });
    return {grad_img, grad_flow};
  }

  // -> [ssim (B,), d ssim/d x per unit grad or None, d ssim/d y per unit grad or None]
  static std::vector<at::Tensor> ssim_forward(const at::Tensor& x, const at::Tensor& y,
                                              double data_range, bool want_grad_x,
                                              bool want_grad_y) {
    check_image(x, "x", Backend::kCuda);
    check_same_shape(y, "y", x, "x", Backend::kCuda);
    check_ssim_size(x);
    check_data_range(data_range);
    typename Backend::Scope scope(x);
    at::Tensor grad_x = want_grad_x ? at::empty_like(x) : at::Tensor();
    at::Tensor grad_y = want_grad_y ? at::empty_like(y) : at::Tensor();
    at::Tensor ssim;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_forward", [&] {
      SSIMArgs<scalar_t> a = args<scalar_t>(x, data_range);
      a.x = x.data_ptr<scalar_t>();
      a.y = y.data_ptr<scalar_t>();
      a.grad_x = ptr_or_null<scalar_t>(grad_x);
      a.grad_y = ptr_or_null<scalar_t>(grad_y);
      ssim = Backend::ssim(a, x, scope);
    });
    return {ssim, grad_x, grad_y};
  }

  // -> [ssim (B,), warped, and per unit grad_ssim: d ssim/d warped (for the image gradient),
  //     d ssim/d flow, d ssim/d ref, each None unless wanted]
  static std::vector<at::Tensor> warp_ssim_forward(const at::Tensor& img, const at::Tensor& flow,
                                                   const at::Tensor& ref, int64_t padding,
                                                   double data_range, bool want_grad_warped,
                                                   bool want_grad_flow, bool want_grad_ref) {
    check_image(img, "img", Backend::kCuda);
    check_flow(flow, img, Backend::kCuda);
    check_same_shape(ref, "ref", img, "img", Backend::kCuda);
    check_ssim_size(img);
    check_padding(padding);
    check_data_range(data_range);
    typename Backend::Scope scope(img);
    at::Tensor warped = at::empty_like(img);
    at::Tensor grad_warped = want_grad_warped ? at::empty_like(img) : at::Tensor();
    at::Tensor grad_flow = want_grad_flow ? at::empty_like(flow) : at::Tensor();
    at::Tensor grad_ref = want_grad_ref ? at::empty_like(ref) : at::Tensor();
    at::Tensor ssim;
    AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "warp_ssim_forward", [&] {
      SSIMArgs<scalar_t> a = args<scalar_t>(img, data_range);
      a.img = img.data_ptr<scalar_t>();
      a.flow = flow.data_ptr<scalar_t>();
      a.padding = int(padding);
      a.y = ref.data_ptr<scalar_t>();
      a.warped = warped.data_ptr<scalar_t>();
      a.grad_x = ptr_or_null<scalar_t>(grad_warped);
      a.grad_y = ptr_or_null<scalar_t>(grad_ref);
      a.grad_flow = ptr_or_null<scalar_t>(grad_flow);
      ssim = Backend::ssim(a, img, scope);
    });
    return {ssim, warped, grad_warped, grad_flow, grad_ref};
  }

  static at::Tensor gaussian_taps() {
    const double d[kTaps] = {WARP_KERNEL_GAUSS_TAPS};
    at::Tensor t = at::empty({kTaps}, at::TensorOptions().dtype(at::kDouble));
    std::memcpy(t.data_ptr<double>(), d, sizeof(d));
    return t;
  }

  static void define(pybind11::module& m, const char* doc) {
    m.doc() = doc;
    m.def("flow_warp_forward", &flow_warp_forward,
          "img (B,C,H,W), flow (B,2,H,W), padding code");
    m.def("flow_warp_backward", &flow_warp_backward,
          "grad_out, img, flow, padding, need_img, need_flow -> [grad_img, grad_flow]");
    m.def("ssim_forward", &ssim_forward,
          "x, y, data_range, want_grad_x, want_grad_y -> [ssim (B,), unit grad_x, unit grad_y]");
    m.def("warp_ssim_forward", &warp_ssim_forward,
          "img, flow, ref, padding, data_range, want_grad_warped, want_grad_flow, want_grad_ref"
          " -> [ssim (B,), warped, unit grad_warped, unit grad_flow, unit grad_ref]");
    m.def("gaussian_taps", &gaussian_taps, "the 11 window taps (float64)");
  }

 private:
  static Shape shape_of(const at::Tensor& t) {
    return Shape{int(t.size(0)), int(t.size(1)), int(t.size(2)), int(t.size(3))};
  }

  template <typename T>
  static T* ptr_or_null(at::Tensor& t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
  }

  template <typename T>
  static WarpArgs<T> warp_args(const at::Tensor& img, const at::Tensor& flow, int64_t padding) {
    WarpArgs<T> a;
    a.s = shape_of(img);
    a.padding = int(padding);
    a.img = img.data_ptr<T>();
    a.flow = flow.data_ptr<T>();
    return a;
  }

  // The shape and the SSIM constants c1 = (0.01 L)^2, c2 = (0.03 L)^2.
  template <typename T>
  static SSIMArgs<T> args(const at::Tensor& like, double data_range) {
    SSIMArgs<T> a;
    a.s = shape_of(like);
    a.c1 = T((0.01 * data_range) * (0.01 * data_range));
    a.c2 = T((0.03 * data_range) * (0.03 * data_range));
    return a;
  }
};

}  // namespace warp_kernel
