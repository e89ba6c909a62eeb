// CUDA chunk kernels of the linear cross-entropy (also built for the CPU
// through the SIMT emulator). One block per tile row (token); the math is
// csrc/core/linear_ce.h and the tile is fp32, contiguous, processed in place.
#pragma once

#include <cstdint>

#include "../core/linear_ce.h"
#include "../simt/simt.h"

namespace logitkit::kernels {

// A token's softmax state over part of a tile, plus sum_c w_c z_c.
struct LceTileState {
  core::SoftmaxState softmax;
  float weighted_sum;
};

LK_HOST_DEVICE inline LceTileState lce_merge(const LceTileState& a, const LceTileState& b) {
  return LceTileState{core::merge(a.softmax, b.softmax), a.weighted_sum + b.weighted_sum};
}

// Forward: folds row blockIdx.x of the tile into the token's running state.
__global__ void lce_forward_kernel(core::LceChunk c) {
  constexpr int kGroup = 8;  // elements per core::accumulate (one rescale per group)
  const int64_t row = blockIdx.x;
  const float* x = c.logits + row * c.cols;
  const float* w = c.class_weight != nullptr ? c.class_weight + c.col_begin : nullptr;
  LceTileState mine{core::empty_state(), 0.0f};
  float group[kGroup];
  int filled = 0;
  for (int64_t i = threadIdx.x; i < c.cols; i += blockDim.x) {
    const float z = c.transform.apply(x[i]);
    mine.weighted_sum += (w != nullptr ? w[i] : 1.0f) * z;
    group[filled++] = z;
    if (filled == kGroup) {
      core::accumulate(mine.softmax, group, kGroup);
      filled = 0;
    }
  }
  if (filled > 0) core::accumulate(mine.softmax, group, filled);
  __shared__ LceTileState scratch[simt::kReduceScratchSize];
  const LceTileState identity{core::empty_state(), 0.0f};
  const LceTileState tile = simt::block_reduce(
      mine, [](const LceTileState& a, const LceTileState& b) { return lce_merge(a, b); }, identity, scratch);
  if (threadIdx.x == 0) {
    float* st = c.state + row * core::kLceStateWidth;
    const core::SoftmaxState merged =
        core::merge(core::SoftmaxState{st[core::kLceMax], st[core::kLceSumExp], st[core::kLceSumShifted]},
                    tile.softmax);
    st[core::kLceMax] = merged.max;
    st[core::kLceSumExp] = merged.sum_exp;
    st[core::kLceSumShifted] = merged.sum_shifted;
    st[core::kLceWeightedSum] += tile.weighted_sum;
    const int64_t y = c.target[row] - c.col_begin;
    if (y >= 0 && y < c.cols) st[core::kLceTargetLogit] = c.transform.apply(x[y]);
  }
}

// Backward: row blockIdx.x of the tile <- dL/dx (see core::lce_grad_z).
__global__ void lce_backward_kernel(core::LceChunk c) {
  const int64_t row = blockIdx.x;
  float* x = c.logits + row * c.cols;
  const float* kp = c.coefficients + row * core::kLceCoefWidth;
  const core::LceCoefficients k{kp[core::kLceCoefProb], kp[core::kLceCoefEntropy], kp[core::kLceCoefTarget],
                                kp[core::kLceCoefSmooth]};
  const float m = c.normaliser[2 * row], log_s = c.normaliser[2 * row + 1];
  const int64_t y = c.target[row] - c.col_begin;
  const float* w = c.class_weight != nullptr ? c.class_weight + c.col_begin : nullptr;
  for (int64_t i = threadIdx.x; i < c.cols; i += blockDim.x) {
    const float z = c.transform.apply(x[i]);
    // z - lse as (z - m) - log s: exact for z near the max.
    x[i] = core::lce_grad_z(k, (z - m) - log_s, i == y, w != nullptr ? w[i] : 1.0f) * c.transform.derivative(z);
  }
}

}  // namespace logitkit::kernels
