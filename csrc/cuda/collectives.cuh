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

// One tile (blockDim.x items, one per thread) of a running sum over a
// sequence of tiles: returns carry + the block's inclusive scan of w up to
// this thread (block_inclusive_scan), and adds the tile's total to carry (the
// same in every thread). A block collective; sums in the same order every run.
LK_DEVICE inline float running_sum_over_tile(float w, float& carry, float* scratch) {
  float tile_total;
  const float running = carry + block_inclusive_scan(w, scratch, tile_total);
  carry += tile_total;
  return running;
}

// The draw of the sampling kernels: inverse CDF over per-token weights w_i,
// tile by tile (blockDim.x tokens): a block-wide inclusive scan of w on top of
// the mass of the tiles before; the token is the first one of positive weight
// whose running sum exceeds `target`, and the loop stops at its tile. If none
// crosses (target at or above the scan's total, a different rounding of the
// kept mass), the last token of positive weight; -1 if no weight is positive.
// weight(i, valid) gives w_i (valid: i < cols); every thread calls it once per
// tile in tile order, so it may be a block collective. The scratch arrays are
// shared memory of kReduceScratchSize elements.
template <class Weight>
LK_DEVICE inline int64_t block_inverse_cdf_draw(int64_t cols, float target, Weight weight, float* mass_scratch,
                                                int64_t* index_scratch) {
  constexpr int64_t kNone = -1, kNoIndex = INT64_MAX;
  auto max_index = [](int64_t a, int64_t b) { return a > b ? a : b; };
  auto min_index = [](int64_t a, int64_t b) { return a < b ? a : b; };
  float before = 0.0f;  // kept mass of the tiles before (the same in every thread)
  int64_t found = kNone;
  int64_t last_positive = kNone;  // this thread's last token of positive weight
  for (int64_t base = 0; base < cols && found == kNone; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const float w = weight(i, i < cols);
    if (w > 0.0f) last_positive = i;
    const float running = running_sum_over_tile(w, before, mass_scratch);
    const bool crosses = w > 0.0f && running > target;
    const int64_t first = block_reduce(crosses ? i : kNoIndex, min_index, kNoIndex, index_scratch);
    found = first == kNoIndex ? kNone : first;
  }
  // block-uniform: every thread left the loop at the same tile
  if (found == kNone) found = block_reduce(last_positive, max_index, kNone, index_scratch);
  return found;
}

// block_bitonic_sort's order for orderable keys (core::orderable_key), largest
// first: a descending value order.
struct LargerKeyFirst {
  LK_DEVICE bool operator()(uint32_t a, uint32_t b) const { return a > b; }
};

// Sorts handles[0, n) in shared memory (n <= INT_MAX / 2) so that no handle
// comes after one it is `before` (a strict weak order over handles: keys
// compared directly, or slots whose items are compared, ties broken by slot
// for a total order). A block collective: starts and ends with a barrier.
// Bitonic sorting network, the variant whose comparators all put the earlier
// handle at the lower position: with n rounded up to a power of two P, for
// each merge size m = 2, 4, ..., P, a first step compares positions i and
// i ^ (m - 1) (mirrored within blocks of m), then steps of span j = m / 2,
// ..., 2 compare i and i ^ (j / 2) (Batcher's network, its merges written
// without alternating directions). That is log2 P (log2 P + 1) / 2 steps of
// P / 2 comparators, one per thread at P = 2 * threads. Positions >= n
// count as after every handle: a comparator reaching past n would never swap,
// so it is skipped and nothing is padded. When the block is whole warps, the
// 32 comparators of a warp cover 64 consecutive positions in every step of
// span <= 64, so two such steps in a row need only __syncwarp between them
// (at P = 1024: 14 block barriers, 40 warp barriers). The order depends on the handles and `before`
// alone, not on how the handles were gathered.
template <class Handle, class Before>
LK_DEVICE inline void block_bitonic_sort(int n, Handle* handles, Before before) {
  __syncthreads();  // the handles are published
  int padded = 1;
  while (padded < n) padded *= 2;
  const bool warp_local_steps = blockDim.x % kWarpSize == 0;  // block-uniform
  for (int merge = 2; merge <= padded; merge *= 2) {
    for (int span = merge; span >= 2; span /= 2) {
      const int half = span / 2;
      const int partner = span == merge ? span - 1 : half;  // position ^ partner
      for (int pair = static_cast<int>(threadIdx.x); pair < padded / 2; pair += static_cast<int>(blockDim.x)) {
        // the pair's lower position: its block of `span` and its offset in the lower half
        const int lo = ((pair & ~(half - 1)) << 1) | (pair & (half - 1));
        const int hi = lo ^ partner;
        if (hi < n) {
          const Handle at_lo = handles[lo], at_hi = handles[hi];
          if (before(at_hi, at_lo)) {
            handles[lo] = at_hi;
            handles[hi] = at_lo;
          }
        }
      }
      // The next step may read what this one wrote: a warp's own positions
      // when both steps stay within its 64.
      const int next_span = span > 2 ? span / 2 : 2 * merge;
      if (warp_local_steps && span <= 2 * kWarpSize && next_span <= 2 * kWarpSize) {
        __syncwarp();
      } else if (next_span <= padded) {
        __syncthreads();
      }  // (else: the last step, followed by the final barrier)
    }
  }
  __syncthreads();
}

// Shared memory of block_kth_largest_key.
struct KeySelectScratch {
  unsigned digit_count[256];
  int64_t reduce_scratch[kReduceScratchSize];
  uint32_t prefix;  // the selected key's bits found so far
  int rank;         // its rank among the keys that share them
};

// The key of rank `rank` (0: the largest; 0 <= rank < n) among keys[0, n) in
// shared memory, for every thread; the keys are not moved. A block collective
// that starts and ends with a barrier. A radix selection over the bits in
// which the keys differ (those below the highest bit of min ^ max), 8 at a
// time from the top: each round counts the keys that share the bits found so
// far by their next digit (shared-memory atomics; a thread adds a run of
// equal digits at once, so a tie group costs one atomic per thread, not one
// per key), a block scan over the digits, largest first, finds the digit
// whose counts span `rank`, and the rank becomes the one within that digit.
// Keys within one first-digit bin of the radix selections (21 low bits
// differ) take 3 rounds of n / threads shared reads each, against a bitonic
// sort's log2(n) (log2(n) + 1) / 2 steps of n / (2 threads) compare-exchanges
// (78 at n = 4096). The counts are integers: the result depends on the keys
// alone, not on the order in which they were stored or counted. With
// largest_key, every thread also gets the largest of the keys there.
LK_DEVICE inline uint32_t block_kth_largest_key(int n, const uint32_t* keys, int rank, KeySelectScratch& s,
                                                uint32_t* largest_key = nullptr) {
  __syncthreads();  // the keys are published
  int64_t lowest = 0xFFFFFFFFll, highest = 0;
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) {
    const int64_t key = keys[a];
    lowest = key < lowest ? key : lowest;
    highest = key > highest ? key : highest;
  }
  lowest =
      block_reduce(lowest, [](int64_t a, int64_t b) { return a < b ? a : b; }, int64_t{0xFFFFFFFF}, s.reduce_scratch);
  highest = block_reduce(highest, [](int64_t a, int64_t b) { return a > b ? a : b; }, int64_t{0}, s.reduce_scratch);
  if (largest_key != nullptr) *largest_key = static_cast<uint32_t>(highest);
  int bits = 0;  // the keys share every bit from `bits` up (block-uniform)
  for (uint64_t differ = static_cast<uint64_t>(lowest ^ highest); differ != 0; differ >>= 1) ++bits;
  uint32_t prefix = static_cast<uint32_t>(highest);
  while (bits > 0) {
    const int shift = bits > 8 ? bits - 8 : 0;
    const int digits = 1 << (bits - shift);
    for (int d = static_cast<int>(threadIdx.x); d < digits; d += static_cast<int>(blockDim.x)) s.digit_count[d] = 0u;
    __syncthreads();
    unsigned run_digit = 0u, run = 0u;
    for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) {
      const uint32_t key = keys[a];
      if ((static_cast<uint64_t>(key ^ prefix) >> bits) != 0) continue;  // outside the digits selected so far
      const unsigned digit = (key >> shift) & static_cast<unsigned>(digits - 1);
      if (run > 0u && digit != run_digit) {
        atomicAdd(&s.digit_count[run_digit], run);
        run = 0u;
      }
      run_digit = digit;
      ++run;
    }
    if (run > 0u) atomicAdd(&s.digit_count[run_digit], run);
    __syncthreads();
    // Each thread takes a slice of the digits, largest first; the scan of the
    // slices' counts gives the keys above each slice.
    const int per_thread = (digits + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
    const int top = digits - 1 - static_cast<int>(threadIdx.x) * per_thread;  // this thread's largest digit
    int64_t in_slice = 0;
    for (int j = 0; j < per_thread && top - j >= 0; ++j) in_slice += s.digit_count[top - j];
    int64_t total;
    const int64_t through = block_inclusive_scan(in_slice, s.reduce_scratch, total);
    int64_t above = through - in_slice;
    if (above <= rank && rank < through) {  // one thread
      for (int j = 0; j < per_thread; ++j) {
        const int64_t count = s.digit_count[top - j];
        if (rank < above + count) {
          const uint64_t shared_bits = static_cast<uint64_t>(prefix) >> bits << bits;
          s.prefix = static_cast<uint32_t>(shared_bits | (static_cast<uint64_t>(top - j) << shift));
          s.rank = static_cast<int>(rank - above);
          break;
        }
        above += count;
      }
    }
    __syncthreads();
    prefix = s.prefix;
    rank = s.rank;
    bits = shift;
  }
  __syncthreads();  // s may be reused
  return prefix;
}

// The first position r < n, in the order of items 0 .. n-1, where a group of
// equal items starts (starts_group(r)) and reached(mass, r) holds for the
// mass before it, carry + weight(0) + ... + weight(r - 1); n if none. reached
// must be monotone in r along the order (it is given sums of non-negative
// weights): then every position before the result is in a group that has not
// reached it, and the rules that keep "the tokens whose strictly larger ones
// have not reached the limit" (top-p, typical) keep exactly positions
// [0, result). A block collective: a block-wide scan of the weights shifted
// by one position, tile by tile, then a block minimum; the sums depend on the
// order alone. mass_scratch / index_scratch: shared memory of
// kReduceScratchSize elements.
template <class Weight, class StartsGroup, class Reached>
LK_DEVICE inline int first_group_reaching(int n, float carry, Weight weight, StartsGroup starts_group, Reached reached,
                                          float* mass_scratch, int64_t* index_scratch) {
  int64_t first = n;
  for (int base = 0; base < n; base += static_cast<int>(blockDim.x)) {  // block-uniform
    const int r = base + static_cast<int>(threadIdx.x);
    const float weight_before = r > 0 && r < n ? weight(r - 1) : 0.0f;
    const float mass_before = running_sum_over_tile(weight_before, carry, mass_scratch);
    if (r < n && first == n && starts_group(r) && reached(mass_before, r)) first = r;
  }
  return static_cast<int>(
      block_reduce(first, [](int64_t a, int64_t b) { return a < b ? a : b; }, static_cast<int64_t>(n), index_scratch));
}

// Contiguous per-warp shares of a row of `cols` tokens: warp w owns
// [w * length, min((w + 1) * length, cols)) with length = ceil(cols / warps),
// read by its lanes a warp-width at a time (coalesced). A pass can then give
// each warp's share of a sum, and a later step re-read one share only.
struct WarpShare {
  int64_t begin, end;
};

LK_DEVICE inline WarpShare warp_share(int64_t cols) {
  const int64_t warps = warps_per_block();
  const int64_t length = (cols + warps - 1) / warps;
  const int64_t begin = warp_rank() * length;
  return WarpShare{begin < cols ? begin : cols, begin + length < cols ? begin + length : cols};
}

// Index of the lowest / highest set bit of a nonzero mask (__ffs(mask) - 1,
// 31 - __clz(mask); written with __popc and shifts so that they also compile
// for the host through the emulator).
LK_DEVICE inline int lowest_set_lane(unsigned mask) { return __popc((mask & (0u - mask)) - 1u); }
LK_DEVICE inline int highest_set_lane(unsigned mask) {
  int lane = 0;
  while ((mask >> lane) > 1u) ++lane;
  return lane;
}

// The inverse-CDF draw inside one warp's share, called by every lane of the
// warp (an empty share returns -1 at once): weights w_i = weight(i), running
// sum from `before` (the mass of the shares before); the first token of
// positive weight whose running sum exceeds `target`, a warp-width chunk at a
// time (a warp inclusive scan), stopping at that chunk. If none crosses (the
// share's sums and the caller's round differently), the share's last token of
// positive weight; -1 if it has none. Every lane gets the result.
template <class Weight>
LK_DEVICE inline int64_t warp_share_inverse_cdf_draw(WarpShare share, float before, float target, Weight weight) {
  const unsigned mask = warp_live_mask();
  const int lanes = lanes_in_warp(), lane = lane_rank();
  int64_t last_chunk = -1;      // the last chunk holding a token of positive weight
  unsigned last_positive = 0u;  // and its lanes of positive weight
  for (int64_t base = share.begin; base < share.end; base += lanes) {
    const int64_t i = base + lane;
    const float w = i < share.end ? weight(i) : 0.0f;
    float running = w;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const float other = __shfl_up_sync(mask, running, offset);
      if (lane >= offset) running += other;
    }
    const unsigned crossing = __ballot_sync(mask, w > 0.0f && before + running > target);
    if (crossing != 0u) return base + lowest_set_lane(crossing);
    const unsigned positive = __ballot_sync(mask, w > 0.0f);
    if (positive != 0u) {
      last_chunk = base;
      last_positive = positive;
    }
    before += __shfl_sync(mask, running, lanes - 1);
  }
  return last_chunk < 0 ? -1 : last_chunk + highest_set_lane(last_positive);
}

}  // namespace logitkit::cuda
