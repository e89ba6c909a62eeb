// CPU kernel of top_h_mask (rules "hf", "official", "exact"; definitions in
// shared/notes/top-h.md, shared math in csrc/core/top_h.h). Parallel over rows
// with at::parallel_for; each row is handled by one thread with thread-local
// scratch buffers. Compiled once with default flags (the work is dominated by
// selection, not by vectorisable arithmetic).
//
// No full sort of the vocabulary:
//   * capped rules: a one-pass threshold filter plus std::nth_element on a
//     buffer of at most ~4K tokens selects the K largest (order "larger logit
//     first, then lower index") in expected O(V); only those K are sorted
//     (O(K log K)) and scanned (capped_keep_count).
//   * "exact": the kept set is the largest prefix S_k of the sorted order with
//     H(q_k) <= alpha H(p), and H(q_k) is increasing in k (note). A
//     quickselect on that predicate finds k: partition the undecided range
//     around its middle rank with nth_element, evaluate H of "decided-kept +
//     upper part + pivot" (one sum over the upper part), and recurse into the
//     half that holds the cut. Each step costs O(size of the range), which
//     halves, so the whole search is expected O(V) (about 2 V comparisons
//     plus V exps), without sorting anything.
//
// Special rows (same on every backend):
//   * a row holding a NaN or +inf logit has no defined distribution: its mask
//     is all False (top_h then returns filter_value for the whole row);
//   * a row whose logits are all -inf keeps token 0 only (at-least-one rule,
//     ties broken by the lower index);
//   * zero probabilities (exp underflow in fp32, or -inf) are never kept,
//     except the one token kept by the at-least-one rule.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/top_h_frontend.h"
#include "../core/softmax_state.h"
#include "../core/top_h.h"

namespace logitkit::cpu {
namespace {

struct Token {
  float x;  // input logit (fp32)
  int64_t index;
};

// The rank order of the note: larger logit first, then lower vocabulary index.
inline bool ranks_before(const Token& a, const Token& b) { return a.x > b.x || (a.x == b.x && a.index < b.index); }

struct RowScratch {
  std::vector<float> x;  // the row in fp32
  std::vector<float> z;  // x / T
  std::vector<Token> tokens;
};

// Capped rules: the K best tokens, sorted, then the prefix scan. One pass
// with a running threshold t: a token below t is beaten by K buffered tokens
// and can never be selected; when the buffer reaches 4K, nth_element keeps
// its K best and raises t to the K-th best logit. Expected O(V) with about
// one comparison per token.
void capped_row(RowScratch& s, int64_t cols, const TopHParams& p, float full_lse, bool* out) {
  const int64_t k = p.k;
  s.tokens.clear();
  float threshold = -std::numeric_limits<float>::infinity();
  auto shrink = [&] {
    std::nth_element(s.tokens.begin(), s.tokens.begin() + (k - 1), s.tokens.end(), ranks_before);
    threshold = s.tokens[k - 1].x;
    s.tokens.resize(k);
  };
  for (int64_t i = 0; i < cols; ++i) {
    if (s.x[i] >= threshold) {
      s.tokens.push_back(Token{s.x[i], i});
      if (static_cast<int64_t>(s.tokens.size()) >= 4 * k + 64) shrink();
    }
  }
  auto first = s.tokens.begin();
  if (static_cast<int64_t>(s.tokens.size()) > k) std::nth_element(first, first + k, s.tokens.end(), ranks_before);
  std::sort(first, first + k, ranks_before);
  const float inv_t = p.inv_temperature;
  const int64_t kept = core::capped_keep_count([&](int64_t i) { return s.tokens[i].x * inv_t; }, k, p.rule,
                                               full_lse, p.alpha);
  for (int64_t i = 0; i < kept; ++i) out[s.tokens[i].index] = true;
}

// "exact": quickselect on the monotone entropy predicate (see top of file).
// Sums are in double (e_i and d_i themselves are fp32, as on CUDA).
void exact_row(RowScratch& s, int64_t cols, const TopHParams& p, const core::SoftmaxState& st, bool* out) {
  const float m = st.max;
  const double budget = core::exact_budget(p.alpha, core::entropy(st));
  // Only tokens of non-zero probability are candidates.
  s.tokens.clear();
  for (int64_t i = 0; i < cols; ++i) {
    if (expf(s.z[i] - m) > 0.0f) s.tokens.push_back(Token{s.x[i], i});
  }
  const float inv_t = p.inv_temperature;
  auto add = [&](const Token& t, double& e_sum, double& d_sum) {
    const float d = t.x * inv_t - m;
    const float e = expf(d);
    e_sum += e;
    d_sum += static_cast<double>(d) * e;
  };
  // tokens[0, lo) are kept for sure (and ranked before everything else),
  // tokens[hi, n) dropped for sure; (e_kept, d_kept) are the sums over [0, lo).
  auto begin = s.tokens.begin();
  int64_t lo = 0, hi = static_cast<int64_t>(s.tokens.size());
  double e_kept = 0.0, d_kept = 0.0;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(begin + lo, begin + mid, begin + hi, ranks_before);
    double e_sum = e_kept, d_sum = d_kept;
    for (int64_t i = lo; i <= mid; ++i) add(s.tokens[i], e_sum, d_sum);
    if (core::renormalised_entropy(e_sum, d_sum) <= budget) {
      lo = mid + 1;  // S up to the pivot fits: everything ranked up to it is kept
      e_kept = e_sum;
      d_kept = d_sum;
    } else {
      hi = mid;  // the pivot's prefix is too wide: the cut is above the pivot
    }
  }
  // The most probable token always fits (its renormalised entropy is 0 and
  // the budget is >= 0), so lo >= 1 here.
  for (int64_t i = 0; i < lo; ++i) out[s.tokens[i].index] = true;
}

template <class scalar_t>
void top_h_rows(const Rows& r, const TopHParams& p, bool* out) {
  const int64_t cols = r.cols;
  const scalar_t* data = r.tensor.data_ptr<scalar_t>();
  at::parallel_for(0, r.rows, 1, [&](int64_t first, int64_t last) {
    RowScratch s;
    s.x.resize(cols);
    s.z.resize(cols);
    for (int64_t row = first; row < last; ++row) {
      const scalar_t* src = data + row * r.row_stride;
      bool* o = out + row * cols;
      std::fill(o, o + cols, false);
      bool undefined = false;
      float row_max = core::neg_infinity();
      for (int64_t i = 0; i < cols; ++i) {
        const float x = static_cast<float>(src[i]);
        s.x[i] = x;
        s.z[i] = x * p.inv_temperature;
        undefined = undefined || std::isnan(x) || x == std::numeric_limits<float>::infinity();
        row_max = std::max(row_max, x);
      }
      if (undefined) continue;  // all False
      if (row_max == core::neg_infinity()) {
        o[0] = true;  // all -inf: the at-least-one token is the first one
        continue;
      }
      // The softmax state (full-vocabulary normaliser and entropy): not
      // needed by "hf", whose normaliser is over the K selected tokens.
      core::SoftmaxState st = core::empty_state();
      if (p.rule != core::TopHRule::hf) {
        for (int64_t i = 0; i < cols; i += 4096) {
          core::accumulate(st, s.z.data() + i, static_cast<int>(std::min<int64_t>(4096, cols - i)));
        }
      }
      if (p.rule == core::TopHRule::exact) {
        exact_row(s, cols, p, st, o);
      } else {
        capped_row(s, cols, p, core::log_sum_exp(st), o);
      }
    }
  });
}

struct CpuTopHBackend {
  template <class scalar_t>
  static void top_h_mask(const Rows& r, const TopHParams& p, bool* out) {
    top_h_rows<scalar_t>(r, p, out);
  }
};

}  // namespace
}  // namespace logitkit::cpu

TORCH_LIBRARY_IMPL(logitkit, CPU, m) { logitkit::TopHFrontend<logitkit::cpu::CpuTopHBackend>::register_all(m); }
