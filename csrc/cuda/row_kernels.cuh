// Generic row kernels over the vocabulary dimension (CUDA source; also built
// for the CPU through the SIMT emulator, see csrc/simt/simt.h).
//
// Every row op of logitkit is "reduce, then map or finalise":
//   pass 1  row_partials_kernel: grid (rows, splits); each block reduces one
//           slice [split*chunk, (split+1)*chunk) of a row to a mergeable
//           state (Op::State) with a warp-shuffle + shared-memory reduction.
//   pass 2a row_map_kernel: grid (rows, splits); each block merges its row's
//           partial states (in a fixed order, so results are deterministic)
//           and writes its slice of the elementwise output.
//   pass 2b row_finalize_kernel: one thread per row merges the partial states
//           and writes per-row results (log-sum-exp, entropy, stats).
// Splitting a row over several blocks keeps the GPU busy when there are few
// rows (decode: batch 1-64 with V = 128k).
//
// The Op is one of the scalar policies of csrc/core/row_ops.h (reduction +
// map, or reduction + result). All arithmetic is fp32; indices are 64-bit.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../core/row_ops.h"
#include "collectives.cuh"
#include "launch_config.h"

namespace logitkit::cuda {

static_assert(kMaxPackElements <= core::kMaxAccumulate, "a pack must fit one accumulate() call");

template <class scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// A 2-D strided view: row r starts at data + r * row_stride, unit stride along the row.
template <class scalar_t>
struct RowsView {
  const scalar_t* data;
  int64_t row_stride;
  LK_HOST_DEVICE const scalar_t* row(int64_t r) const { return data == nullptr ? nullptr : data + r * row_stride; }
};

// Loads the pack of a (and b, when there is one) at element i into fp32.
template <class scalar_t, int W>
LK_DEVICE inline void load_packs(const scalar_t* a, const scalar_t* b, int64_t i, float* va, float* vb) {
  const Pack<scalar_t, W> pa = *reinterpret_cast<const Pack<scalar_t, W>*>(a + i);
#pragma unroll
  for (int j = 0; j < W; ++j) va[j] = static_cast<float>(pa.v[j]);
  if (b != nullptr) {
    const Pack<scalar_t, W> pb = *reinterpret_cast<const Pack<scalar_t, W>*>(b + i);
#pragma unroll
    for (int j = 0; j < W; ++j) vb[j] = static_cast<float>(pb.v[j]);
  }
}

// The block's threads visit elements [begin, end) of a and b one at a time.
template <class scalar_t, class Visit>
LK_DEVICE inline void for_each_element(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end, float* va,
                                       float* vb, Visit& visit) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    va[0] = static_cast<float>(a[i]);
    if (b != nullptr) vb[0] = static_cast<float>(b[i]);
    visit(i, va, vb, 1);
  }
}

// The block's threads visit elements [begin, end) of one or two rows, by
// 16-byte packs where the addresses allow it, else one element at a time.
// visit(index, a_values, b_values, n) gets n consecutive elements in fp32.
template <class scalar_t, class Visit>
LK_DEVICE inline void for_each_pack(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end, Visit&& visit) {
  constexpr int W = kPackElements<scalar_t>;
  const uintptr_t a_misalign = reinterpret_cast<uintptr_t>(a + begin) % kPackBytes;
  const bool same_alignment = b == nullptr || reinterpret_cast<uintptr_t>(b + begin) % kPackBytes == a_misalign;
  int64_t head = end - begin;  // elements visited one by one before the packs
  if (same_alignment && a_misalign % sizeof(scalar_t) == 0) {
    const int64_t to_boundary = static_cast<int64_t>((kPackBytes - a_misalign) % kPackBytes / sizeof(scalar_t));
    head = to_boundary < head ? to_boundary : head;
  }
  float va[kMaxPackElements];
  float vb[kMaxPackElements] = {};
  const int64_t body = begin + head;
  for_each_element(a, b, begin, body, va, vb, visit);
  const int64_t packs = (end - body) / W;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const int64_t i = body + p * W;
    load_packs<scalar_t, W>(a, b, i, va, vb);
    visit(i, va, vb, W);
  }
  for_each_element(a, b, body + packs * W, end, va, vb, visit);
}

// Stores n values at out[i..i+n), as one 16-byte store when aligned.
template <class scalar_t>
LK_DEVICE inline void store_values(scalar_t* out, int64_t i, const float* values, int n) {
  constexpr int W = kPackElements<scalar_t>;
  if (n == W && reinterpret_cast<uintptr_t>(out + i) % kPackBytes == 0) {
    Pack<scalar_t, W> pack;
#pragma unroll
    for (int j = 0; j < W; ++j) pack.v[j] = static_cast<scalar_t>(values[j]);
    *reinterpret_cast<Pack<scalar_t, W>*>(out + i) = pack;
  } else {
    for (int j = 0; j < n; ++j) out[i + j] = static_cast<scalar_t>(values[j]);
  }
}

// Slice [begin, end) of a row handled by block (row, blockIdx.y).
LK_DEVICE inline int64_t slice_end(int64_t begin, int64_t chunk, int64_t cols) {
  return begin + chunk < cols ? begin + chunk : cols;
}

template <class Op, class scalar_t>
__global__ void __launch_bounds__(kMaxRowOpsThreads)
    row_partials_kernel(Op op, RowsView<scalar_t> a, RowsView<scalar_t> b, int64_t cols, int64_t chunk,
                        typename Op::State* partials) {
  using State = typename Op::State;
  const int64_t row = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  State state = op.identity();
  for_each_pack(a.row(row), b.row(row), begin, slice_end(begin, chunk, cols),
                [&](int64_t, const float* va, const float* vb, int n) { op.accumulate(state, va, vb, n); });
  __shared__ State scratch[kReduceScratchSize];
  state = block_reduce(state, [&](const State& x, const State& y) { return op.merge(x, y); }, op.identity(), scratch);
  if (threadIdx.x == 0) partials[row * gridDim.y + split] = state;
}

// Merges the partial states of one row in split order (one thread).
template <class Op>
LK_DEVICE inline typename Op::State merge_row_partials(const Op& op, const typename Op::State* partials, int64_t row,
                                                       int64_t splits) {
  typename Op::State state = op.identity();
  for (int64_t k = 0; k < splits; ++k) state = op.merge(state, partials[row * splits + k]);
  return state;
}

// `row_grad`: the incoming per-row gradient of the backward of a per-row
// result (logsumexp_grad, entropy_grad), else nullptr.
template <class Op, class scalar_t>
__global__ void __launch_bounds__(kMaxRowOpsThreads)
    row_map_kernel(Op op, RowsView<scalar_t> a, RowsView<scalar_t> b, int64_t cols, int64_t chunk,
                   const typename Op::State* partials, const scalar_t* row_grad, scalar_t* out) {
  using State = typename Op::State;
  const int64_t row = blockIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t begin = blockIdx.y * chunk;
  // The block merges its row's partial states: strided over threads, then a
  // block reduction (a fixed tree, so every block of the row gets the same bits).
  State state = op.identity();
  for (int64_t k = threadIdx.x; k < splits; k += blockDim.x) state = op.merge(state, partials[row * splits + k]);
  __shared__ State scratch[kReduceScratchSize];
  state = block_reduce(state, [&](const State& x, const State& y) { return op.merge(x, y); }, op.identity(), scratch);
  const auto constants = op.row_constants(state, row_grad != nullptr ? static_cast<float>(row_grad[row]) : 0.0f);
  scalar_t* out_row = out + row * cols;
  for_each_pack(a.row(row), b.row(row), begin, slice_end(begin, chunk, cols),
                [&](int64_t i, const float* va, const float* vb, int n) {
                  float result[kMaxPackElements];
                  for (int j = 0; j < n; ++j) result[j] = op.output(constants, va[j], vb[j]);
                  store_values(out_row, i, result, n);
                });
}

template <class Op>
__global__ void row_finalize_kernel(Op op, const typename Op::State* partials, int64_t rows, int64_t splits) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < rows) op.finalize(merge_row_partials(op, partials, row, splits), row);
}

}  // namespace logitkit::cuda
