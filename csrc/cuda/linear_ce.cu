// CUDA backend of the linear cross-entropy ops (linear_ce_stats,
// linear_ce_backward): the chunk loop and its ATen GEMMs are in
// csrc/frontend/linear_ce.h, the fused chunk kernels in
// linear_ce_kernels.cuh. Also compiled by the host compiler through the SIMT
// emulator (csrc/emu/linear_ce_emulated.cpp) and registered for CPU tensors
// under `logitkit_emulated`, so the tests run these kernels without a GPU.
#include <torch/library.h>

#include "../frontend/linear_ce.h"
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
};

}  // namespace
}  // namespace logitkit::cuda

LOGITKIT_CUDA_LIBRARY_IMPL(m) { logitkit::LinearCeFrontend<logitkit::cuda::LinearCeBackend>::register_all(m); }
