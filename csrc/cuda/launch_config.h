// The launch constants of logitkit's CUDA kernels, in one place: block sizes
// per kernel family, grid limits, the 16-byte packs of the row kernels, and
// the launch-shape overrides of the emulated build.
#pragma once

#include <atomic>
#include <cstdint>

#include "../simt/simt.h"

namespace logitkit::cuda {

// Grid limits of a launch: gridDim.x up to 2^31 - 1, gridDim.y up to 65535.
constexpr int64_t kMaxGridX = 2147483647LL;
constexpr int64_t kMaxGridY = 65535;

// One vectorised load or store: 16 bytes, i.e. 4 fp32 or 8 bf16/fp16 values.
constexpr int kPackBytes = 16;
template <class scalar_t>
constexpr int kPackElements = kPackBytes / static_cast<int>(sizeof(scalar_t));
constexpr int kMaxPackElements = kPackBytes / 2;

// The kernel families, whose block sizes differ (threads_per_block).
enum class KernelFamily { row_ops, top_h, linear_ce };

// Most threads per block of each family: the kernels declare it with
// __launch_bounds__, so that nvcc keeps register use launchable at that size.
constexpr int kMaxRowOpsThreads = 512;
constexpr int kMaxTopHThreads = 1024;
constexpr int kMaxLinearCeThreads = 512;

// Threads of row_finalize_kernel (one thread per row).
constexpr int kFinalizeThreads = 128;

// Row ops: slices of a row per block are planned so that the grid fills the
// GPU about kBlocksPerSm times while each thread keeps at least
// kMinPacksPerThread packs of work; slices start on a kSliceAlignElements
// boundary, so that aligned rows stay aligned.
constexpr int64_t kBlocksPerSm = 2;
constexpr int64_t kMinPacksPerThread = 4;
constexpr int64_t kSliceAlignElements = 16;

#if LK_EMULATED_CUDA
// Launch shape overrides for the emulated build, set by the test suite so
// that small inputs still exercise partial warps and multi-block rows.
struct EmulatedLaunchShape {
  std::atomic<int> threads_per_block{80};          // 2.5 warps: the last warp is partial
  std::atomic<int64_t> max_elements_per_block{0};  // 0: no extra split
};
inline EmulatedLaunchShape& emulated_launch_shape() {
  static EmulatedLaunchShape shape;
  return shape;
}
#endif

// Threads per block for rows of `cols` elements. The ladders differ by family
// because the work per block does:
//   row ops    a row is split over several blocks (pass 1 partials), so
//              512 threads per block suffice even for long rows;
//   Top-H      one block per row and no split: a long row gets the largest
//              block (1024), the only parallelism it has;
//   linear CE  one block per tile row, whose width is bounded by the chunk
//              budget, with a tanh/exp per element: larger blocks from
//              narrower rows on.
// The emulated build uses the test suite's launch shape instead.
inline int threads_per_block(KernelFamily family, int64_t cols) {
#if !LK_EMULATED_CUDA
  switch (family) {
    case KernelFamily::row_ops: return cols >= 16384 ? kMaxRowOpsThreads : (cols >= 2048 ? 256 : 128);
    case KernelFamily::top_h: return cols >= 16384 ? kMaxTopHThreads : (cols >= 2048 ? 512 : 128);
    case KernelFamily::linear_ce: return cols >= 4096 ? kMaxLinearCeThreads : (cols >= 512 ? 256 : 128);
  }
  return 128;
#else
  (void)family;
  (void)cols;
  return emulated_launch_shape().threads_per_block.load();
#endif
}

}  // namespace logitkit::cuda
