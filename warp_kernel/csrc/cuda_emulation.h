// Just enough of CUDA's device-side C++ to run warp_ssim_kernels.cuh on CPU threads, for tests
// on machines without a GPU: one std::thread per CUDA thread, blocks one after another,
// __syncthreads() a barrier of the block, __shared__ a static (one block runs at a time),
// warp shuffles through a per-block exchange buffer, atomics under a mutex. Slow, and meant
// only for small images; it checks the kernels' indexing, halos, reductions and scatters.
#pragma once

#include <barrier>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define WARP_KERNEL_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __launch_bounds__(n)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace warp_kernel::emulation {

struct Block {
  explicit Block(int threads) : barrier(threads), exchange(threads * sizeof(double)) {}
  std::barrier<> barrier;
  std::vector<char> exchange;
};

inline thread_local Block* current_block = nullptr;
inline thread_local int current_tid = 0;
inline std::mutex atomic_mutex;

// Runs kernel() once per thread of every block of the grid.
template <typename Kernel>
void launch(dim3 grid, dim3 block, const Kernel& kernel);

}  // namespace warp_kernel::emulation

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { warp_kernel::emulation::current_block->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned, T value, int offset) {
  using namespace warp_kernel::emulation;
  T* exchange = reinterpret_cast<T*>(current_block->exchange.data());
  exchange[current_tid] = value;
  __syncthreads();
  const int lane = current_tid % 32;
  const T result = lane + offset < 32 ? exchange[current_tid + offset] : value;
  __syncthreads();
  return result;
}

template <typename T>
T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(warp_kernel::emulation::atomic_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}

namespace warp_kernel::emulation {

template <typename Kernel>
void launch(dim3 grid, dim3 block, const Kernel& kernel) {
  const int threads = int(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block shared_state(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx.x = t % block.x;
            threadIdx.y = (t / block.x) % block.y;
            threadIdx.z = t / (block.x * block.y);
            blockIdx.x = bx;
            blockIdx.y = by;
            blockIdx.z = bz;
            blockDim = block;
            gridDim = grid;
            current_block = &shared_state;
            current_tid = t;
            kernel();
          });
        for (auto& thread : pool) thread.join();
      }
}

}  // namespace warp_kernel::emulation
