// The Python extension module logitkit._C. Importing it registers the
// `logitkit` operators (static initialisers of the linked kernel files);
// it also reports how the library was built.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/ScalarType.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../core/row_filters.h"
#include "../core/top_h.h"
#include "../cpu/bf16_gemm.h"

namespace logitkit::cpu {
std::string selected_cpu_capability();
std::pair<std::string, std::string> linear_ce_gemm_path(at::ScalarType dtype);
}  // namespace logitkit::cpu

PYBIND11_MODULE(_C, module) {
  module.doc() = "logitkit kernels (operators are registered under torch.ops.logitkit)";
  module.def("build_info", [] {
    pybind11::dict info;
    info["version"] = LOGITKIT_VERSION;
    info["torch_version"] = LOGITKIT_TORCH_VERSION;
    info["cuda_compiled"] = static_cast<bool>(LOGITKIT_WITH_CUDA);
    info["cuda_architectures"] = LOGITKIT_CUDA_ARCHITECTURES;
    info["cuda_version"] = LOGITKIT_CUDA_VERSION;
    info["cpu_capability"] = logitkit::cpu::selected_cpu_capability();
    return info;
  });
  // Constants the Python layer needs to agree with the kernels on (read by
  // logitkit.filters): Top-H's cap when none is given, and the largest
  // K = min(cap, V) the sampler chain's kernels run Top-H "hf" for themselves.
  module.attr("top_h_default_cap") = logitkit::core::kTopHDefaultCap;
  module.attr("fused_top_h_max_count") = logitkit::core::kFusedTopHMaxCount;
  // linear_cross_entropy's CPU GEMM route for "bfloat16" / "float16": (route, reason).
  module.def("cpu_gemm_path", [](const std::string& dtype) {
    TORCH_CHECK_VALUE(dtype == "bfloat16" || dtype == "float16", "cpu_gemm_path: bfloat16 or float16, got ", dtype);
    return logitkit::cpu::linear_ce_gemm_path(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf);
  });
  // The bf16 GEMM of the native CPU route, for its tests and benchmarks
  // (private: raw addresses from Tensor.data_ptr(), strides in elements; see
  // tests/test_linear_cross_entropy.py): the micro-kernels this process can
  // run, best first, and c (fp32) = a @ b (+ c) on one of them.
  module.def("cpu_bf16_gemm_units", [] {
    std::vector<std::string> names;
    for (auto units : {logitkit::cpu::Bf16Units::amx_bf16, logitkit::cpu::Bf16Units::avx512_bf16}) {
      if (logitkit::cpu::bf16_units_available(units)) names.emplace_back(logitkit::cpu::bf16_units_name(units));
    }
    return names;
  });
  module.def("cpu_bf16_gemm", [](int64_t m, int64_t n, int64_t k, uintptr_t a, int64_t a_row_stride,
                                 int64_t a_col_stride, uintptr_t b, int64_t b_row_stride, int64_t b_col_stride,
                                 uintptr_t c, int64_t ldc, bool accumulate, const std::string& units_name) {
    using logitkit::cpu::Bf16Units;
    const Bf16Units units = units_name == "amx_bf16"      ? Bf16Units::amx_bf16
                            : units_name == "avx512_bf16" ? Bf16Units::avx512_bf16
                                                          : Bf16Units::none;
    TORCH_CHECK_VALUE(logitkit::cpu::bf16_units_available(units), "cpu_bf16_gemm: this process cannot run '",
                      units_name, "'");
    using logitkit::cpu::Bf16MatrixView;
    logitkit::cpu::bf16_gemm(m, n, k, Bf16MatrixView{reinterpret_cast<const uint16_t*>(a), a_row_stride, a_col_stride},
                             Bf16MatrixView{reinterpret_cast<const uint16_t*>(b), b_row_stride, b_col_stride},
                             reinterpret_cast<float*>(c), ldc, accumulate, units);
  });
}
