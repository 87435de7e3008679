// Launchers of the CUDA kernels (defined in warp_ssim_kernels.cuh), on raw pointers and a
// stream; each returns the first launch error. Kept free of torch headers so that nvcc compiles
// warp_ssim_cuda.cu quickly; warp_ssim_cuda_backend.h binds them to the ops. In the emulation
// cuda_emulation.h provides cudaError_t and cudaStream_t.
#pragma once

#ifndef WARP_KERNEL_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif

#include "warp_ssim_args.h"

namespace warp_kernel {

// a.out = the warp of a.img by a.flow.
template <typename T>
cudaError_t launch_warp_forward(const WarpArgs<T>& a, cudaStream_t stream);

// a.grad_flow (if set) from a.grad_out, and a.corner (if set): the top-left corner each output
// pixel samples.
template <typename T>
cudaError_t launch_warp_backward(const WarpArgs<T>& a, cudaStream_t stream);

// a.grad_img from a.grad_out, gathered along a.order and a.first (see WarpArgs).
template <typename T>
cudaError_t launch_warp_image_grad(const WarpArgs<T>& a, cudaStream_t stream);

// The fused SSIM (see SSIMArgs; a.tile_sums, and a.partials for a gradient, must be set).
template <typename T>
cudaError_t launch_ssim(const SSIMArgs<T>& a, cudaStream_t stream);

}  // namespace warp_kernel
