// The scalar policies of the row ops, written once for every backend (host +
// device): the per-row reductions, the per-row constants and per-element
// outputs of the maps, and the per-row results. The CUDA kernels
// (csrc/cuda/row_kernels.cuh) use them as they are; the CPU kernels
// (csrc/cpu/row_ops_cpu.cpp) take their states, merges, row constants and
// results from here and add vectorised tile bodies of their own.
//
// Every row op is "reduce, then map or finalise" over z = x / T:
//   reduction   State identity(); State merge(State, State);
//               void accumulate(State&, const T* a, const T* b, int n);
//   map         RowConstants row_constants(State, T row_grad);
//               T output(const RowConstants&, T a, T b);
//   result      void finalize(const State&, int64_t row)  (writes out[row])
// `a` and `b` are a row's one or two inputs in T (b is unused by the
// single-input ops); `row_grad` is the incoming per-row gradient of the
// backward of a per-row result (0 for the others). Every policy is a template
// on its arithmetic type T: float for float32/bfloat16/float16 inputs (the
// only one the CUDA kernels instantiate), double for float64 inputs on the
// CPU.
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
template <class T>
struct SoftmaxReduction {
  using State = BasicSoftmaxState<T>;
  T inv_temperature;

  LK_HOST_DEVICE State identity() const { return empty_state<T>(); }
  LK_HOST_DEVICE State merge(const State& x, const State& y) const { return core::merge(x, y); }
  LK_HOST_DEVICE void accumulate(State& state, const T* a, const T*, int n) const {
    T z[kMaxAccumulate];
    for (int j = 0; j < n; ++j) z[j] = scaled_logit(a[j], inv_temperature);
    core::accumulate(state, z, n);
  }
};

template <class T>
struct RowSum {
  T value;
};

// sum_i a_i * b_i (kDot) or sum_i a_i. inv_temperature is not used by the
// sum itself, only by the maps built on it (the backwards of the outputs).
template <bool kDot, class T>
struct SumReduction {
  using State = RowSum<T>;
  T inv_temperature;

  LK_HOST_DEVICE State identity() const { return State{T(0)}; }
  LK_HOST_DEVICE State merge(const State& x, const State& y) const { return State{x.value + y.value}; }
  LK_HOST_DEVICE void accumulate(State& state, const T* a, const T* b, int n) const {
    for (int j = 0; j < n; ++j) state.value += kDot ? a[j] * b[j] : a[j];
  }
};

// ---------------------------------------------------------------------------
// Maps (elementwise outputs). z = x / T throughout. A row whose normaliser is
// undefined (NaN or +inf logits) gets NaN constants, hence NaN outputs.
// ---------------------------------------------------------------------------

// softmax: p_i = exp((z_i - m) - log s)
template <class T>
struct SoftmaxMap : SoftmaxReduction<T> {
  using typename SoftmaxReduction<T>::State;
  using RowConstants = BasicNormaliser<T>;
  LK_HOST_DEVICE RowConstants row_constants(const State& s, T) const { return normaliser(s); }
  LK_HOST_DEVICE T output(const RowConstants& c, T x, T) const {
    return exp_of(c.log_prob(scaled_logit(x, this->inv_temperature)));
  }
};

// log_softmax: (z_i - m) - log s
template <class T>
struct LogSoftmaxMap : SoftmaxReduction<T> {
  using typename SoftmaxReduction<T>::State;
  using RowConstants = BasicNormaliser<T>;
  LK_HOST_DEVICE RowConstants row_constants(const State& s, T) const { return normaliser(s); }
  LK_HOST_DEVICE T output(const RowConstants& c, T x, T) const {
    return c.log_prob(scaled_logit(x, this->inv_temperature));
  }
};

// d lse / d x_i = (g p_i) / T, with g the incoming per-row gradient. (g p_i
// is formed first: a large g / T must not turn p_i = 0 into inf * 0.)
template <class T>
struct LogsumexpGradMap : SoftmaxReduction<T> {
  using typename SoftmaxReduction<T>::State;
  struct RowConstants {
    BasicNormaliser<T> normaliser;
    T grad;  // g
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, T row_grad) const {
    return {core::normaliser(s), row_grad};
  }
  LK_HOST_DEVICE T output(const RowConstants& c, T x, T) const {
    const T inv_t = this->inv_temperature;
    return c.grad * exp_of(c.normaliser.log_prob(scaled_logit(x, inv_t))) * inv_t;
  }
};

// d H / d x_i = -(g p_i (log p_i + H)) / T, 0 where p_i = 0
template <class T>
struct EntropyGradMap : SoftmaxReduction<T> {
  using typename SoftmaxReduction<T>::State;
  struct RowConstants {
    BasicNormaliser<T> normaliser;
    T entropy;
    T grad;  // g
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, T row_grad) const {
    return {core::normaliser(s), core::entropy(s), row_grad};
  }
  LK_HOST_DEVICE T output(const RowConstants& c, T x, T) const {
    const T inv_t = this->inv_temperature;
    return c.grad * entropy_grad_term(c.normaliser.log_prob(scaled_logit(x, inv_t)), c.entropy) * inv_t;
  }
};

// softmax backward, a = dy, b = y: dx_i = y_i (dy_i - sum_j dy_j y_j) / T
template <class T>
struct SoftmaxGradMap : SumReduction<true, T> {
  using typename SumReduction<true, T>::State;
  struct RowConstants {
    T dot;  // sum_j dy_j y_j
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, T) const { return {s.value}; }
  LK_HOST_DEVICE T output(const RowConstants& c, T dy, T y) const { return this->inv_temperature * y * (dy - c.dot); }
};

// log_softmax backward, a = dy, b = y (log-probabilities):
// dx_i = (dy_i - exp(y_i) sum_j dy_j) / T
template <class T>
struct LogSoftmaxGradMap : SumReduction<false, T> {
  using typename SumReduction<false, T>::State;
  struct RowConstants {
    T sum;  // sum_j dy_j
  };
  LK_HOST_DEVICE RowConstants row_constants(const State& s, T) const { return {s.value}; }
  LK_HOST_DEVICE T output(const RowConstants& c, T dy, T y) const {
    return this->inv_temperature * (dy - exp_of(y) * c.sum);
  }
};

// ---------------------------------------------------------------------------
// Per-row results, from the row's merged softmax state.
// ---------------------------------------------------------------------------

// log-sum-exp, in the input dtype.
template <class out_t, class T>
struct LogsumexpResult : SoftmaxReduction<T> {
  out_t* out;
  LK_HOST_DEVICE void finalize(const BasicSoftmaxState<T>& s, int64_t row) const {
    out[row] = static_cast<out_t>(log_sum_exp(s));
  }
};

// Entropy in nats, in the arithmetic type (float32, or float64 for float64 inputs).
template <class T>
struct EntropyResult : SoftmaxReduction<T> {
  T* out;
  LK_HOST_DEVICE void finalize(const BasicSoftmaxState<T>& s, int64_t row) const { out[row] = entropy(s); }
};

// The raw state, as (max, sum_exp, sum_shifted) triples in the arithmetic type.
template <class T>
struct StatsResult : SoftmaxReduction<T> {
  T* out;
  LK_HOST_DEVICE void finalize(const BasicSoftmaxState<T>& s, int64_t row) const {
    out[3 * row + 0] = s.max;
    out[3 * row + 1] = s.sum_exp;
    out[3 * row + 2] = s.sum_shifted;
  }
};

}  // namespace logitkit::core
