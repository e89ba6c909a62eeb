// Small kernels that check the SIMT emulator itself (tests/test_emulator.py):
// the semantics of the warp intrinsics, block reductions over partial warps,
// atomics and dynamic shared memory, the block sort, scan and key selection,
// and that misuse (divergent barriers, wrong shuffle masks, deadlocks) is
// reported instead of mis-executed.
#include <cstdint>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/collectives.cuh"
#include "../simt/simt.h"

namespace logitkit::simt {
namespace {

using cuda::lane_rank;
using cuda::warp_live_mask;

// Per thread, 9 results: shfl(src=lane^7 % lanes), shfl_up(1), shfl_down(3),
// shfl_xor(5), shfl_down(1, width 8), ballot(lane % 3 == 0), any(lane == 2),
// all(lane < 40), activemask.
constexpr int kIntrinsicResults = 9;

__global__ void warp_intrinsics_kernel(int64_t* out) {
  const int t = threadIdx.x;
  const unsigned mask = warp_live_mask();
  const int lane = lane_rank();
  const int lanes = cuda::lanes_in_warp();
  int64_t* o = out + (static_cast<int64_t>(blockIdx.x) * blockDim.x + t) * kIntrinsicResults;
  o[0] = __shfl_sync(mask, t, (lane ^ 7) % lanes);
  o[1] = __shfl_up_sync(mask, t, 1);
  o[2] = __shfl_down_sync(mask, t, 3);
  o[3] = __shfl_xor_sync(mask, t, 5);
  o[4] = __shfl_down_sync(mask, t, 1, 8);
  o[5] = __ballot_sync(mask, lane % 3 == 0);
  o[6] = __any_sync(mask, lane == 2);
  o[7] = __all_sync(mask, lane < 40);
  o[8] = __activemask();
}

// Block sum of (thread index + 1) through cuda::block_reduce, plus an
// atomicAdd of every thread into a grid-wide counter, plus a round trip
// through dynamic shared memory (each thread reads its neighbour's slot after
// a barrier).
__global__ void block_reduce_kernel(int64_t* block_sums, unsigned long long* grid_counter, int64_t* neighbours) {
  __shared__ int64_t scratch[cuda::kReduceScratchSize];
  LK_DYNAMIC_SHARED(int64_t, slots);
  const int t = threadIdx.x;
  slots[t] = 1000LL * blockIdx.x + t;
  const int64_t sum =
      cuda::block_reduce(static_cast<int64_t>(t + 1), [](int64_t a, int64_t b) { return a + b; }, int64_t{0}, scratch);
  if (t == 0) block_sums[blockIdx.x] = sum;
  atomicAdd(grid_counter, 1ULL);
  __syncthreads();
  neighbours[static_cast<int64_t>(blockIdx.x) * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// Misuse: a shared-memory race. Each thread writes its slot and reads its
// neighbour's with no __syncthreads in between, so the read may see the old
// or the new value. The ThreadSanitizer build must report it as a data race
// (.ci/sanitize thread checks that it does); other builds just return the
// values read.
__global__ void missing_barrier_kernel(int64_t* neighbours) {
  __shared__ int64_t slots[1024];
  const int t = threadIdx.x;
  slots[t] = 1000LL * blockIdx.x + t;
  neighbours[static_cast<int64_t>(blockIdx.x) * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// Misuse: odd and even threads wait at two different __syncthreads.
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Misuse: a full mask in a block whose last warp is partial.
__global__ void full_mask_in_partial_warp_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

// Misuse: thread 0 waits at __syncthreads while its warp waits for it in __syncwarp.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    __syncwarp(warp_live_mask());
  }
}

// cuda::block_bitonic_sort and cuda::first_group_reaching: block b sorts the
// slots of n = kSortSizes[b % kSortSizeCount] values (few distinct: ties) by
// value, largest first, ties by slot, then finds the first group of equal
// values whose mass before it, with weights value + 1 (exact in float),
// reaches a third of the total. Writes the sorted slots, then that position, at
// out + b * kSortResultStride. Sizes up to 4096 (the kernels sort at most
// 1024; the larger sizes give several comparators per thread at every block
// size).
constexpr int kSortCapacity = 4096;
constexpr int kSortResultStride = kSortCapacity + 1;
constexpr int kSortSizes[] = {0, 1, 2, 31, 33, 64, 100, 513, 1000, 1024, 2049, 4096};
constexpr int kSortSizeCount = static_cast<int>(std::size(kSortSizes));

LK_DEVICE inline uint32_t sort_selftest_value(int slot, int block) {
  return ((static_cast<uint32_t>(slot) * 2654435761u + static_cast<uint32_t>(block) * 40503u) >> 20) % 37u;
}

__global__ void bitonic_sort_kernel(int64_t* out) {
  __shared__ uint32_t slots[kSortCapacity];
  __shared__ uint32_t values[kSortCapacity];
  __shared__ float mass_scratch[cuda::kReduceScratchSize];
  __shared__ int64_t index_scratch[cuda::kReduceScratchSize];
  const int block = static_cast<int>(blockIdx.x);
  const int n = kSortSizes[block % kSortSizeCount];
  float total = 0.0f;  // (each thread sums them all: the same in every thread)
  for (int a = 0; a < n; ++a) total += static_cast<float>(sort_selftest_value(a, block) + 1);
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) {
    slots[a] = static_cast<uint32_t>(a);
    values[a] = sort_selftest_value(a, block);
  }
  cuda::block_bitonic_sort(
      n, slots, [&](uint32_t a, uint32_t b) { return values[a] > values[b] || (values[a] == values[b] && a < b); });
  const int first = cuda::first_group_reaching(
      n, 0.0f, [&](int r) { return static_cast<float>(values[slots[r]] + 1); },
      [&](int r) { return r == 0 || values[slots[r - 1]] != values[slots[r]]; },
      [&](float mass_before, int) { return 3.0f * mass_before >= total; }, mass_scratch, index_scratch);
  int64_t* o = out + static_cast<int64_t>(block) * kSortResultStride;
  for (int r = static_cast<int>(threadIdx.x); r < n; r += static_cast<int>(blockDim.x)) o[r] = slots[r];
  if (threadIdx.x == 0) o[kSortCapacity] = first;
}

// cuda::block_kth_largest_key: block b selects, among n = kSelectSizes[b %
// kSelectSizeCount] keys (select_selftest_key: spread over all 32 bits, few
// distinct low digits, or one value repeated), the keys of kSelectRanks ranks
// spread over [0, n) and the largest, and writes them at
// out + b * kSelectResultStride.
constexpr int kSelectCapacity = 8192;
constexpr int kSelectSizes[] = {1, 2, 31, 33, 513, 1000, 4097, 8192};
constexpr int kSelectSizeCount = static_cast<int>(std::size(kSelectSizes));
constexpr int kSelectRanks = 3;
constexpr int kSelectResultStride = kSelectRanks + 1;

LK_DEVICE inline uint32_t select_selftest_key(int slot, int block) {
  const uint32_t hash = static_cast<uint32_t>(slot) * 2654435761u + static_cast<uint32_t>(block) * 40503u;
  switch (block % 3) {
    case 0: return hash;                                                   // (almost) distinct, over every bit
    case 1: return 0x40200000u | ((hash >> 7) % 23u) << 9 | (hash >> 27);  // one first-digit bin, many ties
    default: return slot % 5 == 0 ? 0x3F800000u + static_cast<uint32_t>(slot) : 0x3F800000u;  // a tie group
  }
}

LK_DEVICE inline int select_selftest_rank(int j, int n) {
  return static_cast<int>((static_cast<int64_t>(n) - 1) * j / (kSelectRanks - 1));
}

__global__ void kth_largest_key_kernel(int64_t* out) {
  __shared__ uint32_t keys[kSelectCapacity];
  __shared__ cuda::KeySelectScratch scratch;
  const int block = static_cast<int>(blockIdx.x);
  const int n = kSelectSizes[block % kSelectSizeCount];
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x))
    keys[a] = select_selftest_key(a, block);
  int64_t* o = out + static_cast<int64_t>(block) * kSelectResultStride;
  for (int j = 0; j < kSelectRanks; ++j) {
    uint32_t largest = 0u;
    const uint32_t key = cuda::block_kth_largest_key(n, keys, select_selftest_rank(j, n), scratch, &largest);
    if (threadIdx.x == 0) {
      o[j] = key;
      o[kSelectRanks] = largest;
    }
  }
}

}  // namespace

// Runs one self-test kernel; returns its int64 results (flattened).
std::vector<int64_t> run_selftest(const std::string& name, int threads, int blocks) {
  if (name == "warp_intrinsics") {
    std::vector<int64_t> out(static_cast<size_t>(threads) * blocks * kIntrinsicResults, -1);
    auto* kernel = &warp_intrinsics_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr, out.data());
    return out;
  }
  if (name == "block_reduce") {
    std::vector<int64_t> sums(blocks, -1);
    std::vector<int64_t> neighbours(static_cast<size_t>(threads) * blocks, -1);
    unsigned long long counter = 0;
    auto* kernel = &block_reduce_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), threads * sizeof(int64_t), nullptr, sums.data(), &counter,
                     neighbours.data());
    sums.push_back(static_cast<int64_t>(counter));
    sums.insert(sums.end(), neighbours.begin(), neighbours.end());
    return sums;
  }
  if (name == "bitonic_sort") {
    std::vector<int64_t> out(static_cast<size_t>(blocks) * kSortResultStride, -1);
    auto* kernel = &bitonic_sort_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr, out.data());
    return out;
  }
  if (name == "kth_largest_key") {
    std::vector<int64_t> out(static_cast<size_t>(blocks) * kSelectResultStride, -1);
    auto* kernel = &kth_largest_key_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr, out.data());
    return out;
  }
  if (name == "missing_barrier") {
    std::vector<int64_t> neighbours(static_cast<size_t>(threads) * blocks, -1);
    auto* kernel = &missing_barrier_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr, neighbours.data());
    return neighbours;
  }
  if (name == "divergent_barrier") {
    auto* kernel = &divergent_barrier_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr);
    return {};
  }
  if (name == "full_mask_in_partial_warp") {
    std::vector<int> out(threads);
    auto* kernel = &full_mask_in_partial_warp_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr, out.data());
    return {};
  }
  if (name == "deadlock") {
    auto* kernel = &deadlock_kernel;
    LK_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(threads), 0, nullptr);
    return {};
  }
  throw std::invalid_argument("unknown self-test kernel '" + name + "'");
}

}  // namespace logitkit::simt
