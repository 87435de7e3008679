// Launchers of the CUDA kernels, on raw pointers. Kept free of torch headers so that nvcc
// compiles warp_ssim_cuda.cu quickly; warp_ssim_cuda.cpp binds them to the ops.
#pragma once

#ifndef WARP_KERNEL_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif

#include "warp_ssim_args.h"

namespace warp_kernel {

#ifndef WARP_KERNEL_CUDA_EMULATION
template <typename T>
cudaError_t launch_flow_warp_forward(const T* img, const T* flow, T* out, Shape s, int padding,
                                     cudaStream_t stream);

// grad_img (zero-initialised) and grad_flow are optional.
template <typename T>
cudaError_t launch_flow_warp_backward(const T* grad_out, const T* img, const T* flow, T* grad_img,
                                      T* grad_flow, Shape s, int padding, cudaStream_t stream);

template <typename T>
cudaError_t launch_ssim(const SSIMArgs<T>& args, cudaStream_t stream);
#endif

}  // namespace warp_kernel
