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
#include <cmath>
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
  // top_h_mask_per_row: one alpha and one temperature per row (float32,
  // contiguous, in the row order of as_rows); nullptr: alpha and
  // inv_temperature above hold for every row.
  const float* row_alpha = nullptr;
  const float* row_temperature = nullptr;

  // The parameters of row `row`. A per-row alpha of 0 turns Top-H off for the
  // row (truncate = false: the mask keeps every token). Values the frontend
  // rejects on the CPU (alpha outside [0, 1], a temperature that is not a
  // finite number > 0, or whose 1 / T overflows) cannot be checked for a
  // CUDA tensor without a host synchronisation; such a row is not truncated
  // either (docs/sampling.md).
  LK_HOST_DEVICE TopHParams for_row(int64_t row) const {
    TopHParams p = *this;
    if (row_alpha != nullptr) {
      const float a = row_alpha[row];
      p.truncate = a > 0.0f && a <= 1.0f;  // (NaN: false)
      p.alpha = a;
    }
    if (row_temperature != nullptr) {
      const float inv_t = 1.0f / row_temperature[row];
      if (!(inv_t > 0.0f && inv_t <= core::max_finite())) p.truncate = false;
      p.inv_temperature = inv_t;
    }
    return p;
  }
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

// The per-row tensors of top_h_mask_per_row / sample_per_row that
// TopHParams::row_alpha / row_temperature point into (kept alive by the caller).
struct TopHRowValues {
  at::Tensor alpha, temperature;
};

template <class Backend>
struct TopHFrontend {
  static at::Tensor top_h_mask(const at::Tensor& logits, double alpha, double temperature, c10::string_view rule,
                               int64_t cap) {
    return mask_with(logits, top_h_params(logits, alpha, temperature, rule, cap, "top_h_mask"));
  }

  // top_h_mask_per_row: alpha and temperature per row (alpha 0: Top-H off
  // for that row), float32 tensors of shape logits.shape[:-1].
  static at::Tensor top_h_mask_per_row(const at::Tensor& logits, const at::Tensor& alpha, const at::Tensor& temperature,
                                       c10::string_view rule, int64_t cap) {
    TopHRowValues rows;
    return mask_with(logits, per_row_params(logits, alpha, temperature, rule, cap, "top_h_mask", rows));
  }

  // sample_per_row: the Top-H sampler with alpha and temperature per row (as
  // top_h_mask_per_row: alpha 0 draws from the whole row).
  static at::Tensor sample_per_row(const at::Tensor& logits, const at::Tensor& uniform, const at::Tensor& alpha,
                                   const at::Tensor& temperature, c10::string_view rule, int64_t cap) {
    TopHRowValues rows;
    return sample_with(logits, uniform, per_row_params(logits, alpha, temperature, rule, cap, "sample", rows));
  }

  // The checked params of a per-row op: on logits' device, float32, one
  // value per row (made contiguous into `rows`); on the CPU, alpha in [0, 1]
  // and temperature a finite number > 0 with a finite 1 / T (a CUDA check
  // would be a host synchronisation: TopHParams::for_row).
  static TopHParams per_row_params(const at::Tensor& logits, const at::Tensor& alpha, const at::Tensor& temperature,
                                   c10::string_view rule, int64_t cap, const char* op, TopHRowValues& rows) {
    TopHParams params = top_h_params(logits, 1.0, 1.0, rule, cap, op);
    rows.alpha = per_row_parameter(logits, alpha, "alpha", op);
    rows.temperature = per_row_parameter(logits, temperature, "temperature", op);
    if (logits.device().is_cpu()) {
      const float* a = rows.alpha.data_ptr<float>();
      const float* t = rows.temperature.data_ptr<float>();
      for (int64_t row = 0; row < rows.alpha.numel(); ++row) {
        TORCH_CHECK_VALUE(a[row] >= 0.0f && a[row] <= 1.0f, "logitkit.", op,
                          ": alpha must be in [0, 1] per row (0: Top-H off for that row), got ", a[row], " in row ",
                          row);
        TORCH_CHECK_VALUE(std::isfinite(t[row]) && t[row] > 0.0f && std::isfinite(1.0f / t[row]), "logitkit.", op,
                          ": temperature must be a finite number > 0, got ", t[row], " in row ", row);
      }
    }
    params.row_alpha = rows.alpha.data_ptr<float>();
    params.row_temperature = rows.temperature.data_ptr<float>();
    return params;
  }

  static at::Tensor per_row_parameter(const at::Tensor& logits, const at::Tensor& value, const char* arg,
                                      const char* op) {
    const at::IntArrayRef batch = logits.sizes().slice(0, logits.dim() - 1);
    TORCH_CHECK_VALUE(value.device() == logits.device(), "logitkit.", op, ": ", arg, " is on ", value.device(),
                      " but logits is on ", logits.device());
    TORCH_CHECK_TYPE(value.scalar_type() == at::kFloat, "logitkit.", op, ": ", arg, " must be float32, got ",
                     python_dtype_name(value.scalar_type()));
    TORCH_CHECK_VALUE(value.sizes() == batch, "logitkit.", op, ": ", arg, " must have shape ", batch,
                      " (one value per row), got ", value.sizes());
    return value.contiguous();
  }

  static at::Tensor mask_with(const at::Tensor& logits, const TopHParams& params) {
    at::Tensor out = empty_row_output(logits.sizes(), logits.options().dtype(at::kBool));
    if (out.numel() == 0) return out;
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(),
                                  [&] { Backend::template top_h_mask<scalar_t>(r, params, out.data_ptr<bool>()); });
    return out;
  }

  static at::Tensor sample(const at::Tensor& logits, const at::Tensor& uniform, std::optional<double> alpha,
                           double temperature, c10::string_view rule, int64_t cap) {
    return sample_with(logits, uniform, top_h_params(logits, alpha, temperature, rule, cap, "sample"));
  }

  static at::Tensor sample_with(const at::Tensor& logits, const at::Tensor& uniform, const TopHParams& params) {
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
    m.impl("top_h_mask_per_row", &top_h_mask_per_row);
    m.impl("sample_per_row", &sample_per_row);
    m.impl("sample", &sample);
  }
};

}  // namespace logitkit
