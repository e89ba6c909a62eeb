// The `logitkit` library: its schemas (from csrc/ops/schemas.h) and its CPU
// kernels, picking the instruction-set copy of the CPU kernels that matches
// ATen's runtime CPU capability (so ATEN_CPU_CAPABILITY=avx2 etc. applies).
#include <string>

#include <ATen/Version.h>
#include <torch/library.h>

#include "../cpu/linear_ce_cpu.h"
#include "../cpu/row_ops_cpu.h"
#include "../cpu/top_h_cpu.h"
#include "schemas.h"

namespace logitkit::cpu {

// The instruction-set copy of a kernel table that matches ATen's runtime CPU
// capability.
template <class Table>
const Table& for_cpu_capability(const Table& generic, const Table& avx2, const Table& avx512) {
#if LOGITKIT_CPU_X86_VARIANTS
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return avx512;
  if (capability == "AVX2") return avx2;
#else
  (void)avx2;
  (void)avx512;
#endif
  return generic;
}

#if LOGITKIT_CPU_X86_VARIANTS
#define LOGITKIT_CPU_TABLES(name) DEFAULT::name, AVX2::name, AVX512::name
#else
#define LOGITKIT_CPU_TABLES(name) DEFAULT::name, DEFAULT::name, DEFAULT::name
#endif

const RowKernelTable& selected_row_kernels() {
  static const RowKernelTable& table = for_cpu_capability(LOGITKIT_CPU_TABLES(row_kernels));
  return table;
}

const TopHKernelTable& selected_top_h_kernels() {
  static const TopHKernelTable& table = for_cpu_capability(LOGITKIT_CPU_TABLES(top_h_kernels));
  return table;
}

// The linear cross-entropy chunk kernels of the same instruction set.
const LceKernelTable& selected_lce_kernels() {
  static const LceKernelTable& table = for_cpu_capability(LOGITKIT_CPU_TABLES(lce_kernels));
  return table;
}

std::string selected_cpu_capability() {
  const RowKernelTable* t = &selected_row_kernels();
#if LOGITKIT_CPU_X86_VARIANTS
  if (t == &AVX512::row_kernels) return "AVX512";
  if (t == &AVX2::row_kernels) return "AVX2";
#endif
  (void)t;
  return "DEFAULT";
}

// The backend of RowOpFrontends for CPU tensors.
struct CpuBackend {
  template <class scalar_t>
  static void map(MapKind kind, const MapArgs<scalar_t>& args) {
    const RowKernelTable& t = selected_row_kernels();
    if constexpr (std::is_same_v<scalar_t, float>) t.map_float(kind, args);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) t.map_bfloat16(kind, args);
    if constexpr (std::is_same_v<scalar_t, c10::Half>) t.map_half(kind, args);
  }
  template <class scalar_t>
  static void reduce(ResultKind kind, const ResultArgs<scalar_t>& args) {
    const RowKernelTable& t = selected_row_kernels();
    if constexpr (std::is_same_v<scalar_t, float>) t.reduce_float(kind, args);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) t.reduce_bfloat16(kind, args);
    if constexpr (std::is_same_v<scalar_t, c10::Half>) t.reduce_half(kind, args);
  }
};

// The backend of LinearCeFrontends for CPU tensors.
struct CpuLceBackend {
  static void forward_chunk(const LceChunk& c, const at::Tensor&) { selected_lce_kernels().forward_chunk(c); }
  static void backward_chunk(const LceChunk& c, const at::Tensor&) { selected_lce_kernels().backward_chunk(c); }
};

// The backend of TopHFrontend for CPU tensors.
struct CpuTopHBackend {
  template <class scalar_t>
  static void top_h_mask(const Rows& r, const TopHParams& p, bool* out) {
    selected_top_h_kernels().of<scalar_t>().mask(r, p, out);
  }
  template <class scalar_t>
  static void sample(const Rows& r, const TopHParams& p, const float* uniform, int64_t* out) {
    selected_top_h_kernels().of<scalar_t>().sample(r, p, uniform, out);
  }
};

}  // namespace logitkit::cpu

TORCH_LIBRARY(logitkit, m) { logitkit::define_schemas(m); }

TORCH_LIBRARY_IMPL(logitkit, CPU, m) {
  logitkit::RowOpFrontends<logitkit::cpu::CpuBackend>::register_all(m);
  logitkit::LinearCeFrontends<logitkit::cpu::CpuLceBackend>::register_all(m);
  logitkit::TopHFrontend<logitkit::cpu::CpuTopHBackend>::register_all(m);
}
