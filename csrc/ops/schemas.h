// The one place where logitkit's operator schemas are written.
//
// define_schemas() is applied to two libraries:
//   * `logitkit`            (csrc/ops/register_cpu.cpp): the product ops, with CPU
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
  // Top-H truncation (docs/top_h.md): the boolean keep mask of each
  // row under rule "hf", "official" or "exact"; cap = -1: the rule's default
  // (100) for the capped rules, ignored by "exact". Not differentiable.
  m.def("top_h_mask(Tensor logits, float alpha, float temperature=1.0, str rule=\"hf\", int cap=-1) -> Tensor");
  // The same with alpha and temperature per row (float32, shape
  // logits.shape[:-1]); alpha 0 turns Top-H off for that row (every token kept).
  m.def(
      "top_h_mask_per_row(Tensor logits, Tensor alpha, Tensor temperature, str rule=\"hf\", int cap=-1) -> "
      "Tensor");
  // Sampling: one token per row (int64, shape logits.shape[:-1]) from
  // softmax(logits / temperature) restricted to the Top-H kept set (alpha,
  // rule, cap as for top_h_mask; alpha = None: no truncation), by inverse CDF
  // at `uniform` (float32 in [0, 1), one per row, drawn by the caller).
  // -1 for a row without a defined distribution (NaN or +inf logits).
  m.def(
      "sample(Tensor logits, Tensor uniform, float? alpha, float temperature=1.0, str rule=\"hf\", "
      "int cap=-1) -> Tensor");
  // The same with alpha and temperature per row, as top_h_mask_per_row
  // (alpha 0: the row is drawn from without truncation).
  m.def(
      "sample_per_row(Tensor logits, Tensor uniform, Tensor alpha, Tensor temperature, str rule=\"hf\", int cap=-1) "
      "-> Tensor");

  // Memory-light linear cross-entropy (csrc/frontend/linear_ce.h): the
  // logits x = hidden @ weight^T + bias are only ever formed chunk by chunk.
  // hidden (N, D), weight (V, D), target (N) int64. softcap = 0: none.
  //   linear_ce_stats    -> (N, 5) fp32 per-token state
  //                         [max z, sum exp(z - max), sum (z - max) exp(z - max), z_target, sum_c w_c z_c]
  //   linear_ce_backward -> (grad_hidden, grad_weight, grad_bias) from the per-token
  //                         normaliser (N, 2) [max z, log sum exp(z - max)] and
  //                         coefficients (N, 4) [a, e, beta, sigma];
  //                         grad_bias has shape (V) if bias_grad else (0);
  //                         grad_filter_eps > 0: skips the gradient GEMMs of tiles
  //                         where every |dL/dx| < grad_filter_eps * max_token |a|.
  m.def(
      "linear_ce_stats(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int ignore_index, float softcap, float temperature, int chunk_budget) -> Tensor");
  m.def(
      "linear_ce_backward(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "Tensor normaliser, Tensor coefficients, float softcap, float temperature, int chunk_budget, bool bias_grad, "
      "float grad_filter_eps=0.0) -> (Tensor, Tensor, Tensor)");

  // ---- Sampler family: the row-statistics rules (docs/sampling.md) ----
  // params: float32 (..., 10) per-row table [temperature, min_p, top_n_sigma,
  // p_less, epsilon, eta, top_k, top_p, typical_p, min_tokens_to_keep]
  // (csrc/core/row_filters.h), built by logitkit.filters. filter_mask -> bool keep mask of logits' shape;
  // filter_logits -> logits where kept, filter_value elsewhere (logits' dtype).
  // filter_sample -> (tokens int64 (...), stats float32 (..., 4) [log q(token),
  // raw log p(token) (NaN unless raw_log_prob), H(q), kept count]) drawn by
  // inverse CDF at `uniform`. philox_uniform: the Philox4x32-10 uniform in
  // [0, 1) of each (seed, offset) pair (int64, same shape).
  m.def("filter_mask(Tensor logits, Tensor params) -> Tensor");
  m.def("filter_logits(Tensor logits, Tensor params, float filter_value) -> Tensor");
  m.def("filter_sample(Tensor logits, Tensor params, Tensor uniform, bool raw_log_prob=False) -> (Tensor, Tensor)");
  m.def("philox_uniform(Tensor seed, Tensor offset) -> Tensor");
}

}  // namespace logitkit
