// Per-element and per-token math of the memory-light linear cross-entropy,
// shared by the CPU and CUDA chunk kernels (host + device).
//
// A chunk ("tile") of raw logits x = hidden_chunk @ weight_chunk^T (+ bias),
// rows = tokens, columns = vocabulary entries [col_begin, col_begin + cols),
// is turned into the loss's logits by
//   u = x / T                               (temperature)
//   z = c * tanh(u / c)   if softcap c > 0, else z = u
// with dz/dx = (1 - (z / c)^2) / T  (resp. 1 / T).
//
// Forward, per token, over all tiles of its row (merged across tiles with
// the softmax-state merge of softmax_state.h):
//   m, s, b            the softmax state of z (lse = m + log s, H = log s - b/s)
//   z_target           z at the target column (NaN until a tile holds it)
//   weighted_sum       sum_c w_c z_c (w: class weights, 1 without them)
// These five floats per token are all that is kept for the backward.
//
// Backward. Every loss logitkit builds on these tiles has a gradient of the
// form (p = softmax(z), lse and H per token, y the target)
//   dL/dz_c = p_c (a + e (z_c - lse)) - beta [c == y] - sigma w_c
// with four per-token coefficients (a, e, beta, sigma) computed from O(N)
// tensors by the caller:
//   cross-entropy with label smoothing eps, class weights w, z-loss zeta and
//   upstream gradient g (L = (1-eps) w_y (lse - z_y)
//                            + eps/V sum_c w_c (lse - z_c) + zeta lse^2):
//       a = g ((1-eps) w_y + eps/V W + 2 zeta lse),  e = 0,
//       beta = g (1-eps) w_y,  sigma = g eps / V,   W = sum_c w_c;
//   log-probability and entropy with upstream gradients g_l and g_h
//   (L = g_l (z_y - lse) + g_h H, dH/dz_c = -p_c (z_c - lse + H)):
//       a = -g_l - g_h H,  e = -g_h,  beta = -g_l,  sigma = 0.
// z_c - lse is evaluated as (z_c - m) - log s (core::Normaliser): exact for
// z_c near the max m, where z_c - lse would lose ulp(lse) to rounding.
// At the target column, a p_y - beta is evaluated as
//   beta (p_y - 1) + (a - beta) p_y,  with p_y - 1 = expm1(z_y - lse)
// in fp32, so that p_y -> 1 loses nothing to cancellation (the bf16
// "p_y - 1" bug users report elsewhere).
// Masked logits (x = -inf, e.g. a bias of -inf on excluded vocabulary):
// p = 0 and no contribution to m, s, b (a tile whose row is all -inf folds
// in as the empty state), and a gradient of -sigma w_c (0 without label
// smoothing) rather than 0 * inf = NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "softmax_state.h"

namespace logitkit::core {

// Layout of the per-token forward state (fp32, kLinearCeStateWidth per token).
enum LinearCeStateField : int {
  kLinearCeMax = 0,
  kLinearCeSumExp,
  kLinearCeSumShifted,
  kLinearCeTargetLogit,
  kLinearCeWeightedSum,
  kLinearCeStateWidth
};

// Layout of the per-token backward coefficients (fp32, kLinearCeCoefWidth per token).
enum LinearCeCoefField : int {
  kLinearCeCoefProb = 0,
  kLinearCeCoefEntropy,
  kLinearCeCoefTarget,
  kLinearCeCoefSmooth,
  kLinearCeCoefWidth
};

// Width of the per-token normaliser [m, log s] the backward reads.
constexpr int kLinearCeNormaliserWidth = 2;

// The map x -> z (temperature, then optional softcap) and its derivative.
struct LogitTransform {
  float inv_temperature;
  float softcap;  // 0: no softcap

  LK_HOST_DEVICE float apply(float x) const {
    const float u = x * inv_temperature;
    return softcap > 0.0f ? softcap * tanhf(u / softcap) : u;
  }
  // dz/dx expressed through z (no second tanh).
  LK_HOST_DEVICE float derivative(float z) const {
    if (softcap > 0.0f) {
      const float r = z / softcap;
      return inv_temperature * (1.0f - r * r);
    }
    return inv_temperature;
  }
};

struct LinearCeCoefficients {
  float prob, entropy, target, smooth;  // a, e, beta, sigma
};

// p (a + e shifted), and 0 where p = 0: a masked logit (z = -inf, so
// shifted = -inf) contributes nothing, not 0 * inf = NaN.
LK_HOST_DEVICE float prob_term(float p, float a, float e, float shifted) {
  return p == 0.0f ? 0.0f : p * (a + e * shifted);
}

// dL/dz_c for one element (see the header comment). `shifted` = z_c - lse.
LK_HOST_DEVICE float linear_ce_grad_z(const LinearCeCoefficients& k, float shifted, bool is_target,
                                      float class_weight) {
  const float p = expf(shifted);
  if (is_target) {
    // a p - beta = beta (p - 1) + (a - beta) p, with p - 1 = expm1(z - lse).
    return k.target * expm1f(shifted) + prob_term(p, k.prob - k.target, k.entropy, shifted) - k.smooth * class_weight;
  }
  return prob_term(p, k.prob, k.entropy, shifted) - k.smooth * class_weight;
}

// A token's forward statistics over part of its row (a tile, or one
// thread's share of a tile): softmax state of z and sum_c w_c z_c.
struct LinearCePartial {
  SoftmaxState softmax;
  float weighted_sum;
};

LK_HOST_DEVICE LinearCePartial empty_partial() { return LinearCePartial{empty_state(), 0.0f}; }

LK_HOST_DEVICE LinearCePartial merge(const LinearCePartial& a, const LinearCePartial& b) {
  return LinearCePartial{merge(a.softmax, b.softmax), a.weighted_sum + b.weighted_sum};
}

// One tile of logits and everything a chunk kernel needs.
struct LinearCeChunk {
  float* logits = nullptr;              // (rows, cols), contiguous fp32
  int64_t rows = 0;                     // tokens in the tile
  int64_t cols = 0;                     // vocabulary entries in the tile
  int64_t col_begin = 0;                // first vocabulary index of the tile
  const int64_t* target = nullptr;      // rows targets (any value; matched against the columns)
  const float* class_weight = nullptr;  // V fp32 weights, or nullptr (all 1)
  LogitTransform transform{1.0f, 0.0f};
  float* state = nullptr;               // forward: rows x kLinearCeStateWidth
  const float* normaliser = nullptr;    // backward: rows x kLinearCeNormaliserWidth, [m, log s] of the token
  const float* coefficients = nullptr;  // backward: rows x kLinearCeCoefWidth

  // The tile's column of the row's target, or -1 when the target is not in the tile.
  LK_HOST_DEVICE int64_t target_column(int64_t row) const {
    const int64_t y = target[row] - col_begin;
    return y >= 0 && y < cols ? y : -1;
  }
  // The class weights of the tile's columns, or nullptr (all 1).
  LK_HOST_DEVICE const float* tile_class_weights() const {
    return class_weight != nullptr ? class_weight + col_begin : nullptr;
  }
  // Folds a row's tile statistics into its token's running state; z_target
  // is the row's z at target_column(row) (read only when that is >= 0).
  LK_HOST_DEVICE void fold_into_state(int64_t row, const LinearCePartial& tile, float z_target) const {
    float* st = state + row * kLinearCeStateWidth;
    const SoftmaxState before{st[kLinearCeMax], st[kLinearCeSumExp], st[kLinearCeSumShifted]};
    const SoftmaxState merged = merge(before, tile.softmax);
    st[kLinearCeMax] = merged.max;
    st[kLinearCeSumExp] = merged.sum_exp;
    st[kLinearCeSumShifted] = merged.sum_shifted;
    st[kLinearCeWeightedSum] += tile.weighted_sum;
    if (target_column(row) >= 0) st[kLinearCeTargetLogit] = z_target;
  }
  // The backward's per-token coefficients (a, e, beta, sigma) of a row.
  LK_HOST_DEVICE LinearCeCoefficients coefficients_of(int64_t row) const {
    const float* k = coefficients + row * kLinearCeCoefWidth;
    return {k[kLinearCeCoefProb], k[kLinearCeCoefEntropy], k[kLinearCeCoefTarget], k[kLinearCeCoefSmooth]};
  }
  // The backward's per-token normaliser (m, log s) of a row.
  LK_HOST_DEVICE Normaliser normaliser_of(int64_t row) const {
    const float* n = normaliser + row * kLinearCeNormaliserWidth;
    return Normaliser{n[0], n[1]};
  }
  // dL/dx of one element with z = transform(x) (see the header comment):
  // z - lse as (z - m) - log s, exact for z near the max.
  LK_HOST_DEVICE float grad_x(const LinearCeCoefficients& k, const Normaliser& norm, float x, bool is_target,
                              float class_weight) const {
    const float z = transform.apply(x);
    return linear_ce_grad_z(k, norm.log_prob(z), is_target, class_weight) * transform.derivative(z);
  }
};

}  // namespace logitkit::core
