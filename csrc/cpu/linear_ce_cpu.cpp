// CPU chunk kernels of the linear cross-entropy, vectorised with at::vec and
// parallel over the tile's rows (tokens). The math is csrc/core/linear_ce.h;
// the tile is fp32 and contiguous, so each row is processed in place.
//
// forward_chunk, per row: (1) z = softcap(x / T) in place and the tile max;
// (2) s = sum exp(z - m_tile), b = sum (z - m_tile) exp(z - m_tile),
// sum_c w_c z_c; the tile's state is then merged into the token's running
// state (core::LinearCeChunk::fold_into_state), with z at the target column.
// backward_chunk, per row: x <- (dL/dz)(z) * dz/dx, the target column redone
// in scalar code with the expm1 form of p_y - 1.
#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../core/linear_ce.h"
#include "kernel_tables.h"
#include "tuning.h"
#include "vec_tiles.h"

#ifndef CPU_CAPABILITY
#error "linear_ce_cpu.cpp must be compiled with CPU_CAPABILITY set (see CMakeLists.txt)"
#endif

namespace logitkit::cpu::CPU_CAPABILITY {
namespace {

using core::LinearCeChunk;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kRowGrain / std::max<int64_t>(1, cols)); }

// z = softcap(x / T), vectorised.
inline FVec transform(const FVec& x, const core::LogitTransform& t) {
  const FVec u = x * FVec(t.inv_temperature);
  if (t.softcap > 0.0f) return FVec(t.softcap) * (u * FVec(1.0f / t.softcap)).tanh();
  return u;
}

// dz/dx through z, vectorised.
inline FVec transform_derivative(const FVec& z, const core::LogitTransform& t) {
  if (t.softcap > 0.0f) {
    const FVec r = z * FVec(1.0f / t.softcap);
    return FVec(t.inv_temperature) * (FVec(1.0f) - r * r);
  }
  return FVec(t.inv_temperature);
}

// z = softcap(x / T) in place over a row of n elements; returns max z.
float transform_row(float* z, int64_t n, const core::LogitTransform& t) {
  const int64_t body = n / kLanes * kLanes;
  FVec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < body; i += kLanes) {
    const FVec v = transform(FVec::loadu(z + i), t);
    v.store(z + i);
    vmax = at::vec::maximum(vmax, v);
  }
  float row_max = reduce_max(vmax);
  for (int64_t i = body; i < n; ++i) {
    z[i] = t.apply(z[i]);
    row_max = std::isnan(z[i]) ? z[i] : std::max(row_max, z[i]);
  }
  return row_max;
}

// The tile statistics of a transformed row against its max m: s, b and
// sum_c w_c z_c (w: class weights, or nullptr for all 1).
// Masked entries (z = -inf) add nothing: (z - m) e is taken as 0 where
// e = 0, and a row that is all -inf (m = -inf) gives the empty state.
core::LinearCePartial row_partial(const float* z, int64_t n, float m, const float* w) {
  const int64_t body = n / kLanes * kLanes;
  const bool empty = m == -std::numeric_limits<float>::infinity();
  const FVec vm(empty ? 0.0f : m), zero(0.0f);
  FVec vs(0.0f), vb(0.0f), vw(0.0f);
  for (int64_t i = 0; i < body; i += kLanes) {
    const FVec zi = FVec::loadu(z + i);
    const FVec d = zi - vm;
    const FVec e = vexp(d);
    vs = vs + e;
    vb = vb + FVec::blendv(d * e, zero, e == zero);
    vw = w != nullptr ? at::vec::fmadd(FVec::loadu(w + i), zi, vw) : vw + zi;
  }
  float s = vsum(vs), b = vsum(vb), ws = vsum(vw);
  for (int64_t i = body; i < n; ++i) {
    const float d = z[i] - (empty ? 0.0f : m);
    const float e = std::exp(d);
    s += e;
    b += e == 0.0f ? 0.0f : d * e;
    ws += (w != nullptr ? w[i] : 1.0f) * z[i];
  }
  return core::LinearCePartial{core::SoftmaxState{m, s, b}, ws};
}

void forward_row(const LinearCeChunk& c, int64_t r) {
  float* z = c.logits + r * c.cols;
  const float tile_max = transform_row(z, c.cols, c.transform);
  const core::LinearCePartial tile = row_partial(z, c.cols, tile_max, c.tile_class_weights());
  const int64_t y = c.target_column(r);
  c.fold_into_state(r, tile, y >= 0 ? z[y] : 0.0f);
}

void backward_row(const LinearCeChunk& c, int64_t r) {
  float* x = c.logits + r * c.cols;
  const int64_t n = c.cols;
  const int64_t body = n / kLanes * kLanes;
  const core::LinearCeCoefficients k = c.coefficients_of(r);
  const core::Normaliser norm = c.normaliser_of(r);
  const float* w = c.tile_class_weights();
  const int64_t y = c.target_column(r);
  const float x_target = y >= 0 ? x[y] : 0.0f;
  const FVec a(k.prob), e(k.entropy), sigma(k.smooth), vm(norm.max), vlog_s(norm.log_sum), zero(0.0f);
  for (int64_t i = 0; i < body; i += kLanes) {
    const FVec v = FVec::loadu(x + i);
    const FVec z = transform(v, c.transform);
    const FVec shifted = (z - vm) - vlog_s;  // z - lse, exact near the max
    const FVec p = vexp(shifted);
    // p (a + e shifted), 0 where p = 0 (masked: not 0 * inf), as core::prob_term.
    FVec g = FVec::blendv(p * at::vec::fmadd(e, shifted, a), zero, p == zero);
    g = g - sigma * (w != nullptr ? FVec::loadu(w + i) : FVec(1.0f));
    (g * transform_derivative(z, c.transform)).store(x + i);
  }
  for (int64_t i = body; i < n; ++i) x[i] = c.grad_x(k, norm, x[i], false, w != nullptr ? w[i] : 1.0f);
  // The target column again, with the exact form of a p_y - beta.
  if (y >= 0) x[y] = c.grad_x(k, norm, x_target, true, w != nullptr ? w[y] : 1.0f);
}

void forward_chunk(const LinearCeChunk& c) {
  at::parallel_for(0, c.rows, row_grain(c.cols), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) forward_row(c, r);
  });
}

void backward_chunk(const LinearCeChunk& c) {
  at::parallel_for(0, c.rows, row_grain(c.cols), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) backward_row(c, r);
  });
}

}  // namespace

const LinearCeKernels linear_ce_kernels = {&forward_chunk, &backward_chunk};

}  // namespace logitkit::cpu::CPU_CAPABILITY
