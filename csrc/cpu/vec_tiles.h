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

// Vectors of the arithmetic type acc_t (float, or double for float64 inputs
// of the row ops); FVec and kLanes are the float ones most kernels use.
template <class acc_t>
using Vec = at::vec::Vectorized<acc_t>;
template <class acc_t>
constexpr int64_t kLanesOf = Vec<acc_t>::size();
using FVec = Vec<float>;
constexpr int64_t kLanes = FVec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class acc_t = float>
inline int64_t round_up_to_lanes(int64_t n) {
  return (n + kLanesOf<acc_t> - 1) / kLanesOf<acc_t> * kLanesOf<acc_t>;
}

// exp with ~20 ulp error for float (ATen's exp_u20, the one ATen's own
// softmax uses; 1 ulp for double); returns 0 for -inf. Callers never pass NaN
// (NaN rows are handled apart).
template <class acc_t>
inline Vec<acc_t> vexp(const Vec<acc_t>& x) {
  return x.exp_u20();
}

template <class acc_t>
inline acc_t vsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t> a, Vec<acc_t> b) { return a + b; }, v);
}

template <class acc_t>
inline acc_t reduce_max(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t> a, Vec<acc_t> b) { return at::vec::maximum(a, b); }, v);
}

// Max of z[0..n), n a multiple of the lanes; NaN if any element is NaN.
template <class acc_t>
inline acc_t tile_max(const acc_t* z, int64_t n) {
  using V = Vec<acc_t>;
  V vmax(-std::numeric_limits<acc_t>::infinity());
  for (int64_t i = 0; i < n; i += V::size()) vmax = at::vec::maximum(vmax, V::loadu(z + i));
  return reduce_max(vmax);
}

// dst[0..n) = src[0..n) * scale in acc_t, padded with `pad` up to a multiple
// of the lanes. Returns the max of the converted values (free while
// converting); NaN if any is NaN.
template <class scalar_t, class acc_t>
acc_t load_tile(const scalar_t* src, int64_t n, acc_t scale, acc_t pad, acc_t* dst) {
  using V = Vec<acc_t>;
  int64_t i = 0;
  const V s(scale);
  V vmax(-std::numeric_limits<acc_t>::infinity());
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + V::size() <= n; i += V::size()) {
      const V v = V::loadu(src + i) * s;
      v.store(dst + i);
      vmax = at::vec::maximum(vmax, v);
    }
  } else {
    static_assert(std::is_same_v<acc_t, float>, "2-byte inputs are converted to float");
    using BVec = at::vec::Vectorized<scalar_t>;
    for (; i + BVec::size() <= n; i += BVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(BVec::loadu(src + i));
      lo = lo * s;
      hi = hi * s;
      lo.store(dst + i);
      hi.store(dst + i + V::size());
      vmax = at::vec::maximum(vmax, at::vec::maximum(lo, hi));
    }
  }
  acc_t m = reduce_max(vmax);
  for (; i < n; ++i) {
    dst[i] = static_cast<acc_t>(src[i]) * scale;
    m = std::isnan(dst[i]) ? dst[i] : std::max(m, dst[i]);
  }
  for (int64_t j = n; j < round_up_to_lanes<acc_t>(n); ++j) dst[j] = pad;
  return m;
}

}  // namespace
}  // namespace logitkit::cpu::CPU_CAPABILITY
