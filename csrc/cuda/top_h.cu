// CUDA backend of top_h_mask and sample: the host launch of the kernels of
// top_h_kernels.cuh, registered for the CUDA key of `logitkit`. Like the
// other families, this file is also compiled by the host compiler through the
// SIMT emulator (csrc/emu/top_h_emulated.cpp) and registered for CPU tensors
// under `logitkit_emulated`.
#include <torch/library.h>

#include "../frontend/top_h.h"
#include "device_context.h"
#include "launch_config.h"
#include "top_h_kernels.cuh"

namespace logitkit::cuda {
namespace {

// The backend of TopHFrontend.
struct TopHBackend {
  template <class scalar_t>
  static void top_h_mask(const Rows& r, const TopHParams& p, bool* out) {
    launch<scalar_t>(r, p, "top_h_mask", &top_h_mask_kernel<scalar_t>, out);
  }

  template <class scalar_t>
  static void sample(const Rows& r, const TopHParams& p, const float* uniform, int64_t* out) {
    launch<scalar_t>(r, p, "sample", &sample_kernel<scalar_t>, uniform, out);
  }

  // One block per row; dynamic shared memory for the capped rules' candidates.
  template <class scalar_t, class Kernel, class... Outputs>
  static void launch(const Rows& r, const TopHParams& p, const char* op, Kernel* kernel, Outputs... outputs) {
    TORCH_CHECK_VALUE(r.rows <= kMaxGridX, "logitkit.", op, ": at most 2^31 - 1 rows are supported on CUDA");
    TORCH_CHECK_VALUE(r.cols <= kMaxTopHRowLength, "logitkit.", op, ": at most 2^31 - 1 tokens per row on CUDA");
    const bool capped = p.truncate && p.rule != core::TopHRule::exact;
    TORCH_CHECK_VALUE(!capped || p.k <= kMaxCudaCap, "logitkit.", op, ": cap at most ",
                      kMaxCudaCap, " is supported on CUDA, got ", p.k);
    const DeviceContext ctx(r.tensor);
    const int threads = threads_per_block(KernelFamily::top_h, r.cols);
    const size_t shared_bytes = capped ? static_cast<size_t>(2 * p.k) * sizeof(uint32_t) : 0;
    const RowsView<scalar_t> view{r.tensor.data_ptr<scalar_t>(), r.row_stride};
    LK_LAUNCH_KERNEL(kernel, dim3(static_cast<unsigned>(r.rows)), dim3(threads), shared_bytes, ctx.stream(), view,
                     r.cols, p, outputs...);
    ctx.check_launch();
  }
};

}  // namespace
}  // namespace logitkit::cuda

LOGITKIT_CUDA_LIBRARY_IMPL(m) { logitkit::TopHFrontend<logitkit::cuda::TopHBackend>::register_all(m); }
