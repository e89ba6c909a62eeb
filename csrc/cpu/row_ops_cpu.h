// CPU row ops. row_ops_cpu.cpp is compiled once per instruction set
// (DEFAULT; AVX2 and AVX512 on x86-64), each copy in its own namespace
// logitkit::cpu::<CAPABILITY>; register_cpu.cpp picks the copy matching
// ATen's runtime CPU capability (which honours ATEN_CPU_CAPABILITY).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/row_op_frontends.h"

namespace logitkit::cpu {

// The backend functions of RowOpFrontends, one per logit dtype.
struct RowKernelTable {
  void (*map_float)(MapKind, const MapArgs<float>&);
  void (*map_bfloat16)(MapKind, const MapArgs<c10::BFloat16>&);
  void (*map_half)(MapKind, const MapArgs<c10::Half>&);
  void (*reduce_float)(ResultKind, const ResultArgs<float>&);
  void (*reduce_bfloat16)(ResultKind, const ResultArgs<c10::BFloat16>&);
  void (*reduce_half)(ResultKind, const ResultArgs<c10::Half>&);
};

namespace DEFAULT {
extern const RowKernelTable row_kernels;
}
namespace AVX2 {
extern const RowKernelTable row_kernels;
}
namespace AVX512 {
extern const RowKernelTable row_kernels;
}

}  // namespace logitkit::cpu
