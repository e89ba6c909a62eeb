// CUDA backend of the linear cross-entropy ops (linear_ce_stats,
// linear_ce_backward): the chunk loop and its ATen GEMMs are in
// csrc/common/linear_ce_driver.h, the fused chunk kernels in
// linear_ce_kernels.cuh. Also compiled by the host compiler through the SIMT
// emulator (csrc/emu/linear_ce_emulated.cpp) and registered for CPU tensors
// under `logitkit_emulated`, so the tests run these kernels without a GPU.
#include <torch/library.h>

#include "../common/linear_ce_driver.h"
#include "../simt/device_context.h"
#include "linear_ce_kernels.cuh"

namespace logitkit::cuda_impl {
namespace {

int lce_threads(int64_t cols) {
#if LK_EMULATED_CUDA
  (void)cols;
  return simt::emulated_launch_shape().threads_per_block.load();
#else
  return cols >= 4096 ? 512 : (cols >= 512 ? 256 : 128);
#endif
}

struct CudaLceBackend {
  static void launch(void (*kernel)(core::LceChunk), const LceChunk& c, const at::Tensor& tile) {
    TORCH_CHECK_VALUE(c.rows <= 2147483647LL, "logitkit: at most 2^31 - 1 tokens per chunk on CUDA, got ", c.rows);
    const simt::DeviceContext ctx(tile);
    LK_LAUNCH_KERNEL(kernel, dim3(static_cast<unsigned>(c.rows)), dim3(lce_threads(c.cols)), 0, ctx.stream(), c);
    ctx.check_launch();
  }
  static void forward_chunk(const LceChunk& c, const at::Tensor& tile) { launch(&kernels::lce_forward_kernel, c, tile); }
  static void backward_chunk(const LceChunk& c, const at::Tensor& tile) {
    launch(&kernels::lce_backward_kernel, c, tile);
  }
};

}  // namespace
}  // namespace logitkit::cuda_impl

#if LK_EMULATED_CUDA
#define LOGITKIT_LCE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(logitkit_emulated, CPU, m)
#else
#define LOGITKIT_LCE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(logitkit, CUDA, m)
#endif

LOGITKIT_LCE_LIBRARY_IMPL(m) { logitkit::LinearCeFrontends<logitkit::cuda_impl::CudaLceBackend>::register_all(m); }
