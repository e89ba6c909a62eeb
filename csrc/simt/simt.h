// The one include of every CUDA kernel source of logitkit.
//
// Under nvcc it is plain CUDA. Under a host compiler it pulls in our SIMT
// emulation (simt_emulation.h), so the same kernel source runs on the CPU in
// the test suite. Kernels must therefore:
//   * use only the intrinsics the emulator provides (no CUB, no inline PTX);
//   * always use the *_sync warp intrinsics with the mask of the lanes that
//     really execute them (see cuda::warp_live_mask());
//   * launch through LK_LAUNCH_KERNEL instead of <<< >>>;
//   * get dynamic shared memory through LK_DYNAMIC_SHARED;
//   * read their input rows through a load function that calls
//     LK_COUNT_ROW_READ (the emulator's pass counting; nothing under nvcc).
#pragma once

#include "../core/host_device.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define LK_DEVICE __device__
#define LK_EMULATED_CUDA 0
// Launches `kernel` on `stream`. The kernel is a function pointer variable so
// that template arguments need no parentheses inside the macro.
#define LK_LAUNCH_KERNEL(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__)
#define LK_DYNAMIC_SHARED(type, name)                              \
  extern __shared__ __align__(16) unsigned char lk_dynamic_smem[]; \
  type* name = reinterpret_cast<type*>(lk_dynamic_smem)
#define LK_COUNT_ROW_READ() ((void)0)
#else
#include "simt_emulation.h"
#define LK_DEVICE
#define LK_EMULATED_CUDA 1
#define LK_LAUNCH_KERNEL(kernel, grid, block, shared_bytes, stream, ...) \
  ::logitkit::simt::launch((grid), (block), (shared_bytes), [&] { kernel(__VA_ARGS__); })
#define LK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::logitkit::simt::dynamic_shared_memory())
#define LK_COUNT_ROW_READ() ::logitkit::simt::count_row_read()
#endif
