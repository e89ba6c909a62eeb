// CPU Top-H kernels (top_h_cpu.cpp), compiled once per instruction set like
// the row ops (row_ops_cpu.h): each copy exports a table in its own namespace
// logitkit::cpu::<CAPABILITY>, and register_cpu.cpp picks the copy matching
// ATen's runtime CPU capability.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/top_h_frontend.h"

namespace logitkit::cpu {

// The backend functions of TopHFrontend for one logit dtype.
struct TopHKernels {
  void (*mask)(const Rows&, const TopHParams&, bool* out);
  void (*sample)(const Rows&, const TopHParams&, const float* uniform, int64_t* out);
};

struct TopHKernelTable {
  TopHKernels f32, bf16, f16;

  template <class scalar_t>
  const TopHKernels& of() const {
    if constexpr (std::is_same_v<scalar_t, float>) return f32;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return bf16;
    if constexpr (std::is_same_v<scalar_t, c10::Half>) return f16;
  }
};

namespace DEFAULT {
extern const TopHKernelTable top_h_kernels;
}
namespace AVX2 {
extern const TopHKernelTable top_h_kernels;
}
namespace AVX512 {
extern const TopHKernelTable top_h_kernels;
}

}  // namespace logitkit::cpu
