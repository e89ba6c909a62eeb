// The frontend of the row ops: their op-level entry points, written once for
// every backend (CPU, CUDA, emulated CUDA): argument checks, output
// allocation, empty inputs, row layout and dtype dispatch. A backend supplies
// two functions:
//
//   template <class scalar_t> static void map(MapKind, const MapArgs<scalar_t>&);
//       reduce each row, then write out[r, i] = f(row constants, a[r, i], b[r, i])
//   template <class scalar_t> static void reduce(ResultKind, const ResultArgs<scalar_t>&);
//       reduce each row to a per-row result
// The per-row math of both is csrc/core/row_ops.h.
#pragma once

#include <limits>

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

template <class scalar_t>
struct MapArgs {
  const Rows* a;             // logits, or dy for the *_grad of outputs
  const Rows* b;             // y for softmax_grad / log_softmax_grad, else nullptr
  scalar_t* out;             // (rows, cols), contiguous
  const scalar_t* row_grad;  // per-row incoming gradient (logsumexp_grad, entropy_grad)
  float inv_temperature;
};

template <class scalar_t>
struct ResultArgs {
  const Rows* a;
  void* out;  // scalar_t for logsumexp, float for entropy, 3 floats per row for stats
  float inv_temperature;
};

template <class Backend>
struct RowOpsFrontend {
  static float inverse(double temperature) { return static_cast<float>(1.0 / temperature); }

  static at::Tensor forward_map(MapKind kind, const at::Tensor& x, double temperature, const char* name) {
    check_logits(x, name, "x");
    check_temperature(temperature, name);
    at::Tensor out = at::empty(x.sizes(), x.options());
    if (x.numel() == 0) return out;
    const Rows r = as_rows(x);
    LOGITKIT_DISPATCH_LOGIT_TYPES(x.scalar_type(), [&] {
      Backend::template map<scalar_t>(
          kind, MapArgs<scalar_t>{&r, nullptr, out.template data_ptr<scalar_t>(), nullptr, inverse(temperature)});
    });
    return out;
  }

  static at::Tensor row_result(ResultKind kind, const at::Tensor& x, double temperature, const char* name,
                               const char* arg) {
    check_logits(x, name, arg);
    check_temperature(temperature, name);
    auto shape = row_result_shape(x);
    if (kind == ResultKind::stats) shape.push_back(3);
    const auto dtype = kind == ResultKind::logsumexp ? x.scalar_type() : at::kFloat;
    at::Tensor out = at::empty(shape, x.options().dtype(dtype));
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
    LOGITKIT_DISPATCH_LOGIT_TYPES(x.scalar_type(), [&] {
      Backend::template reduce<scalar_t>(kind, ResultArgs<scalar_t>{&r, out.data_ptr(), inverse(temperature)});
    });
    return out;
  }

  // Backward of a per-row result (logsumexp, entropy): the row state is
  // recomputed from x, then the gradient is written in one more pass.
  static at::Tensor row_result_backward(MapKind kind, const at::Tensor& grad, const at::Tensor& x, double temperature,
                                        const char* name) {
    check_logits(x, name, "x");
    check_temperature(temperature, name);
    const auto result_shape = row_result_shape(x);
    TORCH_CHECK_VALUE(grad.device() == x.device(), "logitkit.", name, ": grad is on ", grad.device(), " but x is on ",
                      x.device());
    TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(result_shape), "logitkit.", name, ": grad must have shape ",
                      at::IntArrayRef(result_shape), ", got ", grad.sizes());
    at::Tensor out = at::empty(x.sizes(), x.options());
    if (x.numel() == 0) return out;
    const Rows r = as_rows(x);
    const at::Tensor g = grad.to(x.scalar_type()).contiguous();
    LOGITKIT_DISPATCH_LOGIT_TYPES(x.scalar_type(), [&] {
      Backend::template map<scalar_t>(kind, MapArgs<scalar_t>{&r, nullptr, out.template data_ptr<scalar_t>(),
                                                              g.template data_ptr<scalar_t>(), inverse(temperature)});
    });
    return out;
  }

  // Backward of an elementwise output (softmax, log_softmax) from (dy, y).
  static at::Tensor output_backward(MapKind kind, const at::Tensor& grad, const at::Tensor& y, double temperature,
                                    const char* name) {
    check_logits(y, name, "output");
    check_temperature(temperature, name);
    check_companion(grad, "grad", y, "output", y.sizes(), name);
    at::Tensor out = at::empty(y.sizes(), y.options());
    if (y.numel() == 0) return out;
    Rows rg = as_rows(grad);
    Rows ry = as_rows(y);
    if (rg.row_stride != ry.row_stride) {  // the kernels walk both with one row stride
      rg = as_rows(grad.contiguous());
      ry = as_rows(y.contiguous());
    }
    LOGITKIT_DISPATCH_LOGIT_TYPES(y.scalar_type(), [&] {
      Backend::template map<scalar_t>(
          kind, MapArgs<scalar_t>{&rg, &ry, out.template data_ptr<scalar_t>(), nullptr, inverse(temperature)});
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
