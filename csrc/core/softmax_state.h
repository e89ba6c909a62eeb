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
//
// Special values (documented in the Python API):
//   * -inf logits contribute nothing; an all -inf row has m = -inf, s = 0,
//     so lse = -inf and softmax/entropy are NaN (as torch gives).
//   * a +inf logit makes m = +inf: lse = +inf, softmax/log_softmax/entropy
//     are NaN for the whole row (the distribution is undefined).
//   * a NaN logit makes s NaN, so every output of its row is NaN (never of
//     other rows).
#pragma once

#include <cmath>
#include <limits>

#include "host_device.h"

namespace logitkit::core {

struct SoftmaxState {
  float max;          // m
  float sum_exp;      // s
  float sum_shifted;  // b
};

LK_HOST_DEVICE float neg_infinity() { return -std::numeric_limits<float>::infinity(); }
LK_HOST_DEVICE float pos_infinity() { return std::numeric_limits<float>::infinity(); }
LK_HOST_DEVICE float quiet_nan() { return std::numeric_limits<float>::quiet_NaN(); }
LK_HOST_DEVICE float max_finite() { return std::numeric_limits<float>::max(); }

LK_HOST_DEVICE SoftmaxState empty_state() { return SoftmaxState{neg_infinity(), 0.0f, 0.0f}; }

// exp(old_max - new_max), with an empty slice (old_max = -inf) scaling to 0
// instead of exp(-inf - (-inf)) = NaN.
LK_HOST_DEVICE float rescale_factor(float old_max, float new_max) {
  return old_max == neg_infinity() ? 0.0f : expf(old_max - new_max);
}

// Contribution of a state to sum_shifted once rescaled to new_max.
LK_HOST_DEVICE float rescaled_shifted(const SoftmaxState& st, float new_max, float factor) {
  // factor == 0: the slice is empty or negligible; (m - M) * s could be NaN.
  return factor == 0.0f ? 0.0f : factor * (st.sum_shifted + (st.max - new_max) * st.sum_exp);
}

// The same state expressed relative to another reference new_max (usually a
// larger max): s' = f s, b' = f (b + (m - new_max) s), f = exp(m - new_max).
LK_HOST_DEVICE SoftmaxState rescaled(const SoftmaxState& st, float new_max) {
  const float f = rescale_factor(st.max, new_max);
  return SoftmaxState{new_max, st.sum_exp * f, rescaled_shifted(st, new_max, f)};
}

LK_HOST_DEVICE SoftmaxState merge(const SoftmaxState& a, const SoftmaxState& b) {
  const float m = fmaxf(a.max, b.max);
  const SoftmaxState ra = rescaled(a, m), rb = rescaled(b, m);
  return SoftmaxState{m, ra.sum_exp + rb.sum_exp, ra.sum_shifted + rb.sum_shifted};  // NaN in either stays NaN
}

// Adds n scaled logits z[0..n) to the state: one max over the group, one
// rescale, then one exp per element.
LK_HOST_DEVICE void accumulate(SoftmaxState& st, const float* z, int n) {
  float group_max = neg_infinity();
  for (int i = 0; i < n; ++i) group_max = fmaxf(group_max, z[i]);
  if (group_max == neg_infinity()) {
    // Only -inf (and possibly NaN) values: NaN must still poison the state.
    for (int i = 0; i < n; ++i)
      if (z[i] != z[i]) st.sum_exp = quiet_nan();
    return;
  }
  const float m = fmaxf(st.max, group_max);
  const SoftmaxState before = rescaled(st, m);
  float s = before.sum_exp;
  float b = before.sum_shifted;
  for (int i = 0; i < n; ++i) {
    const float d = z[i] - m;  // -inf for masked entries, exp(-inf) = 0
    const float e = expf(d);
    s += e;
    b += e == 0.0f ? 0.0f : d * e;
  }
  st.max = m;
  st.sum_exp = s;
  st.sum_shifted = b;
}

// log-sum-exp of the row: m + log s; +inf if the row holds +inf.
LK_HOST_DEVICE float log_sum_exp(const SoftmaxState& st) {
  return st.max == pos_infinity() ? pos_infinity() : st.max + logf(st.sum_exp);
}

// The normaliser used to write softmax / log-softmax outputs, kept as the
// pair (m, log s): log p_i = (z_i - m) - log s. Subtracting m first is exact
// for z_i near m (Sterbenz), so large logits (|z| ~ 1e4) lose no precision,
// unlike z_i - lse. For a row holding +inf (undefined distribution) both
// fields are NaN, so every output of the row is NaN.
struct Normaliser {
  float max;
  float log_sum;
  LK_HOST_DEVICE float log_prob(float z) const { return (z - max) - log_sum; }
  // True when every output of the row is NaN: NaN/+inf logits, or all -inf.
  LK_HOST_DEVICE bool undefined() const { return max != max || log_sum != log_sum || max == neg_infinity(); }
};

LK_HOST_DEVICE Normaliser normaliser(const SoftmaxState& st) {
  if (st.max == pos_infinity()) return Normaliser{quiet_nan(), quiet_nan()};
  return Normaliser{st.max, logf(st.sum_exp)};
}

// Shannon entropy in nats, H = log s - b / s. NaN for an all -inf row and for
// a row holding +inf.
LK_HOST_DEVICE float entropy(const SoftmaxState& st) {
  if (st.max == pos_infinity()) return quiet_nan();
  return logf(st.sum_exp) - st.sum_shifted / st.sum_exp;
}

// Elementwise pieces of the backward formulas, with z = x / T:
//   d lse / d x_i       = p_i / T
//   d H / d x_i         = -(1/T) p_i (log p_i + H)        (0 where p_i = 0)
//   softmax backward:     dx_i = y_i (dy_i - sum_j dy_j y_j) / T
//   log_softmax backward: dx_i = (dy_i - exp(y_i) sum_j dy_j) / T
LK_HOST_DEVICE float entropy_grad_term(float log_p, float entropy_value) {
  const float p = expf(log_p);
  return p == 0.0f ? 0.0f : -p * (log_p + entropy_value);
}

}  // namespace logitkit::core
