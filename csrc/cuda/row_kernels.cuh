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
// An Op provides:
//   State identity(); State merge(State, State);
//   void accumulate(State&, const float* a, const float* b, int n);
//   and for pass 2a: RowConstants row_constants(State, int64_t row);
//                    float output(const RowConstants&, float a, float b);
//   or for pass 2b:  void finalize(const State&, int64_t row);
// `a` and `b` are the row's one or two inputs, converted to fp32 (b is unused
// by single-input ops). All arithmetic is fp32; indices are 64-bit.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../core/softmax_state.h"
#include "collectives.cuh"
#include "launch_config.h"

namespace logitkit::cuda {

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

// The block's threads visit elements [begin, end) of one or two rows, by
// 16-byte packs where the addresses allow it, else one element at a time.
// visit(index, a_values, b_values, n) gets n consecutive elements in fp32.
template <class scalar_t, class Visit>
LK_DEVICE inline void for_each_pack(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end, Visit&& visit) {
  constexpr int W = kPackElements<scalar_t>;
  const int64_t stride = blockDim.x;
  const int64_t tid = threadIdx.x;
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
  for (int64_t i = begin + tid; i < body; i += stride) {
    va[0] = static_cast<float>(a[i]);
    if (b != nullptr) vb[0] = static_cast<float>(b[i]);
    visit(i, va, vb, 1);
  }
  const int64_t packs = (end - body) / W;
  for (int64_t p = tid; p < packs; p += stride) {
    const int64_t i = body + p * W;
    const Pack<scalar_t, W> pa = *reinterpret_cast<const Pack<scalar_t, W>*>(a + i);
#pragma unroll
    for (int j = 0; j < W; ++j) va[j] = static_cast<float>(pa.v[j]);
    if (b != nullptr) {
      const Pack<scalar_t, W> pb = *reinterpret_cast<const Pack<scalar_t, W>*>(b + i);
#pragma unroll
      for (int j = 0; j < W; ++j) vb[j] = static_cast<float>(pb.v[j]);
    }
    visit(i, va, vb, W);
  }
  for (int64_t i = body + packs * W + tid; i < end; i += stride) {
    va[0] = static_cast<float>(a[i]);
    if (b != nullptr) vb[0] = static_cast<float>(b[i]);
    visit(i, va, vb, 1);
  }
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

template <class Op, class scalar_t>
__global__ void __launch_bounds__(kMaxRowOpsThreads) row_partials_kernel(Op op, RowsView<scalar_t> a, RowsView<scalar_t> b, int64_t cols, int64_t chunk,
                                    typename Op::State* partials) {
  using State = typename Op::State;
  const int64_t row = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < cols ? begin + chunk : cols;
  State state = op.identity();
  for_each_pack(a.row(row), b.row(row), begin, end,
                [&](int64_t, const float* va, const float* vb, int n) { op.accumulate(state, va, vb, n); });
  __shared__ State scratch[kReduceScratchSize];
  state = block_reduce(
      state, [&](const State& x, const State& y) { return op.merge(x, y); }, op.identity(), scratch);
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

template <class Op, class scalar_t, class out_t>
__global__ void __launch_bounds__(kMaxRowOpsThreads) row_map_kernel(Op op, RowsView<scalar_t> a, RowsView<scalar_t> b, int64_t cols, int64_t chunk,
                               const typename Op::State* partials, out_t* out) {
  using State = typename Op::State;
  const int64_t row = blockIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < cols ? begin + chunk : cols;
  // The block merges its row's partial states: strided over threads, then a
  // block reduction (a fixed tree, so every block of the row gets the same bits).
  State state = op.identity();
  for (int64_t k = threadIdx.x; k < splits; k += blockDim.x) state = op.merge(state, partials[row * splits + k]);
  __shared__ State scratch[kReduceScratchSize];
  state = block_reduce(
      state, [&](const State& x, const State& y) { return op.merge(x, y); }, op.identity(), scratch);
  const auto constants = op.row_constants(state, row);
  out_t* out_row = out + row * cols;
  for_each_pack(a.row(row), b.row(row), begin, end, [&](int64_t i, const float* va, const float* vb, int n) {
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

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------

// Softmax state (max, sum exp, sum shifted z*exp) of z = a / T.
struct SoftmaxReduction {
  using State = core::SoftmaxState;
  float inv_temperature;

  LK_HOST_DEVICE State identity() const { return core::empty_state(); }
  LK_HOST_DEVICE State merge(const State& x, const State& y) const { return core::merge(x, y); }
  LK_HOST_DEVICE void accumulate(State& state, const float* a, const float*, int n) const {
    float z[kMaxPackElements];
    for (int j = 0; j < n; ++j) z[j] = a[j] * inv_temperature;
    core::accumulate(state, z, n);
  }
};

struct RowSum {
  float value;
};

// sum_i a_i * b_i (dot) or sum_i a_i (plain sum).
template <bool kDot>
struct SumReduction {
  using State = RowSum;
  LK_HOST_DEVICE State identity() const { return RowSum{0.0f}; }
  LK_HOST_DEVICE State merge(const State& x, const State& y) const { return RowSum{x.value + y.value}; }
  LK_HOST_DEVICE void accumulate(State& state, const float* a, const float* b, int n) const {
    for (int j = 0; j < n; ++j) state.value += kDot ? a[j] * b[j] : a[j];
  }
};

// ---------------------------------------------------------------------------
// Elementwise outputs (pass 2a). z = x / T throughout.
// ---------------------------------------------------------------------------

// softmax: p_i = exp((z_i - m) - log s)
struct SoftmaxOutput : SoftmaxReduction {
  using RowConstants = core::Normaliser;
  LK_HOST_DEVICE RowConstants row_constants(const State& s, int64_t) const { return core::normaliser(s); }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const {
    return expf(c.log_prob(x * inv_temperature));
  }
};

// log_softmax: (z_i - m) - log s
struct LogSoftmaxOutput : SoftmaxReduction {
  using RowConstants = core::Normaliser;
  LK_HOST_DEVICE RowConstants row_constants(const State& s, int64_t) const { return core::normaliser(s); }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const { return c.log_prob(x * inv_temperature); }
};

// d lse / d x_i = g * p_i / T, with g the incoming per-row gradient.
template <class grad_t>
struct LogsumexpGradOutput : SoftmaxReduction {
  const grad_t* grad;  // one value per row
  struct RowConstants {
    core::Normaliser normaliser;
    float scale;
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, int64_t row) const {
    return {core::normaliser(s), static_cast<float>(grad[row]) * inv_temperature};
  }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const {
    return c.scale * expf(c.normaliser.log_prob(x * inv_temperature));
  }
};

// d H / d x_i = -(g / T) p_i (log p_i + H)
template <class grad_t>
struct EntropyGradOutput : SoftmaxReduction {
  const grad_t* grad;
  struct RowConstants {
    core::Normaliser normaliser;
    float entropy, scale;
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, int64_t row) const {
    return {core::normaliser(s), core::entropy(s), static_cast<float>(grad[row]) * inv_temperature};
  }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const {
    return c.scale * core::entropy_grad_term(c.normaliser.log_prob(x * inv_temperature), c.entropy);
  }
};

// softmax backward, a = dy, b = y: dx_i = y_i (dy_i - sum_j dy_j y_j) / T
struct SoftmaxGradOutput : SumReduction<true> {
  float inv_temperature;
  struct RowConstants {
    float dot;
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, int64_t) const { return {s.value}; }
  LK_HOST_DEVICE float output(const RowConstants& c, float dy, float y) const { return inv_temperature * y * (dy - c.dot); }
};

// log_softmax backward, a = dy, b = y (log-probabilities): dx_i = (dy_i - exp(y_i) sum_j dy_j) / T
struct LogSoftmaxGradOutput : SumReduction<false> {
  float inv_temperature;
  struct RowConstants {
    float sum;
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, int64_t) const { return {s.value}; }
  LK_HOST_DEVICE float output(const RowConstants& c, float dy, float y) const {
    return inv_temperature * (dy - expf(y) * c.sum);
  }
};

// ---------------------------------------------------------------------------
// Per-row results (pass 2b).
// ---------------------------------------------------------------------------

template <class out_t>
struct LogsumexpResult : SoftmaxReduction {
  out_t* out;
  LK_HOST_DEVICE void finalize(const State& s, int64_t row) const { out[row] = static_cast<out_t>(core::log_sum_exp(s)); }
};

struct EntropyResult : SoftmaxReduction {
  float* out;
  LK_HOST_DEVICE void finalize(const State& s, int64_t row) const { out[row] = core::entropy(s); }
};

// The raw state, as (max, sum_exp, sum_shifted) triples.
struct StatsResult : SoftmaxReduction {
  float* out;
  LK_HOST_DEVICE void finalize(const State& s, int64_t row) const {
    out[3 * row + 0] = s.max;
    out[3 * row + 1] = s.sum_exp;
    out[3 * row + 2] = s.sum_shifted;
  }
};

}  // namespace logitkit::cuda
