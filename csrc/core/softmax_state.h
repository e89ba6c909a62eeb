// The mergeable per-row softmax state shared by every kernel of logitkit
// (CPU and CUDA): softmax, log-softmax, log-sum-exp, entropy, and the later
// cross-entropy and Top-H kernels.
//
// For the scaled logits z_i = x_i / T of a row (or of a slice of it):
//   max           m = max_i z_i
//   sum_exp       s = sum_i exp(z_i - m)
//   sum_shifted   b = sum_i (z_i - m) * exp(z_i - m)
// from which
//   log-sum-exp   lse = m + log(s)
//   entropy       H   = lse - (sum_i z_i exp(z_i - m)) / s  =  log(s) - b / s.
// b is kept relative to the max (rather than sum z*exp) so that H is not the
// difference of two large numbers when |z| is large: H = log s - b/s has no
// cancellation at z ~ 1e4.
//
// Two states of disjoint slices merge exactly (up to rounding) by rescaling
// both to the larger max M (Milakov & Gimelshein, "Online normalizer
// calculation for softmax", 2018, extended to b):
//   s = s_a e^{m_a - M} + s_b e^{m_b - M}
//   b = e^{m_a - M} (b_a + (m_a - M) s_a) + e^{m_b - M} (b_b + (m_b - M) s_b)
// merge() is commutative bit for bit (max and + are), not associative: a
// deterministic result needs a fixed merge tree (docs/determinism.md).
//
// Special values (docs/numerics.md; the same on every backend):
//   * -inf logits contribute nothing; an all -inf row has m = -inf, s = 0,
//     so lse = -inf and softmax/entropy are NaN (as torch gives).
//   * a +inf logit makes m = +inf: lse = +inf, softmax/log_softmax/entropy
//     are NaN for the whole row (the distribution is undefined); s and b of
//     such a state carry no meaning.
//   * a NaN logit makes m NaN (and s, b), whatever else the row holds: NaN
//     wins over +inf, as in torch. Every output of the row is NaN (never of
//     other rows). The max of two states propagates NaN (nan_max), so the
//     rule holds for every merge order and every backend.
//
// The state is a template on its arithmetic type: float for every dtype the
// CUDA kernels take, double for float64 inputs on the CPU. SoftmaxState is
// the float one.
#pragma once

#include <cmath>
#include <limits>

#include "host_device.h"

namespace logitkit::core {

template <class T>
struct BasicSoftmaxState {
  T max;          // m
  T sum_exp;      // s
  T sum_shifted;  // b
};
using SoftmaxState = BasicSoftmaxState<float>;

// The scaled logit z = x * (1/T), rounded once as a product and never
// contracted with a following subtraction: z - m must be exactly 0 for the
// row's max, whichever kernel forms it (a contracted fma(x, 1/T, -m) keeps the
// product's rounding residual, which made the top log-prob come out > 0).
// Device code uses the never-contracted __fmul_rn / __dmul_rn; the host
// sources are compiled with -ffp-contract=off (CMakeLists.txt).
template <class T>
LK_HOST_DEVICE T scaled_logit(T x, T inv_temperature) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fmul_rn(x, inv_temperature);
  } else {
    return __dmul_rn(x, inv_temperature);
  }
#else
  return x * inv_temperature;
#endif
}

template <class T = float>
LK_HOST_DEVICE T neg_infinity() {
  return -std::numeric_limits<T>::infinity();
}
template <class T = float>
LK_HOST_DEVICE T pos_infinity() {
  return std::numeric_limits<T>::infinity();
}
template <class T = float>
LK_HOST_DEVICE T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}
template <class T = float>
LK_HOST_DEVICE T max_finite() {
  return std::numeric_limits<T>::max();
}

// exp and log in the state's arithmetic type (expf / logf for float, which
// CUDA device code needs spelled out).
LK_HOST_DEVICE float exp_of(float x) { return expf(x); }
LK_HOST_DEVICE double exp_of(double x) { return ::exp(x); }
LK_HOST_DEVICE float log_of(float x) { return logf(x); }
LK_HOST_DEVICE double log_of(double x) { return ::log(x); }

// max(a, b) that returns NaN when either is NaN (fmaxf ignores a NaN).
template <class T>
LK_HOST_DEVICE T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <class T = float>
LK_HOST_DEVICE BasicSoftmaxState<T> empty_state() {
  return BasicSoftmaxState<T>{neg_infinity<T>(), T(0), T(0)};
}

// The state of a row that holds a NaN.
template <class T>
LK_HOST_DEVICE BasicSoftmaxState<T> nan_state() {
  return BasicSoftmaxState<T>{quiet_nan<T>(), quiet_nan<T>(), quiet_nan<T>()};
}

// exp(old_max - new_max), with an empty slice (old_max = -inf) scaling to 0
// instead of exp(-inf - (-inf)) = NaN.
template <class T>
LK_HOST_DEVICE T rescale_factor(T old_max, T new_max) {
  return old_max == neg_infinity<T>() ? T(0) : exp_of(old_max - new_max);
}

// Contribution of a state to sum_shifted once rescaled to new_max.
template <class T>
LK_HOST_DEVICE T rescaled_shifted(const BasicSoftmaxState<T>& st, T new_max, T factor) {
  // factor == 0: the slice is empty or negligible; (m - M) * s could be NaN.
  return factor == T(0) ? T(0) : factor * (st.sum_shifted + (st.max - new_max) * st.sum_exp);
}

// The same state expressed relative to another reference new_max (usually a
// larger max): s' = f s, b' = f (b + (m - new_max) s), f = exp(m - new_max).
template <class T>
LK_HOST_DEVICE BasicSoftmaxState<T> rescaled(const BasicSoftmaxState<T>& st, T new_max) {
  const T f = rescale_factor(st.max, new_max);
  return BasicSoftmaxState<T>{new_max, st.sum_exp * f, rescaled_shifted(st, new_max, f)};
}

template <class T>
LK_HOST_DEVICE BasicSoftmaxState<T> merge(const BasicSoftmaxState<T>& a, const BasicSoftmaxState<T>& b) {
  const T m = nan_max(a.max, b.max);  // NaN in either state: m is NaN, hence s and b too
  const BasicSoftmaxState<T> ra = rescaled(a, m), rb = rescaled(b, m);
  return BasicSoftmaxState<T>{m, ra.sum_exp + rb.sum_exp, ra.sum_shifted + rb.sum_shifted};
}

// Adds n scaled logits z[0..n) to the state: one max over the group, one
// rescale, then one exp per element.
template <class T>
LK_HOST_DEVICE void accumulate(BasicSoftmaxState<T>& st, const T* z, int n) {
  T group_max = neg_infinity<T>();
  for (int i = 0; i < n; ++i) group_max = nan_max(group_max, z[i]);
  if (group_max != group_max) {
    st = nan_state<T>();
    return;
  }
  if (group_max == neg_infinity<T>()) return;  // only masked entries
  const T m = nan_max(st.max, group_max);
  const BasicSoftmaxState<T> before = rescaled(st, m);
  T s = before.sum_exp;
  T b = before.sum_shifted;
  for (int i = 0; i < n; ++i) {
    const T d = z[i] - m;  // -inf for masked entries, exp(-inf) = 0
    const T e = exp_of(d);
    s += e;
    b += e == T(0) ? T(0) : d * e;
  }
  st.max = m;
  st.sum_exp = s;
  st.sum_shifted = b;
}

// log-sum-exp of the row: m + log s; +inf if the row holds +inf (and no NaN).
template <class T>
LK_HOST_DEVICE T log_sum_exp(const BasicSoftmaxState<T>& st) {
  return st.max == pos_infinity<T>() ? pos_infinity<T>() : st.max + log_of(st.sum_exp);
}

// The normaliser used to write softmax / log-softmax outputs, kept as the
// pair (m, log s): log p_i = (z_i - m) - log s. Subtracting m first is exact
// for z_i near m (Sterbenz), so large logits (|z| ~ 1e4) lose no precision,
// unlike z_i - lse. For a row holding +inf (undefined distribution) both
// fields are NaN, so every output of the row is NaN.
template <class T>
struct BasicNormaliser {
  T max;
  T log_sum;
  LK_HOST_DEVICE T log_prob(T z) const { return (z - max) - log_sum; }
  // True when every output of the row is NaN: NaN/+inf logits, or all -inf.
  LK_HOST_DEVICE bool undefined() const { return max != max || log_sum != log_sum || max == neg_infinity<T>(); }
};
using Normaliser = BasicNormaliser<float>;

template <class T>
LK_HOST_DEVICE BasicNormaliser<T> normaliser(const BasicSoftmaxState<T>& st) {
  if (st.max == pos_infinity<T>()) return BasicNormaliser<T>{quiet_nan<T>(), quiet_nan<T>()};
  return BasicNormaliser<T>{st.max, log_of(st.sum_exp)};
}

// Shannon entropy in nats, H = log s - b / s. NaN for an all -inf row and for
// a row holding +inf or NaN.
template <class T>
LK_HOST_DEVICE T entropy(const BasicSoftmaxState<T>& st) {
  if (st.max == pos_infinity<T>()) return quiet_nan<T>();
  return log_of(st.sum_exp) - st.sum_shifted / st.sum_exp;
}

// Elementwise pieces of the backward formulas, with z = x / T:
//   d lse / d x_i       = p_i / T
//   d H / d x_i         = -(1/T) p_i (log p_i + H)        (0 where p_i = 0)
//   softmax backward:     dx_i = y_i (dy_i - sum_j dy_j y_j) / T
//   log_softmax backward: dx_i = (dy_i - exp(y_i) sum_j dy_j) / T
template <class T>
LK_HOST_DEVICE T entropy_grad_term(T log_p, T entropy_value) {
  const T p = exp_of(log_p);
  return p == T(0) ? T(0) : -p * (log_p + entropy_value);
}

}  // namespace logitkit::core
