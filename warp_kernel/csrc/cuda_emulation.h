// Just enough of CUDA to run warp_ssim_kernels.cuh and its launchers on CPU threads, for tests
// on machines without a GPU:
//   - one std::thread per CUDA thread; all the threads of a block are started before any of
//     them runs the kernel, so that they run concurrently and unsynchronised writes can race;
//   - blocks one after another, in a different shuffled order at every launch, so that a
//     result which depends on the order of the blocks changes from run to run;
//   - launch configurations checked against CUDA's limits (cudaErrorInvalidConfiguration);
//   - __syncthreads() a barrier of the block, __shared__ a static (one block runs at a time;
//     zeroed once, not per block), warp shuffles through a per-block exchange buffer;
//   - a stream is a label (cudaStream_t), which the launcher records (warp_ssim_emulated.cpp);
//   - block_ranges: run only some blocks of a grid too large to run whole.
// No atomics: the kernels use none. Slow; meant for small images, or a few blocks of large ones.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <thread>
#include <utility>
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

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "invalid configuration argument";
}
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace warp_kernel::emulation {

struct Block {
  explicit Block(int threads) : barrier(threads), exchange(threads * sizeof(double)) {}
  std::barrier<> barrier;
  std::vector<char> exchange;
};

inline thread_local Block* current_block = nullptr;
inline thread_local int current_tid = 0;

// The blocks [start, stop) of every grid, by linear index (x + X * (y + Y * z)); negative
// values count from the end, as Python's slices do. Empty: every block.
inline std::vector<std::pair<int64_t, int64_t>> block_ranges;
inline uint64_t launch_count = 0;  // seeds the order of the blocks of each launch

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

namespace warp_kernel::emulation {

// CUDA's limits on a launch (every GPU since compute capability 3.0).
inline bool valid_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535 &&
         grid.z >= 1 && grid.z <= 65535 && block.x <= 1024 && block.y <= 1024 &&
         block.z <= 64 && threads >= 1 && threads <= 1024;
}

// The linear indices of the blocks to run (see block_ranges), shuffled with a seed that
// changes at every launch.
inline std::vector<int64_t> blocks_to_run(int64_t count) {
  std::vector<int64_t> ids;
  auto add = [&](int64_t start, int64_t stop) {
    start = std::max<int64_t>(start < 0 ? start + count : start, 0);
    stop = std::min<int64_t>(stop < 0 ? stop + count : stop, count);
    for (int64_t i = start; i < stop; ++i) ids.push_back(i);
  };
  if (block_ranges.empty()) add(0, count);
  for (const auto& [start, stop] : block_ranges) add(start, stop);
  uint64_t state = ++launch_count * 0x9E3779B97F4A7C15ull;
  for (size_t i = ids.size(); i > 1; --i) {  // Fisher-Yates with a splitmix64 stream
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    std::swap(ids[i - 1], ids[(z ^ (z >> 31)) % i]);
  }
  return ids;
}

// Runs kernel() once per thread of every block of the grid, as a launch would.
template <typename Kernel>
cudaError_t launch(dim3 grid, dim3 block, const Kernel& kernel) {
  if (!valid_configuration(grid, block)) return cudaErrorInvalidConfiguration;
  const int threads = int(block.x * block.y * block.z);
  for (const int64_t id : blocks_to_run(int64_t(grid.x) * grid.y * grid.z)) {
    const uint3 at{unsigned(id % grid.x), unsigned(id / grid.x % grid.y),
                   unsigned(id / (int64_t(grid.x) * grid.y))};
    Block shared_state(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx.x = t % block.x;
        threadIdx.y = (t / block.x) % block.y;
        threadIdx.z = t / (block.x * block.y);
        blockIdx = at;
        blockDim = block;
        gridDim = grid;
        current_block = &shared_state;
        current_tid = t;
        shared_state.barrier.arrive_and_wait();  // every thread of the block exists: go
        kernel();
      });
    for (auto& thread : pool) thread.join();
  }
  return cudaSuccess;
}

}  // namespace warp_kernel::emulation
