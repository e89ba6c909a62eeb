// The frontend of the row-statistics sampler ops (filter_mask, filter_sample,
// philox_uniform; docs/sampling.md), written once for every backend: argument
// checks (the same messages as the fake kernels in
// python/logitkit/sampling.py), allocation, empty inputs and dtype dispatch.
// A backend supplies
//
//   template <class scalar_t> static void filter_mask(const Rows&, const float* params, bool* out);
//   template <class scalar_t> static void filter_logits(const Rows&, const float* params, float filter_value,
//                                                       scalar_t* out);
//   template <class scalar_t> static void filter_sample(const Rows&, const float* params, const float* uniform,
//                                                       bool raw_log_prob, int64_t* tokens, float* stats);
//   static void philox_uniform(const at::Tensor& seed, const at::Tensor& offset, at::Tensor& out);
//
// params: (rows, core::kFilterParamCount) float32, contiguous. stats: (rows,
// kSampleStatCount) float32 (see SampleStat).
#pragma once

#include <tuple>

#include <torch/library.h>

#include "../core/row_filters.h"
#include "common.h"

namespace logitkit {

// The columns of filter_sample's per-row statistics.
enum SampleStat : int {
  kLogProb = 0,     // log q(token), q the processed (scaled, truncated) distribution
  kRawLogProb = 1,  // log softmax(x)(token) at temperature 1, untruncated (NaN unless requested)
  kEntropy = 2,     // H(q) in nats
  kKeptCount = 3,   // |kept set|
  kSampleStatCount = 4,
};

inline at::Tensor checked_filter_params(const at::Tensor& logits, const at::Tensor& params, const char* op) {
  check_logits(logits, op, "logits");
  std::vector<int64_t> shape = row_result_shape(logits);
  shape.push_back(core::kFilterParamCount);
  TORCH_CHECK_VALUE(params.device() == logits.device(), "logitkit.", op, ": params is on ", params.device(),
                    " but logits is on ", logits.device());
  TORCH_CHECK_TYPE(params.scalar_type() == at::kFloat, "logitkit.", op, ": params must be float32, got ",
                   python_dtype_name(params.scalar_type()));
  TORCH_CHECK_VALUE(params.sizes() == at::IntArrayRef(shape), "logitkit.", op, ": params must have shape ",
                    at::IntArrayRef(shape), ", got ", params.sizes());
  return params.contiguous();
}

template <class Backend>
struct RowFiltersFrontend {
  static at::Tensor filter_mask(const at::Tensor& logits, const at::Tensor& params) {
    const at::Tensor prm = checked_filter_params(logits, params, "filter_mask");
    at::Tensor out = empty_row_output(logits.sizes(), logits.options().dtype(at::kBool));
    if (out.numel() == 0) return out;
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(), [&] {
      Backend::template filter_mask<scalar_t>(r, prm.data_ptr<float>(), out.data_ptr<bool>());
    });
    return out;
  }

  static at::Tensor filter_logits(const at::Tensor& logits, const at::Tensor& params, double filter_value) {
    const at::Tensor prm = checked_filter_params(logits, params, "filter_logits");
    at::Tensor out = empty_row_output(logits.sizes(), logits.options());
    if (out.numel() == 0) return out;
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(), [&] {
      Backend::template filter_logits<scalar_t>(r, prm.data_ptr<float>(), static_cast<float>(filter_value),
                                                out.data_ptr<scalar_t>());
    });
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor> filter_sample(const at::Tensor& logits, const at::Tensor& params,
                                                          const at::Tensor& uniform, bool raw_log_prob) {
    const at::Tensor prm = checked_filter_params(logits, params, "filter_sample");
    const std::vector<int64_t> batch = row_result_shape(logits);
    TORCH_CHECK_VALUE(uniform.device() == logits.device(), "logitkit.filter_sample: uniform is on ", uniform.device(),
                      " but logits is on ", logits.device());
    TORCH_CHECK_TYPE(uniform.scalar_type() == at::kFloat, "logitkit.filter_sample: uniform must be float32, got ",
                     python_dtype_name(uniform.scalar_type()));
    TORCH_CHECK_VALUE(uniform.sizes() == at::IntArrayRef(batch), "logitkit.filter_sample: uniform must have shape ",
                      at::IntArrayRef(batch), " (one number per row), got ", uniform.sizes());
    at::Tensor tokens = at::empty(batch, logits.options().dtype(at::kLong));
    std::vector<int64_t> stat_shape = batch;
    stat_shape.push_back(kSampleStatCount);
    at::Tensor stats = at::empty(stat_shape, logits.options().dtype(at::kFloat));
    if (tokens.numel() == 0) return {tokens, stats};
    if (logits.size(-1) == 0) return {tokens.fill_(-1), stats.fill_(NAN)};
    const at::Tensor u = uniform.contiguous();
    const Rows r = as_rows(logits);
    LOGITKIT_DISPATCH_LOGIT_TYPES(logits.scalar_type(), [&] {
      Backend::template filter_sample<scalar_t>(r, prm.data_ptr<float>(), u.data_ptr<float>(), raw_log_prob,
                                                tokens.data_ptr<int64_t>(), stats.data_ptr<float>());
    });
    return {tokens, stats};
  }

  static at::Tensor philox_uniform(const at::Tensor& seed, const at::Tensor& offset) {
    TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "logitkit.philox_uniform: seed must be int64, got ",
                     python_dtype_name(seed.scalar_type()));
    TORCH_CHECK_TYPE(offset.scalar_type() == at::kLong, "logitkit.philox_uniform: offset must be int64, got ",
                     python_dtype_name(offset.scalar_type()));
    TORCH_CHECK_VALUE(offset.device() == seed.device(), "logitkit.philox_uniform: offset is on ", offset.device(),
                      " but seed is on ", seed.device());
    TORCH_CHECK_VALUE(offset.sizes() == seed.sizes(), "logitkit.philox_uniform: offset must have the shape of seed ",
                      seed.sizes(), ", got ", offset.sizes());
    at::Tensor out = at::empty(seed.sizes(), seed.options().dtype(at::kFloat));
    if (out.numel() == 0) return out;
    Backend::philox_uniform(seed.contiguous(), offset.contiguous(), out);
    return out;
  }

  static void register_all(torch::Library& m) {
    m.impl("filter_mask", &filter_mask);
    m.impl("filter_logits", &filter_logits);
    m.impl("filter_sample", &filter_sample);
    m.impl("philox_uniform", &philox_uniform);
  }
};

}  // namespace logitkit
