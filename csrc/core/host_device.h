// The one host/device function macro of logitkit, for code that runs in CUDA
// kernels and in host code alike (csrc/core math, the kernels' policies):
// under nvcc a forced-inline __host__ __device__ function, under a host
// compiler (CPU kernels, the SIMT emulator) a plain inline one.
#pragma once

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline
#endif
