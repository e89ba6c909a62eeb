// CUDA chunk kernels of the linear cross-entropy (also built for the CPU
// through the SIMT emulator). One block per tile row (token); the math is
// csrc/core/linear_ce.h and the tile is fp32, contiguous, processed in place.
#pragma once

#include <cstdint>

#include "../core/linear_ce.h"
#include "collectives.cuh"
#include "launch_config.h"

namespace logitkit::cuda {

// A token's softmax state over part of a tile, plus sum_c w_c z_c.
struct LinearCeTileState {
  core::SoftmaxState softmax;
  float weighted_sum;
};

LK_HOST_DEVICE LinearCeTileState merge_tile_states(const LinearCeTileState& a, const LinearCeTileState& b) {
  return LinearCeTileState{core::merge(a.softmax, b.softmax), a.weighted_sum + b.weighted_sum};
}

// Elements per core::accumulate call of the forward (one rescale per group).
constexpr int kAccumulateGroup = 8;

// Forward: folds row blockIdx.x of the tile into the token's running state.
__global__ void __launch_bounds__(kMaxLinearCeThreads) linear_ce_forward_kernel(core::LinearCeChunk c) {
  const int64_t row = blockIdx.x;
  const float* x = c.logits + row * c.cols;
  const float* w = c.class_weight != nullptr ? c.class_weight + c.col_begin : nullptr;
  LinearCeTileState mine{core::empty_state(), 0.0f};
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
  __shared__ LinearCeTileState scratch[kReduceScratchSize];
  const LinearCeTileState identity{core::empty_state(), 0.0f};
  const LinearCeTileState tile = block_reduce(
      mine, [](const LinearCeTileState& a, const LinearCeTileState& b) { return merge_tile_states(a, b); }, identity,
      scratch);
  if (threadIdx.x == 0) {
    float* st = c.state + row * core::kLinearCeStateWidth;
    const core::SoftmaxState merged =
        core::merge(core::SoftmaxState{st[core::kLinearCeMax], st[core::kLinearCeSumExp], st[core::kLinearCeSumShifted]},
                    tile.softmax);
    st[core::kLinearCeMax] = merged.max;
    st[core::kLinearCeSumExp] = merged.sum_exp;
    st[core::kLinearCeSumShifted] = merged.sum_shifted;
    st[core::kLinearCeWeightedSum] += tile.weighted_sum;
    const int64_t y = c.target[row] - c.col_begin;
    if (y >= 0 && y < c.cols) st[core::kLinearCeTargetLogit] = c.transform.apply(x[y]);
  }
}

// Backward: row blockIdx.x of the tile <- dL/dx (see core::linear_ce_grad_z).
__global__ void __launch_bounds__(kMaxLinearCeThreads) linear_ce_backward_kernel(core::LinearCeChunk c) {
  const int64_t row = blockIdx.x;
  float* x = c.logits + row * c.cols;
  const float* kp = c.coefficients + row * core::kLinearCeCoefWidth;
  const core::LinearCeCoefficients k{kp[core::kLinearCeCoefProb], kp[core::kLinearCeCoefEntropy], kp[core::kLinearCeCoefTarget],
                                kp[core::kLinearCeCoefSmooth]};
  const float m = c.normaliser[2 * row], log_s = c.normaliser[2 * row + 1];
  const int64_t y = c.target[row] - c.col_begin;
  const float* w = c.class_weight != nullptr ? c.class_weight + c.col_begin : nullptr;
  for (int64_t i = threadIdx.x; i < c.cols; i += blockDim.x) {
    const float z = c.transform.apply(x[i]);
    // z - lse as (z - m) - log s: exact for z near the max.
    x[i] = core::linear_ce_grad_z(k, (z - m) - log_s, i == y, w != nullptr ? w[i] : 1.0f) * c.transform.derivative(z);
  }
}

}  // namespace logitkit::cuda
