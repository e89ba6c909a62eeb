// Host side of a CUDA op: the launch context (device guard, current stream,
// SM count, launch checks) and the registration of a file's CUDA kernels.
// Under the SIMT emulator these are stand-ins, so the host wrappers of the
// CUDA kernels compile (and are tested) unchanged.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../simt/simt.h"

#if !LK_EMULATED_CUDA
#include <map>
#include <mutex>
#include <utility>

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
  template <class Kernel>
  void allow_dynamic_shared(Kernel*, size_t) const {}
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
  // Lets `kernel` take `bytes` of dynamic shared memory beyond the 48 KiB a
  // block gets without opting in (static + dynamic; sm_80: up to 163 KiB,
  // sm_90: 227 KiB). A per-kernel, per-device attribute (no synchronisation),
  // set only when a launch asks for more than it was last set to on this
  // device, not on every launch.
  template <class Kernel>
  void allow_dynamic_shared(Kernel* kernel, size_t bytes) const {
    const auto function = reinterpret_cast<const void*>(kernel);
    const std::pair<const void*, int> key{function, static_cast<int>(guard_.current_device().index())};
    static std::mutex mutex;
    static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> bytes set
    const std::lock_guard<std::mutex> lock(mutex);
    size_t& current = allowed[key];
    if (bytes <= current) return;
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    current = bytes;
  }
  void check_launch() const { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

 private:
  c10::cuda::CUDAGuard guard_;
};

#endif

}  // namespace logitkit::cuda
