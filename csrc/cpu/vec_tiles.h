// Vector helpers of the CPU kernels (row_ops_cpu.cpp, top_h_cpu.cpp,
// linear_ce_cpu.cpp), shared by every file compiled once per CPU capability:
// the helpers live in each file's logitkit::cpu::CPU_CAPABILITY namespace, so
// each instruction-set copy gets its own definitions.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "tuning.h"

#ifndef CPU_CAPABILITY
#error "vec_tiles.h must be compiled with CPU_CAPABILITY set (see CMakeLists.txt)"
#endif

namespace logitkit::cpu::CPU_CAPABILITY {
namespace {

using FVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = FVec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up_to_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// exp with ~20 ulp error (ATen's exp_u20, the one ATen's own softmax uses);
// returns 0 for -inf. Callers never pass NaN (NaN rows are handled apart).
inline FVec vexp(const FVec& x) { return x.exp_u20(); }

inline float vsum(const FVec& v) {
  return at::vec::vec_reduce_all<float>([](FVec a, FVec b) { return a + b; }, v);
}

inline float reduce_max(const FVec& v) {
  return at::vec::vec_reduce_all<float>([](FVec a, FVec b) { return at::vec::maximum(a, b); }, v);
}

// Max of z[0..n), n a multiple of kLanes; NaN if any element is NaN.
inline float tile_max(const float* z, int64_t n) {
  FVec vmax(kNegInf);
  for (int64_t i = 0; i < n; i += kLanes) vmax = at::vec::maximum(vmax, FVec::loadu(z + i));
  return reduce_max(vmax);
}

// dst[0..n) = src[0..n) * scale in fp32, padded with `pad` up to a multiple of
// kLanes. Returns the max of the converted values (free while converting).
template <class scalar_t>
float load_tile(const scalar_t* src, int64_t n, float scale, float pad, float* dst) {
  int64_t i = 0;
  const FVec s(scale);
  FVec vmax(kNegInf);
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + kLanes <= n; i += kLanes) {
      const FVec v = FVec::loadu(src + i) * s;
      v.store(dst + i);
      vmax = at::vec::maximum(vmax, v);
    }
  } else {
    using BVec = at::vec::Vectorized<scalar_t>;
    for (; i + BVec::size() <= n; i += BVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(BVec::loadu(src + i));
      lo = lo * s;
      hi = hi * s;
      lo.store(dst + i);
      hi.store(dst + i + kLanes);
      vmax = at::vec::maximum(vmax, at::vec::maximum(lo, hi));
    }
  }
  float m = reduce_max(vmax);
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]) * scale;
    m = std::isnan(dst[i]) ? dst[i] : std::max(m, dst[i]);
  }
  for (int64_t j = n; j < round_up_to_lanes(n); ++j) dst[j] = pad;
  return m;
}

}  // namespace
}  // namespace logitkit::cpu::CPU_CAPABILITY
