// Input checks shared by the CPU and CUDA bindings: every bad input becomes a Python
// RuntimeError naming the argument, never a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>

#include "warp_ssim_math.h"

namespace warp_kernel {

// (B, C, H, W) float32/float64, contiguous, on the expected device type.
inline void check_image(const at::Tensor& t, const char* name, bool cuda) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.dim() == 4, name, " must be (B, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_cuda() == cuda, name, " must be a ", cuda ? "CUDA" : "CPU",
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (NCHW); call .contiguous()");
  TORCH_CHECK(t.numel() < std::numeric_limits<int>::max(), name, " is too large (",
              t.numel(), " elements; the kernels index with 32-bit ints)");
  TORCH_CHECK(t.size(0) > 0 && t.size(1) > 0 && t.size(2) > 0 && t.size(3) > 0, name,
              " must not be empty, got shape ", t.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " (", t.scalar_type(), ") and ",
              ref_name, " (", ref.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(t.device() == ref.device(), name, " (", t.device(), ") and ", ref_name, " (",
              ref.device(), ") must be on the same device");
}

// flow: (B, 2, H, W) matching img.
inline void check_flow(const at::Tensor& flow, const at::Tensor& img, bool cuda) {
  check_image(flow, "flow", cuda);
  check_like(flow, "flow", img, "img");
  TORCH_CHECK(flow.size(0) == img.size(0) && flow.size(1) == 2 &&
                  flow.size(2) == img.size(2) && flow.size(3) == img.size(3),
              "flow must be (B, 2, H, W) = (", img.size(0), ", 2, ", img.size(2), ", ",
              img.size(3), ") to match img, got ", flow.sizes());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name, bool cuda) {
  check_image(t, name, cuda);
  check_like(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
}

inline void check_ssim_size(const at::Tensor& t) {
  TORCH_CHECK(t.size(2) >= kMinSize && t.size(3) >= kMinSize,
              "SSIM needs images of at least ", kMinSize, "x", kMinSize,
              " pixels (one 11-tap Gaussian window), got H=", t.size(2), ", W=", t.size(3));
}

inline void check_padding(int64_t padding) {
  TORCH_CHECK(padding == kBorder || padding == kReflection,
              "padding code must be 0 (border) or 1 (reflection), got ", padding);
}

inline void check_data_range(double data_range) {
  TORCH_CHECK(data_range > 0, "data_range must be positive, got ", data_range);
}

}  // namespace warp_kernel
