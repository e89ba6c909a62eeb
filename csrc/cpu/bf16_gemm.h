// A bf16 x bf16 -> fp32 GEMM on the CPU's bf16 units, for the native GEMM
// route of the linear cross-entropy (csrc/cpu/linear_ce_cpu_gemm.h). Two
// micro-kernels share one blocked driver:
//
//   amx_bf16     Intel AMX (Sapphire Rapids and later): tdpbf16ps on 16 x 16
//                fp32 tiles, a 32 x 32 block of C per micro-tile.
//   avx512_bf16  AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and
//                later): vdpbf16ps, an 8 x 32 block of C per micro-tile.
//
// Why our own: torch 2.14 exports no fast bf16 GEMM with an fp32 result to
// extensions. `aten::mm.dtype` (bf16 in, fp32 out) has no CPU kernel; its
// `cpublas::brgemm` reaches oneDNN only for VNNI-packed operands on AMX and
// otherwise falls back to ATen's reference loops (measured on an AMD EPYC
// with AVX512-BF16: 55 GFLOP/s against 164 for torch.mm in bf16, 4 GFLOP/s
// at 256^3); `mkldnn_matmul` insists on a bf16 result, which would round the
// logits.
//
// The algorithm is the usual blocked one (Goto & van de Geijn, "Anatomy of
// high-performance matrix multiplication", TOMS 2008): the K dimension in
// blocks, each block of B packed into column panels and each block of A into
// row panels, both holding k-pairs of bf16 as one 32-bit word (the operand
// layout of vdpbf16ps and of AMX's B tiles), and a register- (or tile-)
// blocked micro-kernel of fp32 accumulators. Both instructions multiply bf16
// pairs exactly and add them in fp32 (round to nearest even, denormals
// flushed), so the result is an fp32-accumulated product of the bf16
// operands, as cuBLAS gives on tensor cores. Each entry of C is summed in
// the same order whatever the thread count, so results are deterministic.
#pragma once

#include <cstdint>

namespace logitkit::cpu {

// A bf16 matrix view: element (i, j) at data[i * row_stride + j * col_stride]
// (strides in elements; either may be 1, so transposed views need no copy).
struct Bf16MatrixView {
  const uint16_t* data;
  int64_t row_stride;
  int64_t col_stride;
};

// The micro-kernels, best first.
enum class Bf16Units { amx_bf16, avx512_bf16, none };

// Whether this process can run `units`: the CPU has the instructions (and,
// for AMX, the OS granted the tile state: arch_prctl on Linux).
bool bf16_units_available(Bf16Units units);

// The best available units of this CPU (none without bf16 units).
Bf16Units bf16_gemm_best_units();

// "amx_bf16", "avx512_bf16" or "none".
const char* bf16_units_name(Bf16Units units);

// Whether this CPU runs the GEMM at all (bf16_gemm_best_units() != none).
bool bf16_gemm_supported();

// c (m x n fp32, rows ldc apart, unit column stride) = a (m x k) @ b (k x n),
// plus c's old value when accumulate. Parallel over at::parallel_for's
// threads. Requires bf16_units_available(units).
void bf16_gemm(int64_t m, int64_t n, int64_t k, Bf16MatrixView a, Bf16MatrixView b, float* c, int64_t ldc,
               bool accumulate, Bf16Units units = bf16_gemm_best_units());

}  // namespace logitkit::cpu
