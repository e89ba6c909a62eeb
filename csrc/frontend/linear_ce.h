// The frontend of the memory-light linear cross-entropy: the op-level driver,
// written once for every backend (CPU, CUDA, emulated CUDA).
//
//   linear_ce_stats     forward: per-token state (m, s, b, z_target,
//                       sum_c w_c z_c), see csrc/core/linear_ce.h
//   linear_ce_backward  gradients for hidden, weight (and bias) from the
//                       per-token normaliser (m, log s) and coefficients
//                       (a, e, beta, sigma)
//
// Both walk the (N, V) logits in tiles (linear_ce_tiling: everything
// transient fits chunk_budget bytes), vocabulary chunks outer, token chunks
// inner: the tile's raw logits come from an ATen GEMM (BLAS / cuBLAS) into a
// reused fp32 workspace, then the backend's fused chunk kernel does
// everything else in place; the backward adds two gradient GEMMs per tile.
// Four GEMM-equivalents in all (forward, recompute, grad_hidden,
// grad_weight), each on large square-ish tiles. No N x V buffer exists at
// any time, and nothing here reads device memory from the host (no
// synchronisation on CUDA).
//
// (A fused variant that forms each block of whole vocabulary rows once and
// turns it into gradients in the forward saves one GEMM-equivalent but needs
// rows x V fp32 per block: within a budget of a few MiB its GEMMs see ~16
// tokens at a time and re-stream weight and grad_weight per block. Measured
// on CPU at N = D = 1024, V = 128256 fp32, it was slower than these tiles at
// every budget up to 32 MiB (7.5 s at 8 MiB, 4.45 s at 32 MiB, against 4.2 s
// for the tiles at 8 MiB), so it was removed.)
//
// The GEMMs (GemmPath). fp32 inputs: at::mm / addmm, so torch's own
// matmul precision settings apply (TF32 on CUDA only where
// torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision allow
// it, as torch.mm; IEEE by default). bf16/fp16 inputs, by the backend's
// choice:
//   native       operands in the input dtype on the matrix units, fp32
//                output and accumulation (cuBLAS on CUDA; ATen's CPU BLAS
//                where the CPU has bf16/fp16 units). The logits tile stays
//                fp32; the gradient tile dL/dx is rounded to the input dtype
//                once for its two GEMMs (as every bf16 stack does).
//   fp32_upcast  fp32 GEMMs on exact fp32 copies of the operands (hidden
//                once, each chunk's weight rows once): the fast route on
//                CPUs without bf16/fp16 units.
// Either way grad_hidden and grad_weight accumulate in fp32 (see Grads) and
// are cast once.
//
// A backend supplies
//   static void forward_chunk(const LinearCeChunk&, const at::Tensor& tile);   // folds a tile into `state`
//   static void backward_chunk(const LinearCeChunk&, const at::Tensor& tile);  // tile <- dL/dx in place
//   static GemmPath gemm_path(at::ScalarType);                                 // bf16/fp16: native or fp32_upcast
//   static void native_gemm(at::Tensor& out, const at::Tensor& a,              // out (fp32) = a @ b
//                           const at::Tensor& b, bool accumulate);             //   (+ out), a, b bf16/fp16
// (`tile` is the workspace tensor behind LinearCeChunk::logits: device, stream.)
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
#include <ATen/ops/zeros.h>
#include <c10/core/TensorOptions.h>
#include <torch/library.h>

#include "../core/linear_ce.h"
#include "common.h"

namespace logitkit {

using core::LinearCeChunk;

// How the tiles' GEMMs run (see the header comment).
enum class GemmPath { fp32, fp32_upcast, native };

// Tile shape for a budget. A tile covers `rows` tokens x `cols` vocabulary
// entries; the tiles are visited vocabulary chunk by vocabulary chunk (see
// for_each_tile), and everything transient per tile must fit the budget:
//   rows * cols * 4    fp32 logits tile
//   rows * cols * 2    native path: the gradient tile rounded to bf16/fp16
//   cols * D * 4       bf16/fp16: the fp32 accumulator of the chunk's
//                      grad_weight rows
//   cols * D * 4       fp32_upcast: the chunk's weight rows in fp32
// (fp32 inputs use weight and grad_weight in place). Among the feasible
// shapes it takes the one with the most GEMM work per byte moved: each tile
// costs 6 rows cols D flops for 16 D (rows + cols) bytes of hidden, weight and
// gradient traffic, so it maximises rows cols / (rows + cols); row counts
// tried are N and the powers of two below it.
struct LinearCeTiling {
  int64_t rows;
  int64_t cols;
};

inline LinearCeTiling linear_ce_tiling(int64_t n, int64_t v, int64_t d, int64_t chunk_budget, GemmPath path) {
  const int64_t budget = std::max<int64_t>(1, chunk_budget);
  const int64_t per_element = path == GemmPath::native ? 6 : 4;
  const int64_t per_col = 4 * d * (path == GemmPath::fp32 ? 0 : path == GemmPath::native ? 1 : 2);
  LinearCeTiling best{1, 1};
  double best_score = -1.0;
  auto consider = [&](int64_t rows) {
    const int64_t cols = std::clamp<int64_t>(budget / (rows * per_element + per_col), 1, v);
    const double score = static_cast<double>(rows) * cols / static_cast<double>(rows + cols);
    if (score > best_score) {
      best = {rows, cols};
      best_score = score;
    }
  };
  consider(std::max<int64_t>(n, 1));
  for (int64_t rows = 1; rows < n; rows *= 2) consider(rows);
  return best;
}

// The checked, contiguous inputs of an op.
struct LinearCeInputs {
  at::Tensor hidden, weight, target, bias, class_weight;  // bias/class_weight: fp32 or undefined
  int64_t n = 0, v = 0, d = 0;
  GemmPath path = GemmPath::fp32;
};

template <class Backend>
struct LinearCeFrontend {
  using Inputs = LinearCeInputs;

  static LinearCeInputs check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& class_weight, double softcap, double temperature,
                                     int64_t chunk_budget, const char* op) {
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
    LinearCeInputs in;
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
    in.path = hidden.scalar_type() == at::kFloat ? GemmPath::fp32 : Backend::gemm_path(hidden.scalar_type());
    return in;
  }

  // Range check of the targets. On CPU a clear error; on CUDA it would need a
  // host synchronisation, so there an out-of-range target is reported through
  // the result instead (its z_target stays NaN, hence a NaN loss).
  static void check_targets(const LinearCeInputs& in, int64_t ignore_index, const char* op) {
    if (!in.target.device().is_cpu()) return;
    const int64_t* t = in.target.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.n; ++i) {
      TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < in.v), "logitkit.", op,
                        ": target must hold class indices in [0, ", in.v, ") or ignore_index=", ignore_index,
                        ", but target[", i, "] = ", t[i]);
    }
  }

  // out (fp32) = a @ b (+ out if accumulate) on the inputs' path: a and b are
  // the GEMM operands for_each_tile hands out (fp32, or bf16/fp16 on the
  // native path).
  static void gemm(const LinearCeInputs& in, at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   bool accumulate) {
    if (in.path == GemmPath::native) {
      Backend::native_gemm(out, a, b, accumulate);
    } else if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  }

  // tile <- h @ w^T (+ bias[v0 : v0 + cols]) for the operand rows h, w of a tile.
  static void raw_logits(const LinearCeInputs& in, at::Tensor& tile, int64_t v0, const at::Tensor& h,
                         const at::Tensor& w) {
    const bool fused_bias = in.bias.defined() && in.path != GemmPath::native;
    if (fused_bias) {
      at::addmm_out(tile, in.bias.narrow(0, v0, w.size(0)), h, w.t());
      return;
    }
    gemm(in, tile, h, w.t(), false);
    if (in.bias.defined()) tile.add_(in.bias.narrow(0, v0, w.size(0)));
  }

  // The GEMM operand of hidden or of a chunk's weight rows: fp32 on the
  // fp32_upcast path (an exact copy), the input itself otherwise.
  static at::Tensor operand(const LinearCeInputs& in, const at::Tensor& x) {
    return in.path == GemmPath::fp32_upcast ? x.to(at::kFloat) : x;
  }

  // Visits the tiles vocabulary chunk by vocabulary chunk, token chunks inner,
  // so that a chunk's weight rows are upcast once and its grad_weight rows are
  // complete (every token seen) when the chunk ends.
  // visit(tile, t0, v0, h, w) gets the tile holding
  // x = hidden[t0:t0+rows] @ weight[v0:v0+cols]^T + bias[v0:v0+cols], with h, w
  // the GEMM operands (see operand) of the tile's hidden and weight rows.
  template <class Visit>
  static void for_each_tile(const LinearCeInputs& in, const LinearCeTiling& tiling, Visit&& visit) {
    const at::Tensor hidden_operand = operand(in, in.hidden);
    at::Tensor workspace = at::empty({tiling.rows * tiling.cols}, in.hidden.options().dtype(at::kFloat));
    for (int64_t v0 = 0; v0 < in.v; v0 += tiling.cols) {
      const int64_t cols = std::min(tiling.cols, in.v - v0);
      const at::Tensor w = operand(in, in.weight.narrow(0, v0, cols));
      for (int64_t t0 = 0; t0 < in.n; t0 += tiling.rows) {
        const int64_t rows = std::min(tiling.rows, in.n - t0);
        const at::Tensor h = hidden_operand.narrow(0, t0, rows);
        at::Tensor tile = workspace.narrow(0, 0, rows * cols).view({rows, cols});
        raw_logits(in, tile, v0, h, w);
        visit(tile, t0, v0, h, w);
      }
    }
  }

  static LinearCeTiling tiling_of(const LinearCeInputs& in, int64_t chunk_budget) {
    return linear_ce_tiling(in.n, in.v, in.d, chunk_budget, in.path);
  }

  static LinearCeChunk make_chunk(const LinearCeInputs& in, at::Tensor& tile, int64_t t0, int64_t v0, double softcap,
                                  double temperature) {
    LinearCeChunk c;
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
  static at::Tensor empty_state(const LinearCeInputs& in) {
    at::Tensor state = at::empty({in.n, core::kLinearCeStateWidth}, in.hidden.options().dtype(at::kFloat));
    state.select(1, core::kLinearCeMax).fill_(-std::numeric_limits<float>::infinity());
    state.select(1, core::kLinearCeSumExp).zero_();
    state.select(1, core::kLinearCeSumShifted).zero_();
    // z_target stays NaN while no tile holds the target (a target outside [0, V)).
    state.select(1, core::kLinearCeTargetLogit).fill_(std::numeric_limits<float>::quiet_NaN());
    state.select(1, core::kLinearCeWeightedSum).zero_();
    return state;
  }

  static at::Tensor stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
                          int64_t ignore_index, double softcap, double temperature, int64_t chunk_budget) {
    constexpr const char* op = "linear_cross_entropy";
    const LinearCeInputs in =
        check_inputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget, op);
    check_targets(in, ignore_index, op);
    at::Tensor state = empty_state(in);
    if (in.n == 0) return state;
    for_each_tile(in, tiling_of(in, chunk_budget),
                  [&](at::Tensor& tile, int64_t t0, int64_t v0, const at::Tensor&, const at::Tensor&) {
                    LinearCeChunk c = make_chunk(in, tile, t0, v0, softcap, temperature);
                    c.state = state.data_ptr<float>() + t0 * core::kLinearCeStateWidth;
                    Backend::forward_chunk(c, tile);
                  });
    return state;
  }

  static void check_per_token(const at::Tensor& t, const LinearCeInputs& in, int64_t width, const char* op,
                              const char* arg) {
    TORCH_CHECK_VALUE(t.device() == in.hidden.device() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                          t.size(0) == in.n && t.size(1) == width,
                      "logitkit.", op, ": ", arg, " must be float32 of shape (", in.n, ", ", width, ") on ",
                      in.hidden.device());
  }

  // The gradients, filled tile by tile in for_each_tile's order. For a tile
  // with g = dL/dx (tokens [t0, t0 + rows), vocabulary [v0, v0 + cols),
  // x = h w^T + b):  dL/dh += g w,  dL/dw += g^T h,  dL/db += column sums of g.
  // The first vocabulary chunk writes grad_hidden and the first token chunk a
  // chunk's grad_weight rows (no zero fill). Accumulation is in fp32: for
  // fp32 inputs in the results themselves; for bf16/fp16 in an fp32
  // grad_hidden (N x D) and an fp32 block of the current chunk's grad_weight
  // rows, cast into grad_weight once the chunk has seen every token. On the
  // native path g enters its two GEMMs rounded to the input dtype (the bias
  // gradient sums the fp32 g).
  struct Grads {
    const LinearCeInputs& in;
    at::Tensor hidden;        // (N, D) fp32
    at::Tensor weight;        // (V, D), the input dtype
    at::Tensor weight_chunk;  // (tiling.cols, D) fp32 accumulator, bf16/fp16 only
    at::Tensor rounded_tile;  // (tiling.rows * tiling.cols) input dtype, native path only
    at::Tensor bias;          // (V) fp32, or (0) without a bias gradient

    Grads(const LinearCeInputs& inputs, const LinearCeTiling& tiling, bool bias_grad) : in(inputs) {
      const auto f32 = in.hidden.options().dtype(at::kFloat);
      hidden = at::empty({in.n, in.d}, f32);
      weight = in.n > 0 ? at::empty({in.v, in.d}, in.weight.options()) : at::zeros({in.v, in.d}, in.weight.options());
      if (in.path != GemmPath::fp32) weight_chunk = at::empty({tiling.cols, in.d}, f32);
      if (in.path == GemmPath::native) rounded_tile = at::empty({tiling.rows * tiling.cols}, in.hidden.options());
      bias = at::zeros({bias_grad ? in.v : 0}, f32);
    }

    // g as its gradient GEMMs take it: rounded once on the native path.
    at::Tensor gemm_operand(const at::Tensor& g) {
      if (in.path != GemmPath::native) return g;
      at::Tensor rounded = rounded_tile.narrow(0, 0, g.numel()).view(g.sizes());
      return rounded.copy_(g);
    }

    // skip: the tile's gradient is negligible (grad_filter_eps); its GEMMs
    // are left out, the first tiles of grad_hidden / a grad_weight chunk
    // then write zeros instead.
    void add(const at::Tensor& g, int64_t t0, int64_t v0, const at::Tensor& h, const at::Tensor& w, bool skip) {
      const int64_t rows = g.size(0), cols = g.size(1);
      at::Tensor dh = hidden.narrow(0, t0, rows);
      const bool in_place = !weight_chunk.defined();
      at::Tensor dw = in_place ? weight.narrow(0, v0, cols) : weight_chunk.narrow(0, 0, cols);
      if (skip) {
        if (v0 == 0) dh.zero_();
        if (t0 == 0) dw.zero_();
      } else {
        const at::Tensor g_operand = gemm_operand(g);
        gemm(in, dh, g_operand, w, v0 != 0);
        gemm(in, dw, g_operand.t(), h, t0 != 0);
      }
      if (!in_place && t0 + rows == in.n) weight.narrow(0, v0, cols).copy_(dw);
      if (bias.numel() > 0) bias.narrow(0, v0, cols).add_(g.sum(0));
    }

    std::tuple<at::Tensor, at::Tensor, at::Tensor> results(at::ScalarType dtype) const {
      return {hidden.to(dtype), weight, bias.to(dtype)};
    }
  };

  // Gradient filtering (Cut Cross-Entropy's filter_eps): a tile's gradient
  // GEMMs are skipped where every |dL/dx| < eps * max_token |a|. Off the
  // target, dL/dz_c = a p_c (cross-entropy without smoothing), so this is
  // p_c < eps for the token with the largest coefficient a, whatever the
  // reduction's scale. Undefined (no filtering) for eps = 0.
  static at::Tensor gradient_filter_threshold(const at::Tensor& coefficients, double eps) {
    if (eps == 0.0) return at::Tensor();
    return coefficients.select(1, core::kLinearCeCoefProb).abs().max().mul(eps);
  }

  // Whether the tile's gradient is below the threshold. The decision is
  // needed on the host (to leave out GEMM launches): on CUDA it costs one
  // device-to-host synchronisation per tile, and only with grad_filter_eps set.
  static bool negligible(const at::Tensor& tile, const at::Tensor& threshold) {
    if (!threshold.defined()) return false;
    return tile.abs().max().lt(threshold).item<bool>();
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
      const at::Tensor& normaliser, const at::Tensor& coefficients, double softcap, double temperature,
      int64_t chunk_budget, bool bias_grad, double grad_filter_eps) {
    constexpr const char* op = "linear_cross_entropy_backward";
    TORCH_CHECK_VALUE(std::isfinite(grad_filter_eps) && grad_filter_eps >= 0.0, "logitkit.", op,
                      ": grad_filter_eps must be a finite number >= 0 (0: exact), got ", grad_filter_eps);
    const LinearCeInputs in =
        check_inputs(hidden, weight, target, bias, class_weight, softcap, temperature, chunk_budget, op);
    check_per_token(normaliser, in, core::kLinearCeNormaliserWidth, op, "normaliser");
    check_per_token(coefficients, in, core::kLinearCeCoefWidth, op, "coefficients");
    const LinearCeTiling tiling = tiling_of(in, chunk_budget);
    Grads grads(in, tiling, bias_grad);
    if (in.n > 0) {
      const at::Tensor norm_c = normaliser.contiguous();
      const at::Tensor coef_c = coefficients.contiguous();
      const at::Tensor filter_threshold = gradient_filter_threshold(coef_c, grad_filter_eps);
      for_each_tile(in, tiling,
                    [&](at::Tensor& tile, int64_t t0, int64_t v0, const at::Tensor& h, const at::Tensor& w) {
                      LinearCeChunk c = make_chunk(in, tile, t0, v0, softcap, temperature);
                      c.normaliser = norm_c.data_ptr<float>() + t0 * core::kLinearCeNormaliserWidth;
                      c.coefficients = coef_c.data_ptr<float>() + t0 * core::kLinearCeCoefWidth;
                      Backend::backward_chunk(c, tile);  // tile <- dL/dx
                      grads.add(tile, t0, v0, h, w, negligible(tile, filter_threshold));
                    });
    }
    return grads.results(hidden.scalar_type());
  }

  static void register_all(torch::Library& m) {
    m.impl("linear_ce_stats", &stats);
    m.impl("linear_ce_backward", &backward);
  }
};

}  // namespace logitkit
