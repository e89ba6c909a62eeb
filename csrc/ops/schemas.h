// The one place where logitkit's operator schemas are written.
//
// define_schemas() is applied to two libraries:
//   * `logitkit`            (csrc/ops/register.cpp): the product ops, with CPU
//                           and CUDA kernels registered per dispatch key;
//   * `logitkit_emulated`   (csrc/emu/module.cpp): the same schemas, whose CPU
//                           kernels are the CUDA kernels run through the SIMT
//                           emulator, for the test suite.
// Fake (meta) kernels and autograd are registered from Python
// (python/logitkit/_registration.py) for both.
#pragma once

#include <torch/library.h>

namespace logitkit {

inline void define_schemas(torch::Library& m) {
  // Row ops over the last dimension (the vocabulary).
  m.def("softmax(Tensor x, float temperature=1.0) -> Tensor");
  m.def("log_softmax(Tensor x, float temperature=1.0) -> Tensor");
  m.def("logsumexp(Tensor x, float temperature=1.0) -> Tensor");
  m.def("entropy(Tensor logits, float temperature=1.0) -> Tensor");
  m.def("softmax_stats(Tensor x, float temperature=1.0) -> Tensor");
  // Their backwards (used by the registered autograd formulas).
  m.def("softmax_backward(Tensor grad, Tensor output, float temperature) -> Tensor");
  m.def("log_softmax_backward(Tensor grad, Tensor output, float temperature) -> Tensor");
  m.def("logsumexp_backward(Tensor grad, Tensor x, float temperature) -> Tensor");
  m.def("entropy_backward(Tensor grad, Tensor logits, float temperature) -> Tensor");
  // Top-H truncation (shared/notes/top-h.md): the boolean keep mask of each
  // row under rule "hf", "official" or "exact"; cap = -1: the rule's default
  // (100) for the capped rules, ignored by "exact". Not differentiable.
  m.def("top_h_mask(Tensor logits, float alpha, float temperature=1.0, str rule=\"hf\", int cap=-1) -> Tensor");
  // Sampling: one token per row (int64, shape logits.shape[:-1]) from
  // softmax(logits / temperature) restricted to the Top-H kept set (alpha,
  // rule, cap as for top_h_mask; alpha = None: no truncation), by inverse CDF
  // at `uniform` (float32 in [0, 1), one per row, drawn by the caller).
  // -1 for a row without a defined distribution (NaN or +inf logits).
  m.def("sample(Tensor logits, Tensor uniform, float? alpha, float temperature=1.0, str rule=\"hf\", "
        "int cap=-1) -> Tensor");
}

}  // namespace logitkit
