// The op-level entry point of top_h_mask, written once for every backend
// (CPU, CUDA, emulated CUDA): argument checks (same messages everywhere, and
// the same as the fake kernel in python/logitkit/_registration.py), output
// allocation, empty inputs, row layout and dtype dispatch. A backend supplies
//
//   template <class scalar_t> static void top_h_mask(const Rows&, const TopHParams&, bool* out);
//
// writing the (rows, cols) contiguous keep mask.
#pragma once

#include <algorithm>
#include <string>

#include <torch/library.h>

#include "../core/top_h.h"
#include "row_ops_common.h"

namespace logitkit {

struct TopHParams {
  core::TopHRule rule;
  float alpha;
  float inv_temperature;
  int64_t k;  // tokens the capped rules select: min(cap, V); unused by "exact"
};

inline core::TopHRule parse_top_h_rule(c10::string_view rule) {
  if (rule == "hf") return core::TopHRule::hf;
  if (rule == "official") return core::TopHRule::official;
  TORCH_CHECK_VALUE(rule == "exact", "logitkit.top_h_mask: rule must be 'hf', 'official' or 'exact', got '",
                    std::string(rule), "'");
  return core::TopHRule::exact;
}

inline TopHParams top_h_params(const at::Tensor& logits, double alpha, double temperature, c10::string_view rule,
                               int64_t cap) {
  check_logits(logits, "top_h_mask", "logits");
  TORCH_CHECK_VALUE(alpha > 0.0 && alpha <= 1.0, "logitkit.top_h_mask: alpha must be in (0, 1], got ", alpha);
  check_temperature(temperature, "top_h_mask");
  TopHParams p;
  p.rule = parse_top_h_rule(rule);
  TORCH_CHECK_VALUE(cap == -1 || cap >= 1, "logitkit.top_h_mask: cap must be >= 1 (or -1 for the rule's default), got ",
                    cap);
  const int64_t effective_cap = cap == -1 ? core::kTopHDefaultCap : cap;
  p.k = std::min<int64_t>(effective_cap, logits.size(-1));
  p.alpha = static_cast<float>(alpha);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  return p;
}

template <class Backend>
struct TopHFrontend {
  static at::Tensor top_h_mask(const at::Tensor& logits, double alpha, double temperature, c10::string_view rule,
                               int64_t cap) {
    const TopHParams params = top_h_params(logits, alpha, temperature, rule, cap);
    at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kBool));
    if (out.numel() == 0) return out;
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(), [&] {
      Backend::template top_h_mask<scalar_t>(r, params, out.data_ptr<bool>());
    });
    return out;
  }

  static void register_all(torch::Library& m) { m.impl("top_h_mask", &top_h_mask); }
};

}  // namespace logitkit
