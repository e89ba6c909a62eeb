// Warp and block collectives of logitkit's CUDA kernels (our own, not CUB:
// they must also compile for the host through the SIMT emulator, see
// csrc/simt/simt.h). Blocks are 1-D; every thread of the block must call a
// block collective (no early return before it).
#pragma once

#include <cstdint>
#include <cstring>

#include "../simt/simt.h"

namespace logitkit::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 32;
// Shared-memory elements block_reduce and block_inclusive_scan need: one per
// warp plus the result.
constexpr int kReduceScratchSize = kMaxWarpsPerBlock + 1;

LK_DEVICE inline int lane_rank() { return static_cast<int>(threadIdx.x) % kWarpSize; }
LK_DEVICE inline int warp_rank() { return static_cast<int>(threadIdx.x) / kWarpSize; }
LK_DEVICE inline int warps_per_block() { return (static_cast<int>(blockDim.x) + kWarpSize - 1) / kWarpSize; }

// Number of lanes of the calling thread's warp: 32, except in the last warp
// of a block whose size is not a multiple of 32.
LK_DEVICE inline int lanes_in_warp() {
  const int remaining = static_cast<int>(blockDim.x) - warp_rank() * kWarpSize;
  return remaining < kWarpSize ? remaining : kWarpSize;
}

// Mask of the lanes of the calling thread's warp (all threads of the block
// must still be running, which our reductions guarantee: no early return).
LK_DEVICE inline unsigned warp_live_mask() {
  const int lanes = lanes_in_warp();
  return lanes == kWarpSize ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
}

// Shuffles a trivially copyable struct made of 4-byte words. The words are
// copied with memcpy, not read through a reinterpret_cast'ed pointer: that
// would break strict aliasing (g++ -O2 then dropped the last word of a
// 16-byte struct in the emulated build).
template <class T>
LK_DEVICE inline T shuffle_down_words(unsigned mask, const T& value, int delta) {
  static_assert(sizeof(T) % 4 == 0, "shuffle_down_words needs a struct of 4-byte words");
  constexpr int kWords = static_cast<int>(sizeof(T) / 4);
  unsigned words[kWords];
  memcpy(words, &value, sizeof(T));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_down_sync(mask, words[w], delta);
  T result;
  memcpy(&result, words, sizeof(T));
  return result;
}

// Tree reduction within a warp; lane 0 ends with merge() of all lanes.
// Handles a partial last warp: a lane only merges partners that exist.
template <class T, class Merge>
LK_DEVICE inline T warp_reduce(T value, Merge merge) {
  const unsigned mask = warp_live_mask();
  const int lanes = lanes_in_warp();
  const int lane = lane_rank();
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = shuffle_down_words(mask, value, offset);
    if (lane + offset < lanes) value = merge(value, other);
  }
  return value;
}

// Reduction across the whole block; every thread gets the result.
// `scratch` is shared memory of kReduceScratchSize elements. Ends
// with a barrier, so the caller may reuse `scratch` right away.
template <class T, class Merge>
LK_DEVICE inline T block_reduce(T value, Merge merge, T identity, T* scratch) {
  value = warp_reduce(value, merge);
  if (lane_rank() == 0) scratch[warp_rank()] = value;
  __syncthreads();
  if (warp_rank() == 0) {
    value = lane_rank() < warps_per_block() ? scratch[lane_rank()] : identity;
    value = warp_reduce(value, merge);
    if (lane_rank() == 0) scratch[kMaxWarpsPerBlock] = value;
  }
  __syncthreads();
  const T result = scratch[kMaxWarpsPerBlock];
  __syncthreads();
  return result;
}

// Inclusive prefix sum over the block's threads in thread order: returns
// value_0 + ... + value_self and sets `total` to the sum over the whole block
// (the same in every thread). Warps scan with shuffles (Hillis-Steele: after
// the step with offset o every lane holds the sum of the 2o lanes ending at
// it), then each thread adds the totals of the warps before its own.
// `scratch` is shared memory of kReduceScratchSize elements. Starts and ends
// with a barrier, so the caller may reuse `scratch` right away.
template <class T>
LK_DEVICE inline T block_inclusive_scan(T value, T* scratch, T& total) {
  const unsigned mask = warp_live_mask();
  const int lane = lane_rank();
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T other = __shfl_up_sync(mask, value, offset);
    if (lane >= offset) value += other;
  }
  __syncthreads();  // scratch may still be read by a previous collective
  if (lane == lanes_in_warp() - 1) scratch[warp_rank()] = value;
  __syncthreads();
  T warps_before = T(0), sum = T(0);
  for (int w = 0; w < warps_per_block(); ++w) {
    if (w < warp_rank()) warps_before += scratch[w];
    sum += scratch[w];
  }
  __syncthreads();
  total = sum;
  return warps_before + value;
}

}  // namespace logitkit::cuda
