// The frontend of Top-H: the op-level entry points of top_h_mask and sample,
// written once for every backend (CPU, CUDA, emulated CUDA): argument checks (same messages
// everywhere, and the same as the fake kernels in
// python/logitkit/_registration.py), output allocation, empty inputs, row
// layout and dtype dispatch. A backend supplies
//
//   template <class scalar_t> static void top_h_mask(const Rows&, const TopHParams&, bool* out);
//   template <class scalar_t> static void sample(const Rows&, const TopHParams&, const float* uniform, int64_t* out);
//
// top_h_mask writes the (rows, cols) contiguous keep mask; sample writes one
// token per row, drawn by inverse CDF at uniform[row] in [0, 1) from
// softmax(z) restricted to the kept set (all tokens when !params.truncate).
#pragma once

#include <algorithm>
#include <optional>
#include <string>

#include <torch/library.h>

#include "../core/top_h.h"
#include "common.h"

namespace logitkit {

struct TopHParams {
  bool truncate = true;  // false: plain temperature sampling (sample without alpha)
  core::TopHRule rule;
  float alpha;
  float inv_temperature;
  int64_t k;  // tokens the capped rules select: min(cap, V); unused by "exact"
};

inline core::TopHRule parse_top_h_rule(c10::string_view rule, const char* op) {
  if (rule == "hf") return core::TopHRule::hf;
  if (rule == "official") return core::TopHRule::official;
  TORCH_CHECK_VALUE(rule == "exact", "logitkit.", op, ": rule must be 'hf', 'official' or 'exact', got '",
                    std::string(rule), "'");
  return core::TopHRule::exact;
}

// Checks the arguments of `op`; alpha = nullopt (sample only) means no
// truncation.
inline TopHParams top_h_params(const at::Tensor& logits, std::optional<double> alpha, double temperature,
                               c10::string_view rule, int64_t cap, const char* op) {
  check_logits(logits, op, "logits");
  TORCH_CHECK_VALUE(!alpha || (*alpha > 0.0 && *alpha <= 1.0), "logitkit.", op, ": alpha must be in (0, 1], got ",
                    alpha.value_or(0.0));
  check_temperature(temperature, op);
  TopHParams p;
  p.truncate = alpha.has_value();
  p.rule = parse_top_h_rule(rule, op);
  TORCH_CHECK_VALUE(cap == -1 || cap >= 1, "logitkit.", op, ": cap must be >= 1 (or -1 for the rule's default), got ",
                    cap);
  const int64_t effective_cap = cap == -1 ? core::kTopHDefaultCap : cap;
  p.k = std::min<int64_t>(effective_cap, logits.size(-1));
  p.alpha = static_cast<float>(alpha.value_or(1.0));
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  return p;
}

template <class Backend>
struct TopHFrontend {
  static at::Tensor top_h_mask(const at::Tensor& logits, double alpha, double temperature, c10::string_view rule,
                               int64_t cap) {
    const TopHParams params = top_h_params(logits, alpha, temperature, rule, cap, "top_h_mask");
    at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kBool));
    if (out.numel() == 0) return out;
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(),
                                  [&] { Backend::template top_h_mask<scalar_t>(r, params, out.data_ptr<bool>()); });
    return out;
  }

  static at::Tensor sample(const at::Tensor& logits, const at::Tensor& uniform, std::optional<double> alpha,
                           double temperature, c10::string_view rule, int64_t cap) {
    const TopHParams params = top_h_params(logits, alpha, temperature, rule, cap, "sample");
    const at::IntArrayRef batch = logits.sizes().slice(0, logits.dim() - 1);
    TORCH_CHECK_VALUE(uniform.device() == logits.device(), "logitkit.sample: uniform is on ", uniform.device(),
                      " but logits is on ", logits.device());
    TORCH_CHECK_TYPE(uniform.scalar_type() == at::kFloat, "logitkit.sample: uniform must be float32, got ",
                     python_dtype_name(uniform.scalar_type()));
    TORCH_CHECK_VALUE(uniform.sizes() == batch, "logitkit.sample: uniform must have shape ", batch,
                      " (one number per row), got ", uniform.sizes());
    at::Tensor out = at::empty(batch, logits.options().dtype(at::kLong));
    if (out.numel() == 0) return out;
    if (logits.size(-1) == 0) return out.fill_(-1);  // no vocabulary: no defined distribution
    const at::Tensor u = uniform.contiguous();
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(), [&] {
      Backend::template sample<scalar_t>(r, params, u.data_ptr<float>(), out.data_ptr<int64_t>());
    });
    return out;
  }

  static void register_all(torch::Library& m) {
    m.impl("top_h_mask", &top_h_mask);
    m.impl("sample", &sample);
  }
};

}  // namespace logitkit
