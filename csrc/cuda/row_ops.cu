// CUDA implementations of the row ops (softmax, log_softmax, logsumexp,
// entropy, softmax_stats and their backwards), registered for the CUDA
// dispatch key of `logitkit`.
//
// The same file is compiled by the host compiler through the SIMT emulator
// (csrc/emu/row_ops_emulated.cpp) and registered for CPU tensors under the
// `logitkit_emulated` namespace, so the tests run these kernels and these
// host wrappers (launch plan, workspace, dtype dispatch) without a GPU.
#include <algorithm>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../core/row_ops.h"
#include "../frontend/row_ops.h"
#include "device_context.h"
#include "launch_config.h"
#include "row_kernels.cuh"

namespace logitkit::cuda {
namespace {

struct LaunchPlan {
  int threads = 0;
  int64_t splits = 1;
  int64_t chunk = 0;  // elements of a row per block
};

// Slices of a row per block: enough that rows * splits fills the GPU about
// kBlocksPerSm times (batch-1 decoding still uses many SMs), but each thread
// keeps at least kMinPacksPerThread packs (16-byte loads) of work. The
// emulated build splits by the test suite's max_elements_per_block instead.
int64_t planned_splits(int64_t rows, int64_t cols, int element_bytes, int threads, const DeviceContext& ctx) {
#if LK_EMULATED_CUDA
  (void)rows, (void)element_bytes, (void)threads, (void)ctx;
  const int64_t max_per_block = emulated_launch_shape().max_elements_per_block.load();
  return max_per_block > 0 ? (cols + max_per_block - 1) / max_per_block : 1;
#else
  const int64_t pack = kPackBytes / element_bytes;
  const int64_t target_blocks = kBlocksPerSm * ctx.multiprocessors();
  const int64_t min_per_block = kMinPacksPerThread * threads * pack;
  const int64_t wanted = (target_blocks + rows - 1) / rows;
  const int64_t affordable = std::max<int64_t>(1, cols / min_per_block);
  return std::max<int64_t>(1, std::min(wanted, affordable));
#endif
}

// One block per (row, slice); slices start on a kSliceAlignElements boundary
// so that aligned rows stay aligned.
LaunchPlan plan_launch(int64_t rows, int64_t cols, int element_bytes, const DeviceContext& ctx) {
  LaunchPlan plan;
  plan.threads = threads_per_block(KernelFamily::row_ops, cols);
  plan.splits = std::min<int64_t>(planned_splits(rows, cols, element_bytes, plan.threads, ctx), kMaxGridY);
  plan.chunk = (cols + plan.splits - 1) / plan.splits;
  plan.chunk = (plan.chunk + kSliceAlignElements - 1) / kSliceAlignElements * kSliceAlignElements;
  plan.splits = (cols + plan.chunk - 1) / plan.chunk;
  return plan;
}

template <class scalar_t>
RowsView<scalar_t> rows_view(const Rows* r) {
  return r != nullptr ? RowsView<scalar_t>{r->tensor.data_ptr<scalar_t>(), r->row_stride}
                      : RowsView<scalar_t>{nullptr, 0};
}

void check_grid(int64_t rows) {
  TORCH_CHECK_VALUE(rows <= kMaxGridX, "logitkit: at most 2^31 - 1 rows are supported on CUDA, got ", rows);
}

dim3 row_slice_grid(const Rows& shape, const LaunchPlan& plan) {
  return dim3(static_cast<unsigned>(shape.rows), static_cast<unsigned>(plan.splits));
}

// Pass 1 of every op: per-(row, slice) partial states in a device workspace.
template <class Op, class scalar_t>
at::Tensor launch_partials(const Op& op, RowsView<scalar_t> a, RowsView<scalar_t> b, const Rows& shape,
                           const LaunchPlan& plan, const DeviceContext& ctx) {
  using State = typename Op::State;
  at::Tensor workspace = at::empty({static_cast<int64_t>(shape.rows * plan.splits * sizeof(State))},
                                   shape.tensor.options().dtype(at::kByte));
  auto* partials = reinterpret_cast<State*>(workspace.data_ptr());
  auto* kernel = &row_partials_kernel<Op, scalar_t>;
  LK_LAUNCH_KERNEL(kernel, row_slice_grid(shape, plan), dim3(plan.threads), 0, ctx.stream(), op, a, b, shape.cols,
                   plan.chunk, partials);
  ctx.check_launch();
  return workspace;
}

// reduce + elementwise map: out[r, i] = op.output(row constants, a[r, i], b[r, i]).
template <class Op, class scalar_t>
void run_map(const Op& op, const MapArgs<scalar_t>& args, const DeviceContext& ctx) {
  const Rows& shape = *args.a;
  check_grid(shape.rows);
  const LaunchPlan plan = plan_launch(shape.rows, shape.cols, sizeof(scalar_t), ctx);
  const RowsView<scalar_t> a = rows_view<scalar_t>(args.a), b = rows_view<scalar_t>(args.b);
  at::Tensor workspace = launch_partials(op, a, b, shape, plan, ctx);
  auto* partials = reinterpret_cast<const typename Op::State*>(workspace.data_ptr());
  auto* kernel = &row_map_kernel<Op, scalar_t>;
  LK_LAUNCH_KERNEL(kernel, row_slice_grid(shape, plan), dim3(plan.threads), 0, ctx.stream(), op, a, b, shape.cols,
                   plan.chunk, partials, args.row_grad, args.out);
  ctx.check_launch();
}

// reduce + per-row result written by op.finalize.
template <class Op, class scalar_t>
void run_finalize(const Op& op, const ResultArgs<scalar_t>& args, const DeviceContext& ctx) {
  const Rows& shape = *args.a;
  check_grid(shape.rows);
  const LaunchPlan plan = plan_launch(shape.rows, shape.cols, sizeof(scalar_t), ctx);
  at::Tensor workspace =
      launch_partials(op, rows_view<scalar_t>(args.a), rows_view<scalar_t>(nullptr), shape, plan, ctx);
  auto* partials = reinterpret_cast<const typename Op::State*>(workspace.data_ptr());
  auto* kernel = &row_finalize_kernel<Op>;
  const dim3 grid(static_cast<unsigned>((shape.rows + kFinalizeThreads - 1) / kFinalizeThreads));
  LK_LAUNCH_KERNEL(kernel, grid, dim3(kFinalizeThreads), 0, ctx.stream(), op, partials, shape.rows, plan.splits);
  ctx.check_launch();
}

// The backend of RowOpsFrontend: maps each op kind to its policy (csrc/core/row_ops.h).
// float64 is not taken: the CUDA kernels serve float32/bfloat16/float16
// logits, and float64 would double the kernels nvcc instantiates for a dtype
// whose use (gradient checks) runs on the CPU.
struct RowOpsBackend {
  static constexpr bool kFloat64 = false;

  template <class scalar_t>
  static void map(MapKind kind, const MapArgs<scalar_t>& args) {
    const DeviceContext ctx(args.a->tensor);
    const float inv_t = args.inv_temperature;
    switch (kind) {
      case MapKind::softmax: return run_map(core::SoftmaxMap<float>{{inv_t}}, args, ctx);
      case MapKind::log_softmax: return run_map(core::LogSoftmaxMap<float>{{inv_t}}, args, ctx);
      case MapKind::logsumexp_grad: return run_map(core::LogsumexpGradMap<float>{{inv_t}}, args, ctx);
      case MapKind::entropy_grad: return run_map(core::EntropyGradMap<float>{{inv_t}}, args, ctx);
      case MapKind::softmax_grad: return run_map(core::SoftmaxGradMap<float>{{inv_t}}, args, ctx);
      case MapKind::log_softmax_grad: return run_map(core::LogSoftmaxGradMap<float>{{inv_t}}, args, ctx);
    }
  }

  template <class scalar_t>
  static void reduce(ResultKind kind, const ResultArgs<scalar_t>& args) {
    const DeviceContext ctx(args.a->tensor);
    const float inv_t = args.inv_temperature;
    switch (kind) {
      case ResultKind::logsumexp:
        return run_finalize(core::LogsumexpResult<scalar_t, float>{{inv_t}, static_cast<scalar_t*>(args.out)}, args,
                            ctx);
      case ResultKind::entropy:
        return run_finalize(core::EntropyResult<float>{{inv_t}, static_cast<float*>(args.out)}, args, ctx);
      case ResultKind::stats:
        return run_finalize(core::StatsResult<float>{{inv_t}, static_cast<float*>(args.out)}, args, ctx);
    }
  }
};

}  // namespace
}  // namespace logitkit::cuda

LOGITKIT_CUDA_LIBRARY_IMPL(m) { logitkit::RowOpsFrontend<logitkit::cuda::RowOpsBackend>::register_all(m); }
