// Host-side pieces shared by the frontends of every op family (row_ops.h,
// top_h.h, linear_ce.h) and their CPU, CUDA and emulated-CUDA backends:
// argument checks (same messages everywhere), the 2-D row view of an (..., V)
// tensor, and the dtype dispatch.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace logitkit {

// An uninitialised result the size of an op's logits input (a mask, filtered
// logits, a softmax, a gradient). A large CPU result is a fresh mapping of the
// allocator, and the kernel's first write to it takes a page fault per 4 KiB:
// at 256 x 128256 float32 (131 MB), ~24 ms of a fresh copy's ~35 ms on
// December's AMD EPYC, where the kernels themselves take about as long. So the
// 2 MiB-aligned interior of such a result is advised to use transparent huge
// pages (madvise MADV_HUGEPAGE: 64 faults instead of 32768; the copy took
// 11 ms), what PyTorch itself does for every large CPU allocation under
// THP_MEM_ALLOC_ENABLE=1. Advice only: refused (THP "never", another OS), the
// result is the same tensor with 4 KiB pages.
inline at::Tensor empty_row_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  constexpr size_t kAdviseFromBytes = size_t{8} << 20;
  if (out.device().is_cpu() && out.nbytes() >= kAdviseFromBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // (advice: result unused)
  }
#endif
  return out;
}

// A dtype as Python users spell it (torch.float64, not Double).
inline std::string python_dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// Checks the logits-like input `x` of op `op` (argument name `arg`).
// with_float64: float64 is accepted too (the CPU kernels of the row ops).
inline void check_logits(const at::Tensor& x, const char* op, const char* arg, bool with_float64 = false) {
  const auto dtype = x.scalar_type();
  const bool low_precision = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  TORCH_CHECK_TYPE(low_precision || (with_float64 && dtype == at::kDouble), "logitkit.", op, ": ", arg,
                   with_float64 ? " must be float32, bfloat16, float16 or float64, got "
                                : " must be float32, bfloat16 or float16, got ",
                   python_dtype_name(dtype));
  TORCH_CHECK_VALUE(x.dim() >= 1, "logitkit.", op, ": ", arg,
                    " must have at least one dimension (the last one is the vocabulary), got a 0-d tensor");
}

// Checks an incoming gradient `arg` of a backward op: a real floating-point
// tensor (a complex one would lose its imaginary part in the conversion to
// the input's dtype; integers are no gradient).
inline void check_grad(const at::Tensor& grad, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "logitkit.", op, ": ", arg,
                   " must be a real floating-point tensor, got ", python_dtype_name(grad.scalar_type()));
}

inline void check_temperature(double temperature, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "logitkit.", op,
                    ": temperature must be a finite number > 0, got ", temperature);
}

// Checks that `other` (argument `arg`) matches `reference` (argument `ref_arg`)
// in device and dtype, and has the given sizes.
inline void check_companion(const at::Tensor& other, const char* arg, const at::Tensor& reference, const char* ref_arg,
                            at::IntArrayRef sizes, const char* op) {
  TORCH_CHECK_VALUE(other.device() == reference.device(), "logitkit.", op, ": ", arg, " is on ", other.device(),
                    " but ", ref_arg, " is on ", reference.device());
  TORCH_CHECK_TYPE(other.scalar_type() == reference.scalar_type(), "logitkit.", op, ": ", arg, " has dtype ",
                   python_dtype_name(other.scalar_type()), " but ", ref_arg, " has dtype ",
                   python_dtype_name(reference.scalar_type()));
  TORCH_CHECK_VALUE(other.sizes() == sizes, "logitkit.", op, ": ", arg, " must have shape ", sizes, ", got ",
                    other.sizes());
}

// A (rows, cols) view of a (..., cols) tensor with unit stride along the row.
// Keeps the caller's storage when the leading dims collapse to one row stride
// (e.g. logits[:, -1, :]); otherwise uses a contiguous copy.
struct Rows {
  at::Tensor tensor;  // keeps the storage alive
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
};

inline Rows as_rows(const at::Tensor& x) {
  Rows r;
  r.cols = x.size(-1);
  r.rows = r.cols == 0 ? 0 : x.numel() / r.cols;
  at::Tensor t = x;
  bool usable = x.dim() == 0 || x.stride(-1) == 1 || r.cols == 1;
  int64_t row_stride = r.cols;
  if (usable && x.dim() >= 2) {
    // Leading dims collapse if, skipping size-1 dims, stride[i] = stride[i+1] * size[i+1].
    int64_t expected = -1;
    for (int64_t d = x.dim() - 2; d >= 0; --d) {
      if (x.size(d) == 1) continue;
      if (expected == -1) {
        row_stride = x.stride(d);
      } else if (x.stride(d) != expected) {
        usable = false;
        break;
      }
      expected = x.stride(d) * x.size(d);
    }
  }
  if (!usable) {
    t = x.contiguous();
    row_stride = r.cols;
  }
  r.tensor = t;
  r.row_stride = row_stride;
  return r;
}

// Shape of the per-row results of an (..., V) input: (...).
inline std::vector<int64_t> row_result_shape(const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  return sizes;
}

}  // namespace logitkit

// Dispatch over the three logit dtypes logitkit supports.
// (Callers check the dtype first, so the switch's own error never shows.)
#define LOGITKIT_LOGIT_TYPE_CASES(...)      \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)
#define LOGITKIT_DISPATCH_LOGIT_TYPES(dtype, ...) \
  AT_DISPATCH_SWITCH(dtype, "logitkit", LOGITKIT_LOGIT_TYPE_CASES(__VA_ARGS__))
