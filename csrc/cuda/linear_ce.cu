// CUDA backend of the linear cross-entropy ops (linear_ce_stats,
// linear_ce_backward): the chunk loop and its ATen GEMMs are in
// csrc/frontend/linear_ce.h, the fused chunk kernels in
// linear_ce_kernels.cuh. Also compiled by the host compiler through the SIMT
// emulator (csrc/emu/linear_ce_emulated.cpp) and registered for CPU tensors
// under `logitkit_emulated`, so the tests run these kernels without a GPU.
#include <torch/library.h>

#include "../frontend/linear_ce.h"
#ifndef __CUDACC__
#include "../cpu/linear_ce_cpu_gemm.h"
#endif
#include "device_context.h"
#include "launch_config.h"
#include "linear_ce_kernels.cuh"

namespace logitkit::cuda {
namespace {

// The backend of LinearCeFrontend: one block per tile row.
struct LinearCeBackend {
  static void launch(void (*kernel)(core::LinearCeChunk), const core::LinearCeChunk& c, const at::Tensor& tile) {
    TORCH_CHECK_VALUE(c.rows <= kMaxGridX, "logitkit: at most 2^31 - 1 tokens per chunk on CUDA, got ", c.rows);
    const DeviceContext ctx(tile);
    const int threads = threads_per_block(KernelFamily::linear_ce, c.cols);
    LK_LAUNCH_KERNEL(kernel, dim3(static_cast<unsigned>(c.rows)), dim3(threads), 0, ctx.stream(), c);
    ctx.check_launch();
  }
  static void forward_chunk(const core::LinearCeChunk& c, const at::Tensor& tile) {
    launch(&linear_ce_forward_kernel, c, tile);
  }
  static void backward_chunk(const core::LinearCeChunk& c, const at::Tensor& tile) {
    launch(&linear_ce_backward_kernel, c, tile);
  }
  // bf16/fp16 operands on the tensor cores, fp32 output: always.
  static GemmPath gemm_path(at::ScalarType) { return GemmPath::native; }
  // out (fp32) = a @ b (+ out): cuBLAS with bf16/fp16 operands and fp32
  // accumulation and output (aten::mm.dtype_out / addmm.dtype_out). The
  // emulated build (CPU tensors, where those ops do not exist) takes the CPU
  // native route instead, so the tests run the native path's tile algebra.
  static void native_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
#ifdef __CUDACC__
    if (accumulate) {
      at::addmm_out(out, out, a, b, at::kFloat);
    } else {
      at::mm_out(out, a, b, at::kFloat);
    }
#else
    cpu::native_gemm(out, a, b, accumulate);
#endif
  }
};

}  // namespace
}  // namespace logitkit::cuda

LOGITKIT_CUDA_LIBRARY_IMPL(m) { logitkit::LinearCeFrontend<logitkit::cuda::LinearCeBackend>::register_all(m); }
