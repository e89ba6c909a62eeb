// The scalar policies of the row ops, written once for every backend (host +
// device): the per-row reductions, the per-row constants and per-element
// outputs of the maps, and the per-row results. The CUDA kernels
// (csrc/cuda/row_kernels.cuh) use them as they are; the CPU kernels
// (csrc/cpu/row_ops_cpu.cpp) take their states, merges, row constants and
// results from here and add vectorised tile bodies of their own.
//
// Every row op is "reduce, then map or finalise" over z = x / T:
//   reduction   State identity(); State merge(State, State);
//               void accumulate(State&, const float* a, const float* b, int n);
//   map         RowConstants row_constants(State, float row_grad);
//               float output(const RowConstants&, float a, float b);
//   result      void finalize(const State&, int64_t row)  (writes out[row])
// `a` and `b` are a row's one or two inputs in fp32 (b is unused by the
// single-input ops); `row_grad` is the incoming per-row gradient of the
// backward of a per-row result (0 for the others). All arithmetic is fp32.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "softmax_state.h"

namespace logitkit::core {

// Most elements one accumulate() call takes (a 16-byte load of 2-byte types).
constexpr int kMaxAccumulate = 8;

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------

// Softmax state (max, sum exp, sum shifted) of z = a / T.
struct SoftmaxReduction {
  using State = SoftmaxState;
  float inv_temperature;

  LK_HOST_DEVICE State identity() const { return empty_state(); }
  LK_HOST_DEVICE State merge(const State& x, const State& y) const { return core::merge(x, y); }
  LK_HOST_DEVICE void accumulate(State& state, const float* a, const float*, int n) const {
    float z[kMaxAccumulate];
    for (int j = 0; j < n; ++j) z[j] = a[j] * inv_temperature;
    core::accumulate(state, z, n);
  }
};

struct RowSum {
  float value;
};

// sum_i a_i * b_i (kDot) or sum_i a_i. inv_temperature is not used by the
// sum itself, only by the maps built on it (the backwards of the outputs).
template <bool kDot>
struct SumReduction {
  using State = RowSum;
  float inv_temperature;

  LK_HOST_DEVICE State identity() const { return RowSum{0.0f}; }
  LK_HOST_DEVICE State merge(const State& x, const State& y) const { return RowSum{x.value + y.value}; }
  LK_HOST_DEVICE void accumulate(State& state, const float* a, const float* b, int n) const {
    for (int j = 0; j < n; ++j) state.value += kDot ? a[j] * b[j] : a[j];
  }
};

// ---------------------------------------------------------------------------
// Maps (elementwise outputs). z = x / T throughout. A row whose normaliser is
// undefined (NaN or +inf logits) gets NaN constants, hence NaN outputs.
// ---------------------------------------------------------------------------

// softmax: p_i = exp((z_i - m) - log s)
struct SoftmaxMap : SoftmaxReduction {
  using RowConstants = Normaliser;
  LK_HOST_DEVICE RowConstants row_constants(const State& s, float) const { return normaliser(s); }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const {
    return expf(c.log_prob(x * inv_temperature));
  }
};

// log_softmax: (z_i - m) - log s
struct LogSoftmaxMap : SoftmaxReduction {
  using RowConstants = Normaliser;
  LK_HOST_DEVICE RowConstants row_constants(const State& s, float) const { return normaliser(s); }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const { return c.log_prob(x * inv_temperature); }
};

// d lse / d x_i = g p_i / T, with g the incoming per-row gradient.
struct LogsumexpGradMap : SoftmaxReduction {
  struct RowConstants {
    Normaliser normaliser;
    float scale;  // g / T
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, float row_grad) const {
    return {core::normaliser(s), row_grad * inv_temperature};
  }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const {
    return c.scale * expf(c.normaliser.log_prob(x * inv_temperature));
  }
};

// d H / d x_i = -(g / T) p_i (log p_i + H), 0 where p_i = 0
struct EntropyGradMap : SoftmaxReduction {
  struct RowConstants {
    Normaliser normaliser;
    float entropy;
    float scale;  // g / T
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, float row_grad) const {
    return {core::normaliser(s), core::entropy(s), row_grad * inv_temperature};
  }
  LK_HOST_DEVICE float output(const RowConstants& c, float x, float) const {
    return c.scale * entropy_grad_term(c.normaliser.log_prob(x * inv_temperature), c.entropy);
  }
};

// softmax backward, a = dy, b = y: dx_i = y_i (dy_i - sum_j dy_j y_j) / T
struct SoftmaxGradMap : SumReduction<true> {
  struct RowConstants {
    float dot;  // sum_j dy_j y_j
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, float) const { return {s.value}; }
  LK_HOST_DEVICE float output(const RowConstants& c, float dy, float y) const {
    return inv_temperature * y * (dy - c.dot);
  }
};

// log_softmax backward, a = dy, b = y (log-probabilities):
// dx_i = (dy_i - exp(y_i) sum_j dy_j) / T
struct LogSoftmaxGradMap : SumReduction<false> {
  struct RowConstants {
    float sum;  // sum_j dy_j
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, float) const { return {s.value}; }
  LK_HOST_DEVICE float output(const RowConstants& c, float dy, float y) const {
    return inv_temperature * (dy - expf(y) * c.sum);
  }
};

// ---------------------------------------------------------------------------
// Per-row results, from the row's merged softmax state.
// ---------------------------------------------------------------------------

// log-sum-exp, in the input dtype.
template <class out_t>
struct LogsumexpResult : SoftmaxReduction {
  out_t* out;
  LK_HOST_DEVICE void finalize(const State& s, int64_t row) const { out[row] = static_cast<out_t>(log_sum_exp(s)); }
};

// Entropy in nats, fp32.
struct EntropyResult : SoftmaxReduction {
  float* out;
  LK_HOST_DEVICE void finalize(const State& s, int64_t row) const { out[row] = entropy(s); }
};

// The raw state, as (max, sum_exp, sum_shifted) triples in fp32.
struct StatsResult : SoftmaxReduction {
  float* out;
  LK_HOST_DEVICE void finalize(const State& s, int64_t row) const {
    out[3 * row + 0] = s.max;
    out[3 * row + 1] = s.sum_exp;
    out[3 * row + 2] = s.sum_shifted;
  }
};

}  // namespace logitkit::core
