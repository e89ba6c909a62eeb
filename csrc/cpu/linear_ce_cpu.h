// CPU chunk kernels of the linear cross-entropy (csrc/common/linear_ce_driver.h).
// linear_ce_cpu.cpp is compiled once per instruction set, like row_ops_cpu.cpp;
// register_cpu.cpp picks the copy matching ATen's runtime CPU capability.
#pragma once

#include "../common/linear_ce_driver.h"

namespace logitkit::cpu {

struct LceKernelTable {
  void (*forward_chunk)(const LceChunk&);
  void (*backward_chunk)(const LceChunk&);
};

namespace DEFAULT {
extern const LceKernelTable lce_kernels;
}
namespace AVX2 {
extern const LceKernelTable lce_kernels;
}
namespace AVX512 {
extern const LceKernelTable lce_kernels;
}

}  // namespace logitkit::cpu
