// CUDA chunk kernels of the linear cross-entropy (also built for the CPU
// through the SIMT emulator). One block per tile row (token); the math is
// csrc/core/linear_ce.h and the tile is fp32, contiguous, processed in place.
#pragma once

#include <cstdint>

#include "../core/linear_ce.h"
#include "collectives.cuh"
#include "launch_config.h"

namespace logitkit::cuda {

// Elements per core::accumulate call of the forward (one rescale per group).
constexpr int kAccumulateGroup = 8;

// Forward: folds row blockIdx.x of the tile into the token's running state.
__global__ void __launch_bounds__(kMaxLinearCeThreads) linear_ce_forward_kernel(core::LinearCeChunk c) {
  const int64_t row = blockIdx.x;
  const float* x = c.logits + row * c.cols;
  const float* w = c.tile_class_weights();
  core::LinearCePartial mine = core::empty_partial();
  float group[kAccumulateGroup];
  int filled = 0;
  for (int64_t i = threadIdx.x; i < c.cols; i += blockDim.x) {
    const float z = c.transform.apply(x[i]);
    mine.weighted_sum += (w != nullptr ? w[i] : 1.0f) * z;
    group[filled++] = z;
    if (filled == kAccumulateGroup) {
      core::accumulate(mine.softmax, group, kAccumulateGroup);
      filled = 0;
    }
  }
  if (filled > 0) core::accumulate(mine.softmax, group, filled);
  __shared__ core::LinearCePartial scratch[kReduceScratchSize];
  const core::LinearCePartial tile = block_reduce(
      mine, [](const core::LinearCePartial& a, const core::LinearCePartial& b) { return core::merge(a, b); },
      core::empty_partial(), scratch);
  if (threadIdx.x == 0) {
    const int64_t y = c.target_column(row);
    c.fold_into_state(row, tile, y >= 0 ? c.transform.apply(x[y]) : 0.0f);
  }
}

// Backward: row blockIdx.x of the tile <- dL/dx (see core::linear_ce_grad_z).
__global__ void __launch_bounds__(kMaxLinearCeThreads) linear_ce_backward_kernel(core::LinearCeChunk c) {
  const int64_t row = blockIdx.x;
  float* x = c.logits + row * c.cols;
  const core::LinearCeCoefficients k = c.coefficients_of(row);
  const core::Normaliser norm = c.normaliser_of(row);
  const int64_t y = c.target_column(row);
  const float* w = c.tile_class_weights();
  for (int64_t i = threadIdx.x; i < c.cols; i += blockDim.x) {
    x[i] = c.grad_x(k, norm, x[i], i == y, w != nullptr ? w[i] : 1.0f);
  }
}

}  // namespace logitkit::cuda
