// CUDA backend of top_h_mask and sample: the host launch of the kernels of
// top_h_kernels.cuh, registered for the CUDA key of `logitkit`. Like the
// other families, this file is also compiled by the host compiler through the
// SIMT emulator (csrc/emu/top_h_emulated.cpp) and registered for CPU tensors
// under `logitkit_emulated`.
#include <algorithm>

#include <torch/library.h>

#include "../frontend/row_filters.h"
#include "../frontend/top_h.h"
#include "device_context.h"
#include "launch_config.h"
#include "row_filters_kernels.cuh"
#include "top_h_kernels.cuh"

namespace logitkit::cuda {
namespace {

// The kept set a call selects (see Selection).
Selection selection_of(const TopHParams& p) {
  if (!p.truncate) return Selection::all;
  return p.rule == core::TopHRule::exact ? Selection::exact : Selection::capped;
}

// The backend of TopHFrontend: one block per row, the selection chosen at
// compile time from the rule.
struct TopHBackend {
  template <class scalar_t>
  static void top_h_mask(const Rows& r, const TopHParams& p, bool* out) {
    // top_h_mask always truncates (alpha is required): no Selection::all.
    if (selection_of(p) == Selection::exact) {
      launch<scalar_t>(r, p, "top_h_mask", &top_h_mask_kernel<Selection::exact, scalar_t>, out);
    } else {
      launch<scalar_t>(r, p, "top_h_mask", &top_h_mask_kernel<Selection::capped, scalar_t>, out);
    }
  }

  template <class scalar_t>
  static void sample(const Rows& r, const TopHParams& p, const float* uniform, int64_t* out) {
    switch (selection_of(p)) {
      case Selection::all:
        return launch<scalar_t>(r, p, "sample", &sample_kernel<Selection::all, scalar_t>, uniform, out);
      case Selection::capped:
        return launch<scalar_t>(r, p, "sample", &sample_kernel<Selection::capped, scalar_t>, uniform, out);
      case Selection::exact:
        return launch<scalar_t>(r, p, "sample", &sample_kernel<Selection::exact, scalar_t>, uniform, out);
      case Selection::rank:  // the sampler family's top-k selection, never a Top-H rule (selection_of)
        break;
    }
  }

  // One block per row; dynamic shared memory for the capped rules' candidates.
  template <class scalar_t, class Kernel, class... Outputs>
  static void launch(const Rows& r, const TopHParams& p, const char* op, Kernel* kernel, Outputs... outputs) {
    TORCH_CHECK_VALUE(r.rows <= kMaxGridX, "logitkit.", op, ": at most 2^31 - 1 rows are supported on CUDA");
    TORCH_CHECK_VALUE(r.cols <= kMaxTopHRowLength, "logitkit.", op, ": at most 2^31 - 1 tokens per row on CUDA");
    const bool capped = selection_of(p) == Selection::capped;
    TORCH_CHECK_VALUE(!capped || p.k <= kMaxCudaCap, "logitkit.", op, ": cap at most ", kMaxCudaCap,
                      " is supported on CUDA, got ", p.k);
    const DeviceContext ctx(r.tensor);
    const int threads = threads_per_block(KernelFamily::top_h, r.cols);
    const size_t shared_bytes = capped ? static_cast<size_t>(2 * p.k) * sizeof(uint32_t) : 0;
    // With the static TopHStorage (about 42 KiB) a large cap passes 48 KiB.
    if (shared_bytes > 0) ctx.allow_dynamic_shared(kernel, shared_bytes);
    const RowsView<scalar_t> view{r.tensor.data_ptr<scalar_t>(), r.row_stride};
    LK_LAUNCH_KERNEL(kernel, dim3(static_cast<unsigned>(r.rows)), dim3(threads), shared_bytes, ctx.stream(), view,
                     r.cols, p, outputs...);
    ctx.check_launch();
  }
};

// The backend of RowFiltersFrontend (the row-statistics sampler ops,
// row_filters_kernels.cuh): one block per row.
struct RowFiltersBackend {
  template <class scalar_t>
  static void filter_mask(const Rows& r, const float* params, bool* out) {
    launch<scalar_t>(r, "filter_mask", &filter_write_kernel<scalar_t, bool>, params, 0.0f, out);
  }
  template <class scalar_t>
  static void filter_logits(const Rows& r, const float* params, float filter_value, scalar_t* out) {
    launch<scalar_t>(r, "filter_logits", &filter_write_kernel<scalar_t, scalar_t>, params, filter_value, out);
  }
  template <class scalar_t>
  static void filter_sample(const Rows& r, const float* params, const float* uniform, bool raw_log_prob,
                            int64_t* tokens, float* stats) {
    if (raw_log_prob) {
      launch<scalar_t>(r, "filter_sample", &filter_sample_kernel<true, scalar_t>, params, uniform, tokens, stats);
    } else {
      launch<scalar_t>(r, "filter_sample", &filter_sample_kernel<false, scalar_t>, params, uniform, tokens, stats);
    }
  }
  static void philox_uniform(const at::Tensor& seed, const at::Tensor& offset, at::Tensor& out) {
    const DeviceContext ctx(seed);
    constexpr int kThreads = 128;
    const int64_t n = out.numel();
    TORCH_CHECK_VALUE(n / kThreads < kMaxGridX, "logitkit.philox_uniform: too many rows for one launch");
    LK_LAUNCH_KERNEL(philox_uniform_kernel, dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)), dim3(kThreads),
                     0, ctx.stream(), seed.data_ptr<int64_t>(), offset.data_ptr<int64_t>(), n, out.data_ptr<float>());
    ctx.check_launch();
  }

  template <class scalar_t, class Kernel, class... Args>
  static void launch(const Rows& r, const char* op, Kernel* kernel, Args... args) {
    TORCH_CHECK_VALUE(r.rows <= kMaxGridX, "logitkit.", op, ": at most 2^31 - 1 rows are supported on CUDA");
    const DeviceContext ctx(r.tensor);
    const int threads = std::min(threads_per_block(KernelFamily::top_h, r.cols), kMaxFilterThreads);
    // Dynamic shared memory: top-k's crossing keys and their selection's
    // scratch (TopKCrossingShared), past the 48 KiB without opt-in together
    // with the static RowFilterStorage. Two blocks per SM (the kernels' launch
    // bounds) take about 156 KiB of an SM's shared memory: 164 KiB on sm_80,
    // 228 KiB on sm_90.
    ctx.allow_dynamic_shared(kernel, kTopKCrossingBytes);
    const RowsView<scalar_t> view{r.tensor.data_ptr<scalar_t>(), r.row_stride};
    LK_LAUNCH_KERNEL(kernel, dim3(static_cast<unsigned>(r.rows)), dim3(threads), kTopKCrossingBytes, ctx.stream(), view,
                     r.cols, args...);
    ctx.check_launch();
  }
};

}  // namespace
}  // namespace logitkit::cuda

LOGITKIT_CUDA_LIBRARY_IMPL(m) {
  logitkit::TopHFrontend<logitkit::cuda::TopHBackend>::register_all(m);
  logitkit::RowFiltersFrontend<logitkit::cuda::RowFiltersBackend>::register_all(m);
}
