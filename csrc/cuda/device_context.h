// Host side of a CUDA op: the launch context (device guard, current stream,
// SM count, launch checks) and the registration of a file's CUDA kernels.
// Under the SIMT emulator these are stand-ins, so the host wrappers of the
// CUDA kernels compile (and are tested) unchanged.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../simt/simt.h"

#if !LK_EMULATED_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Registers the CUDA kernels of the file that uses it: for the CUDA key of
// `logitkit` under nvcc, and, compiled through the SIMT emulator
// (csrc/emu/*_emulated.cpp), for CPU tensors under `logitkit_emulated`.
#if LK_EMULATED_CUDA
#define LOGITKIT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(logitkit_emulated, CPU, m)
#else
#define LOGITKIT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(logitkit, CUDA, m)
#endif

namespace logitkit::cuda {

#if LK_EMULATED_CUDA

class DeviceContext {
 public:
  explicit DeviceContext(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
  int multiprocessors() const { return 2; }
  void check_launch() const {}
};

#else

class DeviceContext {
 public:
  explicit DeviceContext(const at::Tensor& t) : guard_(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  int multiprocessors() const {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, guard_.current_device().index()));
    return count;
  }
  void check_launch() const { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

 private:
  c10::cuda::CUDAGuard guard_;
};

#endif

}  // namespace logitkit::cuda
