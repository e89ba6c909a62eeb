// The per-row math of Top-H truncation shared by the CPU and CUDA kernels
// (see docs/top_h.md for the three rules, whose definitions these
// functions implement).
//
// Notation: x = input logits of a row, z = x / T, h(p) = -p log p, h(0) = 0.
//
// Ordering and ties: tokens are ranked by their *input* logit x (the order of
// z = x / T is the same for T > 0, but rounding could create ties in z that
// are not ties in x). Among equal logits the lower vocabulary index ranks
// first. Kernels compare 32-bit "orderable keys" (orderable_key below) so that
// the float order becomes an unsigned integer order (radix selection).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"
#include "softmax_state.h"

namespace logitkit::core {

enum class TopHRule : int { hf = 0, official = 1, exact = 2 };

// z = x / T is core::scaled_logit (softmax_state.h): the product x * (1 / T)
// rounded on its own, never contracted into an FMA, so that z - m for the
// token that set the row max is 0; that decides the "exact" rule on peaked
// rows whose entropy budget is ~1e-24.

// Default number of top tokens the capped rules ("hf", "official") look at.
constexpr int64_t kTopHDefaultCap = 100;

// Monotone map float -> uint32: a < b (floats, no NaN) iff key(a) < key(b),
// and a == b iff key(a) == key(b): -0.0 takes +0.0's key, so that the two
// zeros are one logit value, ranked by index among themselves as the CPU's
// float comparisons rank them (until December 5th the CUDA kernels ranked
// every +0.0 above every -0.0, and Top-H could keep other tokens of a zero
// tie group than on the CPU). Positive floats get the sign bit set, negative
// floats are bit-inverted.
LK_HOST_DEVICE uint32_t orderable_key(float x) {
  const float value = x == 0.0f ? 0.0f : x;
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

LK_HOST_DEVICE float key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

// Entropy of the distribution q obtained by renormalising a set S of tokens:
// with e_i = exp(z_i - m) and d_i = z_i - m for one common reference m,
//   E = sum_S e_i, D = sum_S d_i e_i, q_i = e_i / E,
//   H(q) = -sum q_i log q_i = log E - D / E          (independent of m).
// This is the "exact" rule's left-hand side H(q_k) for the prefix S = S_k.
LK_HOST_DEVICE float renormalised_entropy(float e_sum, float d_sum) { return logf(e_sum) - d_sum / e_sum; }
LK_HOST_DEVICE double renormalised_entropy(double e_sum, double d_sum) { return ::log(e_sum) - d_sum / e_sum; }

// The "exact" rule's budget alpha * H(p), clamped at 0 so that the single
// most probable token (whose renormalised entropy is exactly 0) always fits,
// even when rounding makes H(p) of a one-hot row slightly negative. alpha = 1
// keeps the whole support by definition (H(q_V) = H(p)): budget +inf, so that
// rounding of two different sums cannot drop tokens.
LK_HOST_DEVICE float exact_budget(float alpha, float entropy_of_p) {
  if (alpha >= 1.0f) return pos_infinity();
  const float b = alpha * entropy_of_p;
  return b > 0.0f ? b : 0.0f;
}

// The short scan of the capped rules over the K largest scaled logits
// z_0 >= z_1 >= ... >= z_{K-1} (value(i) returns z_i). Returns how many of
// them are kept (>= 1):
//   "hf":       p_i = softmax over the K values only: L = log sum_{i<K} e^{z_i};
//   "official": p_i = softmax over the full vocabulary: L = full_lse;
//   p_i = exp(z_i - L), h_i = p_i (L - z_i), tau = alpha * sum_{i<K} h_i,
//   c_k = sum_{i<=k} h_i; keep sorted token k iff c_k <= tau and p_k > 0
//   (zero probabilities are never kept), and always keep token 0.
// c_k is non-decreasing and p_k non-increasing, so the kept tokens are a
// prefix: the scan stops at the first token that fails. fp32 throughout.
template <class Value>
LK_HOST_DEVICE int64_t capped_keep_count(Value value, int64_t k, TopHRule rule, float full_lse, float alpha) {
  float lse = full_lse;
  if (rule == TopHRule::hf) {
    const float top = value(0);
    float s = 0.0f;
    for (int64_t i = 0; i < k; ++i) s += expf(value(i) - top);
    lse = top + logf(s);
  }
  auto h = [&](float z) {
    const float p = expf(z - lse);
    return p == 0.0f ? 0.0f : p * (lse - z);
  };
  float total = 0.0f;
  for (int64_t i = 0; i < k; ++i) total += h(value(i));
  const float tau = alpha * total;
  float c = h(value(0));
  int64_t kept = 1;
  for (; kept < k; ++kept) {
    const float z = value(kept);
    if (expf(z - lse) == 0.0f) break;
    c += h(z);
    if (!(c <= tau)) break;
  }
  return kept;
}

}  // namespace logitkit::core
