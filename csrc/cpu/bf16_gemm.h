// A bf16 x bf16 -> fp32 GEMM on the CPU's AVX512-BF16 dot-product
// instruction (vdpbf16ps), for the native GEMM route of the linear
// cross-entropy (csrc/cpu/linear_ce_cpu_gemm.h).
//
// Why our own: torch 2.14 exports no fast bf16 GEMM with an fp32 result to
// extensions. Its `cpublas::brgemm` reaches oneDNN only for VNNI-packed
// operands on AMX; without AMX it falls back to ATen's reference loops
// (measured on an AMD EPYC with AVX512-BF16: 55 GFLOP/s against 164 for
// torch.mm in bf16, 4 GFLOP/s at 256^3), and `mkldnn_matmul` insists on a
// bf16 result, which would round the logits.
//
// The algorithm is the usual blocked one (Goto & van de Geijn, "Anatomy of
// high-performance matrix multiplication", TOMS 2008): the K dimension in
// blocks, each block of B packed into column panels and each block of A into
// row panels, both holding k-pairs of bf16 as one 32-bit word (the operand
// layout of vdpbf16ps), and a register-blocked micro-kernel of
// kMicroRows x kMicroCols fp32 accumulators. vdpbf16ps multiplies bf16
// pairs exactly and adds them in fp32 (round to nearest even, denormals
// flushed), so the result is an fp32-accumulated product of the bf16
// operands, as cuBLAS gives on tensor cores.
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

// Whether this CPU runs the kernel (AVX512F + AVX512-BF16).
bool bf16_gemm_supported();

// c (m x n fp32, rows ldc apart, unit column stride) = a (m x k) @ b (k x n),
// plus c's old value when accumulate. Parallel over at::parallel_for's
// threads. Requires bf16_gemm_supported().
void bf16_gemm(int64_t m, int64_t n, int64_t k, Bf16MatrixView a, Bf16MatrixView b, float* c, int64_t ldc,
               bool accumulate);

}  // namespace logitkit::cpu
