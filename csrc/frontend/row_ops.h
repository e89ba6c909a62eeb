// The frontend of the row ops: their op-level entry points, written once for
// every backend (CPU, CUDA, emulated CUDA): argument checks, output
// allocation, empty inputs, row layout and dtype dispatch. A backend supplies
// two functions:
//
//   template <class scalar_t> static void map(MapKind, const MapArgs<scalar_t>&);
//       reduce each row, then write out[r, i] = f(row constants, a[r, i], b[r, i])
//   template <class scalar_t> static void reduce(ResultKind, const ResultArgs<scalar_t>&);
//       reduce each row to a per-row result
//   static constexpr bool kFloat64;
//       whether it also takes float64 inputs (the CPU kernels do, computing
//       in float64; the CUDA kernels take float32, bfloat16 and float16)
// The per-row math of both is csrc/core/row_ops.h.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include <ATen/ops/div.h>
#include <torch/library.h>

#include "common.h"

namespace logitkit {

enum class MapKind {
  softmax,           // exp(z - lse)
  log_softmax,       // z - lse
  logsumexp_grad,    // g p / T
  entropy_grad,      // -(g/T) p (log p + H)
  softmax_grad,      // a = dy, b = y: y (dy - sum dy*y) / T
  log_softmax_grad,  // a = dy, b = y: (dy - exp(y) sum dy) / T
};

enum class ResultKind { logsumexp, entropy, stats };

// The arithmetic type of the kernels for an input dtype: float64 inputs are
// computed in float64, every other dtype in float32.
template <class scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <class scalar_t>
struct MapArgs {
  const Rows* a;             // logits, or dy for the *_grad of outputs
  const Rows* b;             // y for softmax_grad / log_softmax_grad, else nullptr
  scalar_t* out;             // (rows, cols), contiguous
  const scalar_t* row_grad;  // per-row incoming gradient (logsumexp_grad, entropy_grad)
  compute_t<scalar_t> inv_temperature;
};

template <class scalar_t>
struct ResultArgs {
  const Rows* a;
  void* out;  // scalar_t for logsumexp, compute_t for entropy, 3 compute_t per row for stats
  compute_t<scalar_t> inv_temperature;
};

template <class Backend>
struct RowOpsFrontend {
  template <class scalar_t>
  static compute_t<scalar_t> inverse(double temperature) {
    return static_cast<compute_t<scalar_t>>(1.0 / temperature);
  }

  // Calls body.template operator()<scalar_t>() for the dtype of the input.
  template <class Body>
  static void dispatch(at::ScalarType dtype, Body&& body) {
    if constexpr (Backend::kFloat64) {
      if (dtype == at::kDouble) return body.template operator()<double>();
    }
    LOGITKIT_DISPATCH_LOGIT_TYPES(dtype, [&] { body.template operator()<scalar_t>(); });
  }

  static void check_input(const at::Tensor& x, double temperature, const char* name, const char* arg) {
    check_logits(x, name, arg, Backend::kFloat64);
    check_temperature(temperature, name);
  }

  // A temperature so small that 1/T overflows the arithmetic type (T < 2^-128
  // ~ 2.9e-39 for float32): the kernels' z = x * (1/T) would give 0 * inf =
  // NaN where z = x / T is 0 (and -inf where it is finite). Such calls divide
  // first, z = x / T in float64 rounded once to the arithmetic type (torch's
  // definition), and run the kernels on z at T = 1; the backwards divide
  // their result by T the same way. It costs one copy of the input, on this
  // path only; every other temperature takes the kernels' product.
  static bool needs_division(const at::Tensor& x, double temperature) {
    const double inv = 1.0 / temperature;
    return x.scalar_type() == at::kDouble ? !std::isfinite(inv) : !(inv <= std::numeric_limits<float>::max());
  }

  // t / T, divided in float64 and rounded once to the arithmetic type of t.
  static at::Tensor divided(const at::Tensor& t, double temperature) {
    const at::Tensor quotient = at::div(t.to(at::kDouble), temperature);
    return t.scalar_type() == at::kDouble ? quotient : quotient.to(at::kFloat);
  }

  static at::ScalarType result_dtype(ResultKind kind, const at::Tensor& x) {
    if (kind == ResultKind::logsumexp) return x.scalar_type();
    return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  }

  static at::Tensor forward_map(MapKind kind, const at::Tensor& x, double temperature, const char* name) {
    check_input(x, temperature, name, "x");
    if (needs_division(x, temperature)) {
      return forward_map(kind, divided(x, temperature), 1.0, name).to(x.scalar_type());
    }
    at::Tensor out = empty_row_output(x.sizes(), x.options());
    if (x.numel() == 0) return out;
    const Rows r = as_rows(x);
    dispatch(x.scalar_type(), [&]<class scalar_t>() {
      Backend::template map<scalar_t>(kind, MapArgs<scalar_t>{&r, nullptr, out.template data_ptr<scalar_t>(), nullptr,
                                                              inverse<scalar_t>(temperature)});
    });
    return out;
  }

  static at::Tensor row_result(ResultKind kind, const at::Tensor& x, double temperature, const char* name,
                               const char* arg) {
    check_input(x, temperature, name, arg);
    if (needs_division(x, temperature)) {
      return row_result(kind, divided(x, temperature), 1.0, name, arg).to(result_dtype(kind, x));
    }
    auto shape = row_result_shape(x);
    if (kind == ResultKind::stats) shape.push_back(3);
    at::Tensor out = at::empty(shape, x.options().dtype(result_dtype(kind, x)));
    if (out.numel() == 0) return out;
    if (x.size(-1) == 0) {
      // Empty rows: the empty state (-inf, 0, 0); lse = -inf; entropy NaN.
      constexpr double inf = std::numeric_limits<double>::infinity();
      if (kind == ResultKind::stats) {
        out.select(-1, 0).fill_(-inf);
        out.narrow(-1, 1, 2).zero_();
      } else {
        out.fill_(kind == ResultKind::logsumexp ? -inf : std::numeric_limits<double>::quiet_NaN());
      }
      return out;
    }
    const Rows r = as_rows(x);
    dispatch(x.scalar_type(), [&]<class scalar_t>() {
      Backend::template reduce<scalar_t>(kind,
                                         ResultArgs<scalar_t>{&r, out.data_ptr(), inverse<scalar_t>(temperature)});
    });
    return out;
  }

  // Backward of a per-row result (logsumexp, entropy): the row state is
  // recomputed from x, then the gradient is written in one more pass.
  static at::Tensor row_result_backward(MapKind kind, const at::Tensor& grad, const at::Tensor& x, double temperature,
                                        const char* name) {
    check_input(x, temperature, name, "x");
    check_grad(grad, name, "grad");
    const auto result_shape = row_result_shape(x);
    TORCH_CHECK_VALUE(grad.device() == x.device(), "logitkit.", name, ": grad is on ", grad.device(), " but x is on ",
                      x.device());
    TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(result_shape), "logitkit.", name, ": grad must have shape ",
                      at::IntArrayRef(result_shape), ", got ", grad.sizes());
    if (needs_division(x, temperature)) {  // dL/dx = (dL/dz) / T
      const at::Tensor grad_z = row_result_backward(kind, grad, divided(x, temperature), 1.0, name);
      return divided(grad_z, temperature).to(x.scalar_type());
    }
    at::Tensor out = empty_row_output(x.sizes(), x.options());
    if (x.numel() == 0) return out;
    const Rows r = as_rows(x);
    const at::Tensor g = grad.to(x.scalar_type()).contiguous();
    dispatch(x.scalar_type(), [&]<class scalar_t>() {
      Backend::template map<scalar_t>(
          kind, MapArgs<scalar_t>{&r, nullptr, out.template data_ptr<scalar_t>(), g.template data_ptr<scalar_t>(),
                                  inverse<scalar_t>(temperature)});
    });
    return out;
  }

  // Backward of an elementwise output (softmax, log_softmax) from (dy, y).
  static at::Tensor output_backward(MapKind kind, const at::Tensor& grad, const at::Tensor& y, double temperature,
                                    const char* name) {
    check_input(y, temperature, name, "output");
    check_grad(grad, name, "grad");
    check_companion(grad, "grad", y, "output", y.sizes(), name);
    if (needs_division(y, temperature)) {  // dL/dx = (dL/dz) / T
      return divided(output_backward(kind, grad, y, 1.0, name), temperature).to(y.scalar_type());
    }
    at::Tensor out = empty_row_output(y.sizes(), y.options());
    if (y.numel() == 0) return out;
    Rows rg = as_rows(grad);
    Rows ry = as_rows(y);
    if (rg.row_stride != ry.row_stride) {  // the kernels walk both with one row stride
      rg = as_rows(grad.contiguous());
      ry = as_rows(y.contiguous());
    }
    dispatch(y.scalar_type(), [&]<class scalar_t>() {
      Backend::template map<scalar_t>(kind, MapArgs<scalar_t>{&rg, &ry, out.template data_ptr<scalar_t>(), nullptr,
                                                              inverse<scalar_t>(temperature)});
    });
    return out;
  }

  static at::Tensor softmax(const at::Tensor& x, double t) { return forward_map(MapKind::softmax, x, t, "softmax"); }
  static at::Tensor log_softmax(const at::Tensor& x, double t) {
    return forward_map(MapKind::log_softmax, x, t, "log_softmax");
  }
  static at::Tensor logsumexp(const at::Tensor& x, double t) {
    return row_result(ResultKind::logsumexp, x, t, "logsumexp", "x");
  }
  static at::Tensor entropy(const at::Tensor& logits, double t) {
    return row_result(ResultKind::entropy, logits, t, "entropy", "logits");
  }
  static at::Tensor softmax_stats(const at::Tensor& x, double t) {
    return row_result(ResultKind::stats, x, t, "softmax_stats", "x");
  }
  static at::Tensor softmax_backward(const at::Tensor& g, const at::Tensor& y, double t) {
    return output_backward(MapKind::softmax_grad, g, y, t, "softmax_backward");
  }
  static at::Tensor log_softmax_backward(const at::Tensor& g, const at::Tensor& y, double t) {
    return output_backward(MapKind::log_softmax_grad, g, y, t, "log_softmax_backward");
  }
  static at::Tensor logsumexp_backward(const at::Tensor& g, const at::Tensor& x, double t) {
    return row_result_backward(MapKind::logsumexp_grad, g, x, t, "logsumexp_backward");
  }
  static at::Tensor entropy_backward(const at::Tensor& g, const at::Tensor& x, double t) {
    return row_result_backward(MapKind::entropy_grad, g, x, t, "entropy_backward");
  }

  // Registers every row op of this backend into a TORCH_LIBRARY_IMPL block.
  static void register_all(torch::Library& m) {
    m.impl("softmax", &softmax);
    m.impl("log_softmax", &log_softmax);
    m.impl("logsumexp", &logsumexp);
    m.impl("entropy", &entropy);
    m.impl("softmax_stats", &softmax_stats);
    m.impl("softmax_backward", &softmax_backward);
    m.impl("log_softmax_backward", &log_softmax_backward);
    m.impl("logsumexp_backward", &logsumexp_backward);
    m.impl("entropy_backward", &entropy_backward);
  }
};

}  // namespace logitkit
