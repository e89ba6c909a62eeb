// The CPU kernels of every op family, as tables of function pointers.
//
// The kernel files (row_ops_cpu.cpp, top_h_cpu.cpp, linear_ce_cpu.cpp) are
// compiled once per instruction set (DEFAULT; AVX2 and AVX512 on x86-64),
// each copy in its own namespace logitkit::cpu::<CAPABILITY>, and each
// copy exports its family's table there. register_cpu.cpp picks the copy
// matching ATen's runtime CPU capability (which honours ATEN_CPU_CAPABILITY).
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../core/linear_ce.h"
#include "../frontend/row_ops.h"
#include "../frontend/top_h.h"

namespace logitkit::cpu {

// One set of kernels per logit dtype: Fns<scalar_t> holds the functions of
// one dtype, of<scalar_t>() picks them.
template <template <class> class Fns>
struct PerDtype {
  Fns<float> f32;
  Fns<c10::BFloat16> bf16;
  Fns<c10::Half> f16;

  template <class scalar_t>
  const Fns<scalar_t>& of() const {
    if constexpr (std::is_same_v<scalar_t, float>) return f32;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return bf16;
    if constexpr (std::is_same_v<scalar_t, c10::Half>) return f16;
  }

  // The table whose functions of each dtype are make.operator()<scalar_t>()
  // (a lambda template returning Fns<scalar_t>).
  template <class Make>
  static constexpr PerDtype build(Make make) {
    return PerDtype{make.template operator()<float>(), make.template operator()<c10::BFloat16>(),
                    make.template operator()<c10::Half>()};
  }
};

// The backend functions of RowOpsFrontend for one logit dtype.
template <class scalar_t>
struct RowOpsKernels {
  void (*map)(MapKind, const MapArgs<scalar_t>&);
  void (*reduce)(ResultKind, const ResultArgs<scalar_t>&);
};

// The row ops take float64 as well (computed in float64).
struct RowOpsTables {
  PerDtype<RowOpsKernels> logits;
  RowOpsKernels<double> f64;

  template <class scalar_t>
  const RowOpsKernels<scalar_t>& of() const {
    if constexpr (std::is_same_v<scalar_t, double>) {
      return f64;
    } else {
      return logits.of<scalar_t>();
    }
  }
};

// The backend functions of TopHFrontend for one logit dtype.
template <class scalar_t>
struct TopHKernels {
  void (*mask)(const Rows&, const TopHParams&, bool* out);
  void (*sample)(const Rows&, const TopHParams&, const float* uniform, int64_t* out);
  // The row-statistics sampler ops (row_filters_cpu.h), per-row params table.
  void (*filter_mask)(const Rows&, const float* params, bool* out);
  void (*filter_logits)(const Rows&, const float* params, float filter_value, scalar_t* out);
  void (*filter_sample)(const Rows&, const float* params, const float* uniform, bool raw_log_prob, int64_t* tokens,
                        float* stats);
};

// The chunk kernels of LinearCeFrontend: the tiles are fp32 whatever the
// input dtype (the frontend's GEMMs upcast), so one set serves every dtype.
struct LinearCeKernels {
  void (*forward_chunk)(const core::LinearCeChunk&);
  void (*backward_chunk)(const core::LinearCeChunk&);
};

// The tables one instruction-set copy exports.
#define LOGITKIT_CPU_KERNEL_TABLES                  \
  extern const RowOpsTables row_ops_kernels;        \
  extern const PerDtype<TopHKernels> top_h_kernels; \
  extern const LinearCeKernels linear_ce_kernels;

namespace DEFAULT {
LOGITKIT_CPU_KERNEL_TABLES
}
namespace AVX2 {
LOGITKIT_CPU_KERNEL_TABLES
}
namespace AVX512 {
LOGITKIT_CPU_KERNEL_TABLES
}

#undef LOGITKIT_CPU_KERNEL_TABLES

}  // namespace logitkit::cpu
