// The `logitkit` library: its schemas (from csrc/ops/schemas.h) and its CPU
// kernels, picking the instruction-set copy of the CPU kernels that matches
// ATen's runtime CPU capability (so ATEN_CPU_CAPABILITY=avx2 etc. applies).
#include <string>
#include <utility>

#include <ATen/Version.h>
#include <torch/library.h>

#include "../cpu/kernel_tables.h"
#include "../cpu/linear_ce_cpu_gemm.h"
#include "../frontend/linear_ce.h"
#include "../frontend/row_filters.h"
#include "../frontend/row_ops.h"
#include "../frontend/top_h.h"
#include "schemas.h"

namespace logitkit::cpu {
namespace {

// The kernel tables of one instruction-set copy (see kernel_tables.h).
struct CpuKernels {
  const char* capability;
  const RowOpsTables* row_ops;
  const PerDtype<TopHKernels>* top_h;
  const LinearCeKernels* linear_ce;
};

#define LOGITKIT_CPU_KERNELS(cap) \
  CpuKernels { #cap, &cap::row_ops_kernels, &cap::top_h_kernels, &cap::linear_ce_kernels }

// The copy matching ATen's runtime CPU capability, chosen once.
const CpuKernels& for_cpu_capability() {
  static const CpuKernels kernels = [] {
#if LOGITKIT_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return LOGITKIT_CPU_KERNELS(AVX512);
    if (capability == "AVX2") return LOGITKIT_CPU_KERNELS(AVX2);
#endif
    return LOGITKIT_CPU_KERNELS(DEFAULT);
  }();
  return kernels;
}

#undef LOGITKIT_CPU_KERNELS

// The backend of RowOpsFrontend for CPU tensors.
struct RowOpsBackend {
  static constexpr bool kFloat64 = true;
  template <class scalar_t>
  static void map(MapKind kind, const MapArgs<scalar_t>& args) {
    for_cpu_capability().row_ops->of<scalar_t>().map(kind, args);
  }
  template <class scalar_t>
  static void reduce(ResultKind kind, const ResultArgs<scalar_t>& args) {
    for_cpu_capability().row_ops->of<scalar_t>().reduce(kind, args);
  }
};

// The backend of TopHFrontend for CPU tensors.
struct TopHBackend {
  template <class scalar_t>
  static void top_h_mask(const Rows& r, const TopHParams& p, bool* out) {
    for_cpu_capability().top_h->of<scalar_t>().mask(r, p, out);
  }
  template <class scalar_t>
  static void sample(const Rows& r, const TopHParams& p, const float* uniform, int64_t* out) {
    for_cpu_capability().top_h->of<scalar_t>().sample(r, p, uniform, out);
  }
};

// The backend of RowFiltersFrontend for CPU tensors.
struct RowFiltersBackend {
  template <class scalar_t>
  static void filter_mask(const Rows& r, const float* params, bool* out) {
    for_cpu_capability().top_h->of<scalar_t>().filter_mask(r, params, out);
  }
  template <class scalar_t>
  static void filter_logits(const Rows& r, const float* params, float filter_value, scalar_t* out) {
    for_cpu_capability().top_h->of<scalar_t>().filter_logits(r, params, filter_value, out);
  }
  template <class scalar_t>
  static void filter_sample(const Rows& r, const float* params, const float* uniform, bool raw_log_prob,
                            int64_t* tokens, float* stats) {
    for_cpu_capability().top_h->of<scalar_t>().filter_sample(r, params, uniform, raw_log_prob, tokens, stats);
  }
  static void philox_uniform(const at::Tensor& seed, const at::Tensor& offset, at::Tensor& out) {
    const int64_t* s = seed.data_ptr<int64_t>();
    const int64_t* o = offset.data_ptr<int64_t>();
    float* u = out.data_ptr<float>();
    for (int64_t i = 0; i < out.numel(); ++i) u[i] = core::philox_uniform(s[i], o[i]);
  }
};

// The backend of LinearCeFrontend for CPU tensors.
struct LinearCeBackend {
  static void forward_chunk(const core::LinearCeChunk& c, const at::Tensor&) {
    for_cpu_capability().linear_ce->forward_chunk(c);
  }
  static void backward_chunk(const core::LinearCeChunk& c, const at::Tensor&) {
    for_cpu_capability().linear_ce->backward_chunk(c);
  }
  // bf16/fp16: the CPU's units where they beat fp32 (linear_ce_cpu_gemm.h).
  static GemmPath gemm_path(at::ScalarType dtype) {
    return cpu_gemm_decision(dtype).route == CpuGemmRoute::native ? GemmPath::native : GemmPath::fp32_upcast;
  }
  static void native_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    cpu::native_gemm(out, a, b, accumulate);
  }
};

}  // namespace

// The instruction set of the CPU kernels in use (build_info()["cpu_capability"]).
std::string selected_cpu_capability() { return for_cpu_capability().capability; }

// The GEMM route of linear_cross_entropy's CPU kernels for bf16/fp16
// (logitkit.gemm_path): ("native" | "fp32_upcast", reason).
std::pair<std::string, std::string> linear_ce_gemm_path(at::ScalarType dtype) {
  const CpuGemmDecision decision = cpu_gemm_decision(dtype);
  return {decision.route == CpuGemmRoute::native ? "native" : "fp32_upcast", decision.reason};
}

}  // namespace logitkit::cpu

TORCH_LIBRARY(logitkit, m) { logitkit::define_schemas(m); }

TORCH_LIBRARY_IMPL(logitkit, CPU, m) {
  logitkit::RowOpsFrontend<logitkit::cpu::RowOpsBackend>::register_all(m);
  logitkit::LinearCeFrontend<logitkit::cpu::LinearCeBackend>::register_all(m);
  logitkit::TopHFrontend<logitkit::cpu::TopHBackend>::register_all(m);
  logitkit::RowFiltersFrontend<logitkit::cpu::RowFiltersBackend>::register_all(m);
}
