// The CPU GEMM routes of the linear cross-entropy for bf16/fp16 inputs
// (csrc/frontend/linear_ce.h, GemmPath):
//
//   fp32_upcast  operands upcast to fp32 (exact), sgemm (MKL / OpenBLAS via
//                at::mm). On CPUs without bf16/fp16 units this is the fast
//                route: AMD Zen 1 (AVX2 + FMA, 2 cores) runs a bf16 GEMM
//                ~17x slower than an fp32 one.
//   native       operands in their own dtype, fp32 output and accumulation.
//                bf16 on a CPU with AMX-BF16 (Intel Sapphire Rapids and
//                later) or AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and
//                later): our own GEMM (bf16_gemm.h) on the best of the two,
//                since torch exports none with an fp32 result that is fast
//                here. Otherwise (fp16; bf16 without those units)
//                at::native::cpublas::brgemm with plain (non-VNNI)
//                operands, which is ATen's reference bf16/fp16 -> fp32 GEMM:
//                correct, slow, and there so that the route exists (tests,
//                the emulated CUDA backend) on every CPU. (The bf16bf16f32
//                overload of cpublas::gemm is not exported from libtorch_cpu,
//                torch 2.14, `nm -D`; `aten::mm.dtype` has no CPU kernel;
//                brgemm reaches oneDNN only with VNNI-packed operands on
//                AMX.)
//
// Auto: fp32_upcast unless the CPU has units logitkit drives for the dtype
// (cpu_has_units_for: bf16 with AMX-BF16 or AVX512-BF16; never fp16).
// AMX-BF16: native, by capability (its tiles multiply at many times the fp32
// FMA rate; measured on an Intel Xeon at the loss's GEMM shapes: 0.74-0.95x
// oneDNN's bf16 torch.mm, about 2x its fp32 one). A timed probe was tried
// there first and, on a noisy 2-core host, once picked the fp32 upcasts,
// which made the bf16 loss 2.9x slower. AVX512-BF16 only (2 bf16 products
// per fp32 lane, often no faster than fp32 FMA): a one-time probe times
// both routes on a 512^3 GEMM, interleaved, and keeps the faster median. The
// environment variable LOGITKIT_CPU_GEMM=native|fp32 forces a route (tests,
// measurements); it is read at every call.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include "bf16_gemm.h"

namespace logitkit::cpu {

// The routes of GemmPath that a CPU chooses between for bf16/fp16 inputs.
enum class CpuGemmRoute { fp32_upcast, native };

struct CpuGemmDecision {
  CpuGemmRoute route;
  std::string reason;
};

// A row-major operand of brgemm: rows contiguous (unit column stride), with
// its leading dimension; a contiguous copy where the view is not (a
// transposed operand: cols x D weight rows, the gradient tile).
inline at::Tensor row_major(const at::Tensor& x) {
  return x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(1, x.size(1)) ? x : x.contiguous();
}

// The leading dimension of a GEMM output with unit column stride (a single
// row may report any row stride).
inline int64_t leading_dimension(const at::Tensor& out) {
  return std::max<int64_t>(out.stride(0), std::max<int64_t>(1, out.size(1)));
}

// out (fp32, rows contiguous) = a @ b (+ out if accumulate) on the
// reference route: a (m x k) and b (k x n) bf16 or fp16, accumulation in
// fp32, ATen's batch-reduce GEMM entry with B in plain (not VNNI) layout.
template <class scalar_t>
void reference_gemm_typed(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const at::Tensor ra = row_major(a), rb = row_major(b);
  at::native::cpublas::brgemm(a.size(0), b.size(1), a.size(1), std::max<int64_t>(1, ra.stride(0)),
                              std::max<int64_t>(1, rb.stride(0)), leading_dimension(out), accumulate,
                              ra.const_data_ptr<scalar_t>(), rb.const_data_ptr<scalar_t>(), out.data_ptr<float>(),
                              /*is_vnni=*/false);
}

// A bf16 tensor as the view bf16_gemm takes (any strides).
inline Bf16MatrixView bf16_view(const at::Tensor& x) {
  return {reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), x.stride(0), x.stride(1)};
}

inline void native_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat && out.stride(1) == 1 && a.scalar_type() == b.scalar_type());
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (a.scalar_type() == at::kBFloat16 && bf16_gemm_supported()) {
    bf16_gemm(a.size(0), b.size(1), a.size(1), bf16_view(a), bf16_view(b), out.data_ptr<float>(),
              leading_dimension(out), accumulate);
    return;
  }
  if (a.scalar_type() == at::kBFloat16) {
    reference_gemm_typed<at::BFloat16>(out, a, b, accumulate);
  } else {
    reference_gemm_typed<at::Half>(out, a, b, accumulate);
  }
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
}

// Whether the CPU has units that logitkit drives for `dtype` products with
// fp32 accumulation: bf16 where bf16_gemm runs (AMX-BF16 or AVX512-BF16).
// Never fp16: AVX512-FP16 accumulates in fp16, and logitkit has no AMX-FP16
// kernel, so the native fp16 route is ATen's reference loops. (Measured on
// an Intel Xeon with AVX512-FP16, fwd+bwd at N = D = 1024, V = 16384: 1.14 s
// native against 0.93 s on fp32 upcasts, although the reference loops won a
// 256^3 probe.)
inline bool cpu_has_units_for(at::ScalarType dtype) { return dtype == at::kBFloat16 && bf16_gemm_supported(); }

// The probe of an AVX512-BF16-only CPU: both routes on one 512-cube GEMM
// (upcasts included), run alternately kRounds times after one warm-up each,
// so that a burst of noise on the host hits both; the faster median wins.
inline CpuGemmDecision probe_cpu_gemm(at::ScalarType dtype) {
  constexpr int64_t kSize = 512;
  constexpr int kRounds = 5;
  const auto options = at::TensorOptions().dtype(dtype);
  const at::Tensor a = at::randn({kSize, kSize}, options), b = at::randn({kSize, kSize}, options);
  at::Tensor out = at::empty({kSize, kSize}, options.dtype(at::kFloat));
  auto run_native = [&] { native_gemm(out, a, b, false); };
  auto run_upcast = [&] { at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat)); };
  auto seconds = [](auto&& fn) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  run_native();
  run_upcast();
  std::vector<double> native(kRounds), upcast(kRounds);
  for (int i = 0; i < kRounds; ++i) {
    native[i] = seconds(run_native);
    upcast[i] = seconds(run_upcast);
  }
  std::sort(native.begin(), native.end());
  std::sort(upcast.begin(), upcast.end());
  const double native_median = native[kRounds / 2], upcast_median = upcast[kRounds / 2];
  const std::string kernel = std::string("logitkit's ") + bf16_units_name(bf16_gemm_best_units()) + " GEMM";
  const std::string timing = " (probe: native [" + kernel + "] " + std::to_string(native_median * 1e3) +
                             " ms, fp32 upcast " + std::to_string(upcast_median * 1e3) +
                             " ms, medians of 5 interleaved 512^3 GEMMs)";
  if (native_median < upcast_median)
    return {CpuGemmRoute::native, "the CPU's units for this dtype win the probe" + timing};
  return {CpuGemmRoute::fp32_upcast, "the CPU has units for this dtype but fp32 wins the probe" + timing};
}

// The automatic choice for `dtype`, made once per dtype.
inline const CpuGemmDecision& auto_cpu_gemm(at::ScalarType dtype) {
  auto decide = [](at::ScalarType t) -> CpuGemmDecision {
    if (!cpu_has_units_for(t)) {
      return {CpuGemmRoute::fp32_upcast, t == at::kBFloat16
                                             ? "no bf16 units on this CPU (AMX-BF16 and AVX512-BF16 absent): fp32 "
                                               "GEMMs on exact upcasts"
                                             : "no fp16 GEMM with fp32 accumulation on CPU units (AVX512-FP16 "
                                               "accumulates in fp16; no AMX-FP16 kernel): fp32 GEMMs on exact upcasts"};
    }
    if (bf16_gemm_best_units() == Bf16Units::amx_bf16) {
      return {CpuGemmRoute::native,
              "logitkit's amx_bf16 GEMM, by capability: AMX-BF16 tiles with fp32 accumulation (see "
              "csrc/cpu/linear_ce_cpu_gemm.h)"};
    }
    return probe_cpu_gemm(t);
  };
  static const CpuGemmDecision bf16 = decide(at::kBFloat16);
  static const CpuGemmDecision fp16 = decide(at::kHalf);
  return dtype == at::kBFloat16 ? bf16 : fp16;
}

// The route for bf16/fp16 inputs: LOGITKIT_CPU_GEMM if set, else auto.
inline CpuGemmDecision cpu_gemm_decision(at::ScalarType dtype) {
  const char* forced = std::getenv("LOGITKIT_CPU_GEMM");
  const std::string value = forced != nullptr ? forced : "";
  if (value == "native") return {CpuGemmRoute::native, "forced by LOGITKIT_CPU_GEMM=native"};
  if (value == "fp32") return {CpuGemmRoute::fp32_upcast, "forced by LOGITKIT_CPU_GEMM=fp32"};
  TORCH_CHECK_VALUE(value.empty() || value == "auto", "logitkit: LOGITKIT_CPU_GEMM must be native, fp32 or auto, got '",
                    value, "'");
  return auto_cpu_gemm(dtype);
}

}  // namespace logitkit::cpu
