// The op-level driver of the memory-light linear cross-entropy, written once
// for every backend (CPU, CUDA, emulated CUDA).
//
//   linear_ce_stats     forward: per-token state (m, s, b, z_target,
//                       sum_c w_c z_c), see csrc/core/linear_ce.h
//   linear_ce_backward  gradients for hidden, weight (and bias) from the
//                       per-token normaliser (m, log s) and coefficients
//                       (a, e, beta, sigma)
//   linear_ce_fused     the forward state and the gradients in one pass, for
//                       losses whose upstream gradient is known in the
//                       forward (reduced losses: coefficients for
//                       grad_output = 1); no logits are recomputed
//
// stats and backward walk the (N, V) logits in tiles of at most chunk_budget
// bytes of fp32 (token chunks outer, vocabulary chunks inner); fused walks
// blocks of whole vocabulary rows (the softmax of a token must be complete
// before its gradient exists), see lce_fused_rows. In every case:
// the tile's raw logits come from an ATen GEMM (BLAS / cuBLAS) into a reused
// fp32 workspace, then the backend's fused chunk kernel does everything else
// in place. No N x V buffer exists at any time, and nothing here reads device
// memory from the host (no synchronisation on CUDA).
//
// bf16/fp16 inputs: the GEMMs run in fp32 on upcast copies of the tile's
// hidden rows and weight rows (bf16 GEMM is far slower than fp32 on CPUs, and
// fp32 logits keep the softmax exact); gradients are accumulated in fp32 and
// cast to the input dtype once at the end.
//
// A backend supplies
//   static void forward_chunk(const LceChunk&, const at::Tensor& tile);   // folds a tile into `state`
//   static void backward_chunk(const LceChunk&, const at::Tensor& tile);  // tile <- dL/dx in place
//   static constexpr bool kForwardLeavesZ;  // forward_chunk overwrites the tile's x with z
// (`tile` is the workspace tensor behind LceChunk::logits: device, stream.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/core/TensorOptions.h>
#include <torch/library.h>

#include "../core/linear_ce.h"
#include "row_ops_common.h"

namespace logitkit {

using core::LceChunk;

// Tile shape for a budget: the fp32 logits tile holds at most budget / 4
// elements. Columns first get up to budget / min(N, 256) (long rows keep the
// per-tile softmax merge cheap and the GEMMs large); rows fill the rest.
struct LceTiling {
  int64_t rows;
  int64_t cols;
};

inline LceTiling lce_tiling(int64_t n, int64_t v, int64_t chunk_budget) {
  const int64_t elements = std::max<int64_t>(1, chunk_budget / static_cast<int64_t>(sizeof(float)));
  const int64_t cols = std::min(v, std::max<int64_t>(1, elements / std::max<int64_t>(1, std::min<int64_t>(n, 256))));
  const int64_t rows = std::min(n, std::max<int64_t>(1, elements / cols));
  return {rows, cols};
}

// Tokens per block of the fused op: as many whole fp32 vocabulary rows as
// the budget holds (at least one). Each block costs three GEMMs (logits,
// grad_hidden, a rank-`rows` update of grad_weight), so more rows per block
// means fewer passes over weight and grad_weight.
inline int64_t lce_fused_rows(int64_t n, int64_t v, int64_t chunk_budget) {
  const int64_t row_bytes = v * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(1, std::min(n, chunk_budget / row_bytes));
}

// Vocabulary rows of weight upcast to fp32 at a time for bf16/fp16 inputs in
// the fused op (the fp32 copy stays within the budget); fp32 weight is used
// in place, in one piece.
inline int64_t lce_weight_slab(const at::Tensor& weight, int64_t chunk_budget) {
  if (weight.scalar_type() == at::kFloat) return weight.size(0);
  const int64_t row_bytes = weight.size(1) * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(1, std::min(weight.size(0), chunk_budget / row_bytes));
}

// The checked, contiguous inputs of an op.
struct LceInputs {
  at::Tensor hidden, weight, target, bias, class_weight;  // bias/class_weight: fp32 or undefined
  int64_t n = 0, v = 0, d = 0;
};

template <class Backend>
struct LinearCeFrontends {
  using Inputs = LceInputs;

  static LceInputs check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
                             double softcap, double temperature, int64_t chunk_budget, const char* op) {
    check_logits(hidden, op, "hidden");
    TORCH_CHECK_VALUE(hidden.dim() == 2, "logitkit.", op, ": hidden must be 2-D (N, D), got shape ", hidden.sizes());
    TORCH_CHECK_VALUE(weight.dim() == 2, "logitkit.", op, ": weight must be 2-D (V, D), got shape ", weight.sizes());
    TORCH_CHECK_VALUE(weight.device() == hidden.device(), "logitkit.", op, ": weight is on ", weight.device(),
                      " but hidden is on ", hidden.device());
    TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "logitkit.", op, ": weight has dtype ",
                     python_dtype_name(weight.scalar_type()), " but hidden has dtype ",
                     python_dtype_name(hidden.scalar_type()));
    TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "logitkit.", op, ": weight must have shape (V, ",
                      hidden.size(1), ") to match hidden's last dimension, got ", weight.sizes());
    TORCH_CHECK_VALUE(weight.size(0) >= 1, "logitkit.", op, ": weight must have at least one row (V >= 1)");
    TORCH_CHECK_VALUE(target.device() == hidden.device(), "logitkit.", op, ": target is on ", target.device(),
                      " but hidden is on ", hidden.device());
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "logitkit.", op, ": target must be torch.int64, got ",
                     python_dtype_name(target.scalar_type()));
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == hidden.size(0), "logitkit.", op,
                      ": target must have shape (", hidden.size(0), "), got ", target.sizes());
    TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "logitkit.", op,
                      ": softcap must be a finite number > 0 (or 0 for none), got ", softcap);
    check_temperature(temperature, op);
    TORCH_CHECK_VALUE(chunk_budget > 0, "logitkit.", op, ": chunk_budget must be > 0 bytes, got ", chunk_budget);
    LceInputs in;
    in.n = hidden.size(0);
    in.v = weight.size(0);
    in.d = hidden.size(1);
    in.hidden = hidden.contiguous();
    in.weight = weight.contiguous();
    in.target = target.contiguous();
    auto vocab_vector = [&](const std::optional<at::Tensor>& t, const char* arg) {
      if (!t.has_value() || !t->defined()) return at::Tensor();
      TORCH_CHECK_VALUE(t->device() == hidden.device(), "logitkit.", op, ": ", arg, " is on ", t->device(),
                        " but hidden is on ", hidden.device());
      TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "logitkit.", op, ": ", arg,
                       " must be a floating-point tensor, got ", python_dtype_name(t->scalar_type()));
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == in.v, "logitkit.", op, ": ", arg, " must have shape (", in.v,
                        "), got ", t->sizes());
      return t->to(at::kFloat).contiguous();
    };
    in.bias = vocab_vector(bias, "bias");
    in.class_weight = vocab_vector(class_weight, "class_weight");
    return in;
  }

  // Range check of the targets. On CPU a clear error; on CUDA it would need a
  // host synchronisation, so there an out-of-range target is reported through
  // the result instead (its z_target stays NaN, hence a NaN loss).
  static void check_targets(const LceInputs& in, int64_t ignore_index, const char* op) {
    if (!in.target.device().is_cpu()) return;
    const int64_t* t = in.target.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.n; ++i) {
      TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < in.v), "logitkit.", op,
                        ": target must hold class indices in [0, ", in.v, ") or ignore_index=", ignore_index,
                        ", but target[", i, "] = ", t[i]);
    }
  }

  // tile <- h @ w^T (+ bias[v0 : v0 + cols]): the raw logits of the fp32
  // hidden rows h against the fp32 weight rows w = weight[v0 : v0 + cols].
  static void raw_logits(const LceInputs& in, at::Tensor& tile, int64_t v0, const at::Tensor& h, const at::Tensor& w) {
    if (in.bias.defined()) {
      at::addmm_out(tile, in.bias.narrow(0, v0, w.size(0)), h, w.t());
    } else {
      at::mm_out(tile, h, w.t());
    }
  }

  // Visits the tiles in order (token chunks outer, vocabulary chunks inner);
  // visit(tile, t0, v0, hidden_rows_fp32, weight_rows_fp32) gets the tile
  // holding x = hidden[t0:t0+rows] @ weight[v0:v0+cols]^T + bias[v0:v0+cols].
  template <class Visit>
  static void for_each_tile(const LceInputs& in, int64_t chunk_budget, Visit&& visit) {
    const LceTiling tiling = lce_tiling(in.n, in.v, chunk_budget);
    at::Tensor workspace = at::empty({tiling.rows * tiling.cols}, in.hidden.options().dtype(at::kFloat));
    for (int64_t t0 = 0; t0 < in.n; t0 += tiling.rows) {
      const int64_t rows = std::min(tiling.rows, in.n - t0);
      const at::Tensor h = in.hidden.narrow(0, t0, rows).to(at::kFloat);  // a view for fp32 inputs
      for (int64_t v0 = 0; v0 < in.v; v0 += tiling.cols) {
        const int64_t cols = std::min(tiling.cols, in.v - v0);
        const at::Tensor w = in.weight.narrow(0, v0, cols).to(at::kFloat);
        at::Tensor tile = workspace.narrow(0, 0, rows * cols).view({rows, cols});
        raw_logits(in, tile, v0, h, w);
        visit(tile, t0, v0, h, w);
      }
    }
  }

  static LceChunk make_chunk(const LceInputs& in, at::Tensor& tile, int64_t t0, int64_t v0, double softcap,
                             double temperature) {
    LceChunk c;
    c.logits = tile.data_ptr<float>();
    c.rows = tile.size(0);
    c.cols = tile.size(1);
    c.col_begin = v0;
    c.target = in.target.data_ptr<int64_t>() + t0;
    c.class_weight = in.class_weight.defined() ? in.class_weight.data_ptr<float>() : nullptr;
    c.transform = core::LogitTransform{static_cast<float>(1.0 / temperature), static_cast<float>(softcap)};
    return c;
  }

  // The per-token forward state before any tile: empty softmax state.
  static at::Tensor empty_state(const LceInputs& in) {
    at::Tensor state = at::empty({in.n, core::kLceStateWidth}, in.hidden.options().dtype(at::kFloat));
    state.select(1, core::kLceMax).fill_(-std::numeric_limits<float>::infinity());
    state.select(1, core::kLceSumExp).zero_();
    state.select(1, core::kLceSumShifted).zero_();
    state.select(1, core::kLceTargetLogit).fill_(std::numeric_limits<float>::quiet_NaN());  // NaN: target not in [0, V)
    state.select(1, core::kLceWeightedSum).zero_();
    return state;
  }

  static at::Tensor stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
                          int64_t ignore_index, double softcap, double temperature, int64_t chunk_budget) {
    constexpr const char* op = "linear_cross_entropy";
    const LceInputs in = check_inputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget, op);
    check_targets(in, ignore_index, op);
    at::Tensor state = empty_state(in);
    if (in.n == 0) return state;
    for_each_tile(in, chunk_budget, [&](at::Tensor& tile, int64_t t0, int64_t v0, const at::Tensor&, const at::Tensor&) {
      LceChunk c = make_chunk(in, tile, t0, v0, softcap, temperature);
      c.state = state.data_ptr<float>() + t0 * core::kLceStateWidth;
      Backend::forward_chunk(c, tile);
    });
    return state;
  }

  static void check_per_token(const at::Tensor& t, const LceInputs& in, int64_t width, const char* op,
                              const char* arg) {
    TORCH_CHECK_VALUE(t.device() == in.hidden.device() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                          t.size(0) == in.n && t.size(1) == width,
                      "logitkit.", op, ": ", arg, " must be float32 of shape (", in.n, ", ", width, ") on ",
                      in.hidden.device());
  }

  // Gradient accumulators (fp32; for fp32 inputs they are the results).
  struct Grads {
    at::Tensor hidden, weight, bias;

    Grads(const LceInputs& in, bool bias_grad) {
      const auto f32 = in.hidden.options().dtype(at::kFloat);
      hidden = at::zeros({in.n, in.d}, f32);
      weight = at::zeros({in.v, in.d}, f32);
      bias = at::zeros({bias_grad ? in.v : 0}, f32);
    }

    // With g = dL/dx for tokens [t0, t0 + rows) and vocabulary entries
    // [v0, v0 + cols) (x = h w^T + b):  dL/dh += g w,  dL/dw += g^T h,
    // dL/db += column sums of g.
    void add(const at::Tensor& g, int64_t t0, int64_t v0, const at::Tensor& h, const at::Tensor& w) {
      const int64_t rows = g.size(0), cols = g.size(1);
      hidden.narrow(0, t0, rows).addmm_(g, w);
      weight.narrow(0, v0, cols).addmm_(g.t(), h);
      if (bias.numel() > 0) bias.narrow(0, v0, cols).add_(g.sum(0));
    }

    std::tuple<at::Tensor, at::Tensor, at::Tensor> results(at::ScalarType dtype) const {
      return {hidden.to(dtype), weight.to(dtype), bias.to(dtype)};
    }
  };

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& class_weight, const at::Tensor& normaliser, const at::Tensor& coefficients,
      double softcap, double temperature, int64_t chunk_budget, bool bias_grad) {
    constexpr const char* op = "linear_cross_entropy_backward";
    const LceInputs in = check_inputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget, op);
    check_per_token(normaliser, in, 2, op, "normaliser");
    check_per_token(coefficients, in, core::kLceCoefWidth, op, "coefficients");
    Grads grads(in, bias_grad);
    if (in.n > 0) {
      const at::Tensor norm_c = normaliser.contiguous();
      const at::Tensor coef_c = coefficients.contiguous();
      for_each_tile(in, chunk_budget,
                    [&](at::Tensor& tile, int64_t t0, int64_t v0, const at::Tensor& h, const at::Tensor& w) {
                      LceChunk c = make_chunk(in, tile, t0, v0, softcap, temperature);
                      c.normaliser = norm_c.data_ptr<float>() + 2 * t0;
                      c.coefficients = coef_c.data_ptr<float>() + t0 * core::kLceCoefWidth;
                      Backend::backward_chunk(c, tile);  // tile <- dL/dx
                      grads.add(tile, t0, v0, h, w);
                    });
    }
    return grads.results(hidden.scalar_type());
  }

  // Forward state and gradients in one pass. The coefficients are those of
  // the backward except that the first one is a + a_lse * lse, with a_lse
  // (`prob_per_lse`, (N, 1)) the part that depends on the token's lse (the
  // z-loss): lse is only known once the token's whole row has been seen.
  // Per block of `rows` tokens (lce_fused_rows):
  //   tile (rows, V)  <- raw logits, one GEMM per weight slab
  //   state           <- forward_chunk over the whole rows (exact lse)
  //   tile            <- dL/dx (backward_chunk, coefficients resolved with lse)
  //   grads           += tile-slab GEMMs
  // so each token's logits are formed once: three GEMM-equivalents in all.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused(
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& class_weight, int64_t ignore_index, const at::Tensor& coefficients,
      const at::Tensor& prob_per_lse, double softcap, double temperature, int64_t chunk_budget, bool bias_grad) {
    constexpr const char* op = "linear_cross_entropy";
    const LceInputs in = check_inputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget, op);
    check_targets(in, ignore_index, op);
    check_per_token(coefficients, in, core::kLceCoefWidth, op, "coefficients");
    check_per_token(prob_per_lse, in, 1, op, "prob_per_lse");
    at::Tensor state = empty_state(in);
    Grads grads(in, bias_grad);
    const int64_t block = lce_fused_rows(in.n, in.v, chunk_budget);
    const int64_t slab = lce_weight_slab(in.weight, chunk_budget);
    at::Tensor workspace = at::empty({in.n > 0 ? block * in.v : 0}, in.hidden.options().dtype(at::kFloat));
    // Visits the weight slabs: visit(v0, fp32 weight rows [v0, v0 + cols)).
    auto for_each_slab = [&](auto&& visit) {
      for (int64_t v0 = 0; v0 < in.v; v0 += slab) {
        visit(v0, in.weight.narrow(0, v0, std::min(slab, in.v - v0)).to(at::kFloat));
      }
    };
    for (int64_t t0 = 0; t0 < in.n; t0 += block) {
      const int64_t rows = std::min(block, in.n - t0);
      const at::Tensor h = in.hidden.narrow(0, t0, rows).to(at::kFloat);
      at::Tensor tile = workspace.narrow(0, 0, rows * in.v).view({rows, in.v});
      for_each_slab([&](int64_t v0, const at::Tensor& w) {
        at::Tensor part = tile.narrow(1, v0, w.size(0));
        raw_logits(in, part, v0, h, w);
      });
      LceChunk c = make_chunk(in, tile, t0, 0, softcap, temperature);
      const at::Tensor st = state.narrow(0, t0, rows);
      c.state = st.data_ptr<float>();
      Backend::forward_chunk(c, tile);
      // The rows are complete: normaliser (m, log s) and the coefficients with
      // a = a + a_lse * lse, lse = m + log s (small per-token ATen ops).
      const at::Tensor m = st.select(1, core::kLceMax), log_s = st.select(1, core::kLceSumExp).log();
      const at::Tensor norm = at::stack({m, log_s}, 1);
      at::Tensor coef = coefficients.narrow(0, t0, rows).clone();
      coef.select(1, core::kLceCoefProb).addcmul_(prob_per_lse.narrow(0, t0, rows).select(1, 0), m.add(log_s));
      c.normaliser = norm.data_ptr<float>();
      c.coefficients = coef.data_ptr<float>();
      c.holds_z = Backend::kForwardLeavesZ;  // z or still x in the tile
      Backend::backward_chunk(c, tile);  // tile <- dL/dx
      for_each_slab([&](int64_t v0, const at::Tensor& w) { grads.add(tile.narrow(1, v0, w.size(0)), t0, v0, h, w); });
    }
    auto [grad_hidden, grad_weight, grad_bias] = grads.results(hidden.scalar_type());
    return {state, grad_hidden, grad_weight, grad_bias};
  }

  static void register_all(torch::Library& m) {
    m.impl("linear_ce_stats", &stats);
    m.impl("linear_ce_backward", &backward);
    m.impl("linear_ce_fused", &fused);
  }
};

}  // namespace logitkit
