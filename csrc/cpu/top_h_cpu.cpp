// CPU kernels of top_h_mask and sample (rules "hf", "official", "exact";
// definitions in docs/top_h.md, shared math in csrc/core/top_h.h).
// Compiled once per CPU capability (see kernel_tables.h), vectorised with at::vec
// where the work is arithmetic (max, exp, kept weights). Parallel over rows
// with at::parallel_for; each row is handled by one thread with thread-local
// scratch buffers (no allocation per row once they have grown).
//
// Every rule keeps a prefix of the rank order "larger logit first, then lower
// index", so a row's kept set is described by its last kept token c:
//   keep i  <=>  x_i > x_c, or x_i == x_c and i <= c          (RowCut)
// Both ops first find that cut, then
//   * top_h_mask writes the mask from it;
//   * sample makes one vectorised pass computing the kept weights
//     w_i = exp(z_i - m) (z = x / T, m = max z) and the kept mass of every
//     tile, then draws by inverse CDF: the tile where the running mass first
//     exceeds u * total, then the first token inside it whose running sum
//     exceeds that target. A dropped token has weight 0 and a token of zero
//     weight never makes the running sum exceed the target, so neither is
//     ever returned; when rounding runs past the end (u * total rounds up to
//     total, or the in-tile sums round differently from the tile's), the
//     last token of positive weight is returned.
//
// Finding the cut, without sorting the vocabulary:
//   * capped rules: a one-pass threshold filter plus std::nth_element on a
//     buffer of at most ~4K tokens (tuning.h) selects the K largest in
//     expected O(V); only those K are sorted (O(K log K)) and scanned
//     (capped_keep_count).
//   * "exact": the kept set is the largest prefix S_k of the rank order with
//     H(q_k) <= alpha H(p), and H(q_k) is increasing in k (docs/top_h.md). One
//     vectorised pass computes d_i = z_i - m and e_i = exp(d_i) and buckets the
//     tokens by d (kBucketsPerNat buckets per nat; a monotone map of x, so
//     buckets are contiguous in rank order and ties share a bucket), summing
//     (sum e, sum d e) per bucket. H(p) and every H(q) of a prefix of
//     whole buckets follow from those sums (H(q_S) = log E_S - D_S / E_S);
//     the walk over the buckets finds the first bucket whose inclusion
//     breaks the budget. Only that bucket's tokens are gathered, and a
//     quickselect on the predicate resolves the cut inside it: partition the
//     undecided range around its middle rank with nth_element, evaluate H of
//     "decided-kept + upper part + pivot", recurse into the half that holds
//     the cut (expected O(bucket size)).
//
// Special rows (same on every backend):
//   * a row holding a NaN or +inf logit has no defined distribution: its mask
//     is all False and sample returns -1;
//   * a row whose logits are all -inf keeps token 0 only (at-least-one rule,
//     ties broken by the lower index), and sample returns 0;
//   * zero probabilities (exp underflow in fp32, or -inf) are never kept,
//     except the one token kept by the at-least-one rule.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "../core/top_h.h"
#include "../frontend/row_filters.h"
#include "../frontend/top_h.h"
#include "kernel_tables.h"
#include "tuning.h"
#include "vec_tiles.h"

namespace logitkit::cpu::CPU_CAPABILITY {
namespace {

constexpr float kPosInf = std::numeric_limits<float>::infinity();

struct Token {
  float x;  // input logit (fp32)
  int64_t index;
};

// The rank order of docs/top_h.md: larger logit first, then lower vocabulary index.
inline bool ranks_before(const Token& a, const Token& b) { return a.x > b.x || (a.x == b.x && a.index < b.index); }

// The kept set of a row: every token ranked at or before `last` (see the top
// of the file). Not `defined` for a row without a distribution (NaN, +inf).
struct RowCut {
  bool defined;
  Token last;
  // Token i is kept iff x_i >= lower_bound(i): x_c up to index c, the next
  // float above x_c after it.
  float lower_bound_upto() const { return last.x; }
  float lower_bound_after() const { return std::nextafter(last.x, kPosInf); }
};

// "exact": the bucket of a token by d = z - m (kBucketsPerNat, kBuckets:
// tuning.h).
constexpr uint16_t kNoBucket = 0xFFFF;  // zero probability: never a candidate

struct Sums {
  double e = 0.0;      // sum exp(d)
  double d = 0.0;      // sum d exp(d)
  double count = 0.0;  // tokens (of positive weight)
  Sums& operator+=(const Sums& o) {
    e += o.e;
    d += o.d;
    count += o.count;
    return *this;
  }
  double entropy() const { return core::renormalised_entropy(e, d); }
};

struct RowScratch {
  std::vector<float> x;          // the row in fp32, padded with -inf to a multiple of kLanes
  std::vector<Token> tokens;     // selection buffer
  std::vector<uint16_t> bucket;  // "exact": bucket of each token
  std::vector<Sums> buckets;     // "exact": per-bucket sums
  std::vector<float> tile_mass;  // sample: kept mass of each tile
  alignas(64) float a[kTile];    // tile buffers
  alignas(64) float b[kTile];
};

// Loads the row into s.x and returns its max (NaN if it holds a NaN).
template <class scalar_t>
float load_row(const scalar_t* src, int64_t cols, RowScratch& s) {
  float row_max = kNegInf;
  for (int64_t t = 0; t < cols; t += kTile) {
    const int64_t n = std::min(kTile, cols - t);
    const float tile_max = load_tile(src + t, n, 1.0f, kNegInf, s.x.data() + t);  // NaN if the tile holds one
    row_max = std::isnan(tile_max) ? tile_max : std::max(row_max, tile_max);      // a NaN row_max stays NaN
  }
  return row_max;
}

// The k best tokens of the loaded row (rank order: larger x, then lower
// index) into s.tokens[0, k), the k-th best at k - 1 and the better ones
// before it in no order (std::nth_element's partition); fewer only when the
// row holds NaN, which never reaches a threshold. One vectorised pass with a
// running threshold t: a vector whose lanes all lie below t is skipped (its
// tokens are beaten by k buffered ones and can never be selected), the
// others' tokens join the buffer, which nth_element shrinks back to its k
// best when it reaches about 4k (kSelectionBufferFactor k +
// kSelectionBufferSlack), raising t to the k-th best logit. Expected O(V)
// with about one vector comparison per kLanes tokens; no sort, no torch.topk.
// -inf tokens (rows masked by an earlier rule: mostly -inf) are left out of
// that pass and only fill the selection when fewer than k tokens are finite,
// the lowest indices first (their rank order). Shared by the capped Top-H
// rules and the sampler family's top-k / floor.
void select_best_tokens(RowScratch& s, int64_t cols, int64_t k) {
  s.tokens.clear();
  float threshold = kNegInf;  // (finite tokens only: x > -inf too)
  auto shrink = [&] {
    std::nth_element(s.tokens.begin(), s.tokens.begin() + (k - 1), s.tokens.end(), ranks_before);
    s.tokens.resize(k);
  };
  constexpr int kAllBelow = (1 << kLanes) - 1;  // zero_mask() when no lane passes
  for (int64_t i0 = 0; i0 < cols; i0 += kLanes) {
    const FVec v = FVec::loadu(s.x.data() + i0);
    if ((threshold > kNegInf ? v >= FVec(threshold) : v > FVec(kNegInf)).zero_mask() == kAllBelow) continue;
    for (int64_t i = i0; i < std::min(cols, i0 + kLanes); ++i) {
      if (!(s.x[i] >= threshold && s.x[i] > kNegInf)) continue;
      s.tokens.push_back(Token{s.x[i], i});
      if (static_cast<int64_t>(s.tokens.size()) >= kSelectionBufferFactor * k + kSelectionBufferSlack) {
        shrink();
        threshold = s.tokens[k - 1].x;
      }
    }
  }
  for (int64_t i = 0; i < cols && static_cast<int64_t>(s.tokens.size()) < k; ++i) {
    if (s.x[i] == kNegInf) s.tokens.push_back(Token{kNegInf, i});
  }
  if (static_cast<int64_t>(s.tokens.size()) >= k) shrink();
}

// Capped rules: the K best tokens (select_best_tokens), sorted, then the
// prefix scan; returns how many of them are kept (s.tokens[0, kept)).
int64_t capped_keep(RowScratch& s, int64_t cols, const TopHParams& p, float full_lse) {
  const int64_t k = p.k;
  select_best_tokens(s, cols, k);
  std::sort(s.tokens.begin(), s.tokens.begin() + k, ranks_before);
  const float inv_t = p.inv_temperature;
  return core::capped_keep_count([&](int64_t i) { return s.tokens[i].x * inv_t; }, k, p.rule, full_lse, p.alpha);
}

// The capped rules' last kept token.
Token capped_cut(RowScratch& s, int64_t cols, const TopHParams& p, float full_lse) {
  return s.tokens[capped_keep(s, cols, p, full_lse) - 1];
}

// Visits the padded row tile by tile with z = x * inv_t and e = exp(z - m)
// computed (vectorised) into the scratch tile buffers: visit(t, z, e, n).
// Tokens with z below floor_z (top-k's dropped tokens in the sampler family,
// or the candidates' threshold of typical) get z = -inf, e = 0.
template <class Visit>
void for_each_exp_tile(RowScratch& s, float inv_t, float m, Visit visit, float floor_z = kNegInf) {
  const int64_t padded = static_cast<int64_t>(s.x.size());
  const FVec vt(inv_t), vm(m), vfloor(floor_z), neg_inf(kNegInf);
  for (int64_t t = 0; t < padded; t += kTile) {
    const int64_t n = std::min(kTile, padded - t);
    for (int64_t j = 0; j < n; j += kLanes) {
      const FVec scaled = FVec::loadu(s.x.data() + t + j) * vt;
      const FVec z = FVec::blendv(scaled, neg_inf, scaled < vfloor);
      z.store(s.a + j);
      vexp(z - vm).store(s.b + j);
    }
    visit(t, s.a, s.b, n);
  }
}

// "official": log sum exp(z) over the whole row.
float full_log_sum_exp(RowScratch& s, float inv_t, float m) {
  FVec acc(0.0f);
  for_each_exp_tile(s, inv_t, m, [&](int64_t, const float*, const float* e, int64_t n) {
    for (int64_t j = 0; j < n; j += kLanes) acc = acc + FVec::loadu(e + j);
  });
  return m + std::log(vsum(acc));
}

// The bucket walk's predicate: fits(prefix sums) holds for every prefix of
// the rank order up to the cut and fails after it ("exact": H(q) <= alpha
// H(p); the sampler family's top-p: mass < top_p * s, row_filters_cpu.h).
//
// Inside the cut bucket: tokens are the bucket's tokens, above holds the sums
// of everything ranked before them (`before`: the walk's order, the rank
// order of the logits unless typical passes its own). Returns how many of them fit
// (quickselect on the monotone predicate, see the top); when that count c is
// below tokens.size(), tokens[c] is the bucket's token of rank c (the first
// that does not fit).
template <class Fits, class Before = decltype(&ranks_before)>
int64_t keep_in_bucket(std::vector<Token>& tokens, Sums above, Fits fits, float inv_t, float m,
                       Before before = ranks_before) {
  auto begin = tokens.begin();
  int64_t lo = 0, hi = static_cast<int64_t>(tokens.size());
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(begin + lo, begin + mid, begin + hi, before);
    Sums with = above;
    for (int64_t i = lo; i <= mid; ++i) {
      const float d = tokens[i].x * inv_t - m;
      const float e = std::exp(d);
      with += Sums{e, static_cast<double>(d) * e, 1.0};
    }
    if (fits(with)) {
      lo = mid + 1;  // the prefix up to the pivot fits: everything ranked up to it is kept
      above = with;
    } else {
      hi = mid;  // the pivot's prefix is too wide: the cut is above the pivot
    }
  }
  return lo;
}

// The bucket of a token of scaled logit z in the walk over the rank order
// of the logits: d = z - m, kBucketsPerNat buckets per nat below the max.
struct LogitBucket {
  float m;
  int operator()(float z) const { return std::min(kBuckets - 1, static_cast<int>(-(z - m) * kBucketsPerNat)); }
};

// "exact", pass 1 (vectorised exp, scalar scatter): each token's bucket
// (bucket_of(z): the walk's order) and the bucket sums. Returns the sums of
// the whole row (of its tokens with z >= floor_z: see for_each_exp_tile).
template <class BucketOf>
Sums fill_buckets_by(RowScratch& s, float inv_t, float m, float floor_z, BucketOf bucket_of) {
  s.buckets.assign(kBuckets, Sums{});
  s.bucket.resize(s.x.size());
  for_each_exp_tile(
      s, inv_t, m,
      [&](int64_t t, const float* z, const float* e, int64_t n) {
        for (int64_t j = 0; j < n; ++j) {
          if (e[j] > 0.0f) {
            const int b = bucket_of(z[j]);
            s.bucket[t + j] = static_cast<uint16_t>(b);
            s.buckets[b] += Sums{e[j], static_cast<double>(z[j] - m) * e[j], 1.0};
          } else {
            s.bucket[t + j] = kNoBucket;
          }
        }
      },
      floor_z);
  Sums all;
  for (const Sums& b : s.buckets) all += b;
  return all;
}

// The walk over the rank order of the logits (Top-H "exact", top-p).
Sums fill_buckets(RowScratch& s, float inv_t, float m, float floor_z = kNegInf) {
  return fill_buckets_by(s, inv_t, m, floor_z, LogitBucket{m});
}

// The bucket that holds the cut, and the sums of the buckets before it.
struct CutBucket {
  int bucket;
  Sums above;
};

// The walk: whole buckets are kept while H of the prefix fits; the cut is
// inside the first bucket that breaks the budget (or, when everything fits,
// at the end of the last non-empty bucket).
template <class Fits>
CutBucket find_cut_bucket(const RowScratch& s, Fits fits) {
  Sums above, above_last;
  int last_bucket = -1;
  for (int b = 0; b < kBuckets; ++b) {
    if (s.buckets[b].e == 0.0) continue;  // empty
    Sums with = above;
    with += s.buckets[b];
    if (!fits(with)) return CutBucket{b, above};
    above_last = above;
    above = with;
    last_bucket = b;
  }
  return CutBucket{last_bucket, above_last};
}

// Pass 2: gathers the cut bucket's tokens into s.tokens and returns the
// last-ranked token before it (in case none of the bucket fits; index -1 if
// none). A vector of tokens is skipped when all its d lie safely below the
// cut bucket (bucket >= cut + 2 > cut); the others are decided exactly from
// their stored buckets.
Token gather_cut_bucket(RowScratch& s, int64_t cols, int cut_bucket, float inv_t, float m) {
  s.tokens.clear();
  Token before{kPosInf, -1};
  const FVec vt(inv_t), vm(m), skip_below(-static_cast<float>(cut_bucket + 2) / kBucketsPerNat);
  constexpr int kAllBelow = (1 << kLanes) - 1;  // zero_mask() when no lane passes
  for (int64_t i0 = 0; i0 < cols; i0 += kLanes) {
    const FVec d = FVec::loadu(s.x.data() + i0) * vt - vm;
    if ((d > skip_below).zero_mask() == kAllBelow) continue;
    for (int64_t i = i0; i < std::min(cols, i0 + kLanes); ++i) {
      const int b = s.bucket[i];
      if (b == cut_bucket) {
        s.tokens.push_back(Token{s.x[i], i});
      } else if (b < cut_bucket && s.x[i] <= before.x) {
        before = Token{s.x[i], i};  // a lower logit, or an equal one at a higher index: ranks later
      }
    }
  }
  return before;
}

Token exact_cut(RowScratch& s, int64_t cols, const TopHParams& p, float m) {
  const float inv_t = p.inv_temperature;
  const Sums all = fill_buckets(s, inv_t, m);
  const double budget = core::exact_budget(p.alpha, static_cast<float>(all.entropy()));
  auto fits = [budget](const Sums& prefix) { return prefix.entropy() <= budget; };
  const CutBucket cut = find_cut_bucket(s, fits);
  const Token before = gather_cut_bucket(s, cols, cut.bucket, inv_t, m);
  const int64_t kept = keep_in_bucket(s.tokens, cut.above, fits, inv_t, m);
  if (kept == 0 && before.index >= 0) return before;
  // The bucket's kept tokens are tokens[0, kept) (in some order): the cut is
  // the one ranked last. (kept == 0 with nothing before cannot happen: the
  // most probable token always fits, its renormalised entropy being 0.)
  return *std::max_element(s.tokens.begin(), s.tokens.begin() + std::max<int64_t>(kept, 1), ranks_before);
}

RowCut row_cut(RowScratch& s, int64_t cols, const TopHParams& p, float max_x) {
  if (std::isnan(max_x) || max_x == kPosInf) return RowCut{false, {}};
  if (max_x == kNegInf) return RowCut{true, Token{kNegInf, 0}};    // all -inf: token 0 only
  if (!p.truncate) return RowCut{true, Token{kNegInf, cols - 1}};  // every token
  const float m = max_x * p.inv_temperature;                       // max z
  if (p.rule == core::TopHRule::exact) return RowCut{true, exact_cut(s, cols, p, m)};
  // "hf" normalises over the K selected tokens only: no full softmax pass.
  const float lse = p.rule == core::TopHRule::official ? full_log_sum_exp(s, p.inv_temperature, m) : 0.0f;
  return RowCut{true, capped_cut(s, cols, p, lse)};
}

// Runs finish(row, scratch, cut, max_x, p) for every row, in parallel, with
// p the row's parameters (TopHParams::for_row). skip(row, p) is asked first:
// true when it has written the row's output itself, without reading the row.
template <class scalar_t, class Skip, class Finish>
void for_each_row_cut(const Rows& r, const TopHParams& params, Skip skip, Finish finish) {
  const scalar_t* data = r.tensor.data_ptr<scalar_t>();
  at::parallel_for(0, r.rows, 1, [&](int64_t first, int64_t last) {
    auto s = std::make_unique<RowScratch>();
    s->x.resize(round_up_to_lanes(r.cols));
    for (int64_t row = first; row < last; ++row) {
      const TopHParams p = params.for_row(row);
      if (skip(row, p)) continue;
      const float max_x = load_row(data + row * r.row_stride, r.cols, *s);
      finish(row, *s, row_cut(*s, r.cols, p, max_x), max_x, p);
    }
  });
}

template <class scalar_t>
void mask_rows(const Rows& r, const TopHParams& params, bool* out) {
  const int64_t cols = r.cols;
  auto untruncated = [&](int64_t row, const TopHParams& p) {  // Top-H off for the row: every token kept
    if (p.truncate) return false;
    std::fill(out + row * cols, out + (row + 1) * cols, true);
    return true;
  };
  auto write = [&](int64_t row, const RowScratch& s, const RowCut& cut, float, const TopHParams&) {
    bool* o = out + row * cols;
    if (!cut.defined) {
      std::fill(o, o + cols, false);
      return;
    }
    const int64_t split = std::min(cols, cut.last.index + 1);
    const float upto = cut.lower_bound_upto(), after = cut.lower_bound_after();
    for (int64_t i = 0; i < split; ++i) o[i] = s.x[i] >= upto;
    for (int64_t i = split; i < cols; ++i) o[i] = s.x[i] >= after;
  };
  for_each_row_cut<scalar_t>(r, params, untruncated, write);
}

// The kept weights exp(x_i * inv_t - m) of the tile [t, t + n) of the padded
// row into w (0 for dropped tokens); returns their sum.
float kept_weights(const RowScratch& s, int64_t t, int64_t n, const RowCut& cut, float inv_t, float m, float* w) {
  const FVec vt(inv_t), vm(m), zero(0.0f);
  const FVec upto(cut.lower_bound_upto()), after(cut.lower_bound_after());
  const int64_t c = cut.last.index;
  FVec acc(0.0f);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t i = t + j;
    const FVec x = FVec::loadu(s.x.data() + i);
    FVec bound = upto;
    if (i > c) {
      bound = after;
    } else if (i + kLanes - 1 > c) {  // the one vector holding the cut index: per-lane bounds
      alignas(64) float lanes[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] = i + l <= c ? cut.lower_bound_upto() : cut.lower_bound_after();
      bound = FVec::loadu(lanes);
    }
    const FVec e = FVec::blendv(zero, vexp(x * vt - vm), x >= bound);
    e.store(w + j);
    acc = acc + e;
  }
  return vsum(acc);
}

// Inverse-CDF draw of the token at `target` from a row's kept weights, given
// the kept mass of every tile in s.tile_mass: the tile where the running mass
// first exceeds the target, whose weights fill_tile(begin, n) recomputes into
// s.a, then the token inside it. If rounding runs past the end (the tile
// masses add up to less than the target), the last positive weight of the
// last tile of positive mass is taken (target +inf). Shared by Top-H sampling
// and the sampler family's filter_sample (row_filters_cpu.h).
template <class FillTile>
int64_t draw_from_tiles(RowScratch& s, float target, FillTile fill_tile) {
  const int64_t padded = static_cast<int64_t>(s.x.size());
  const int64_t tiles = static_cast<int64_t>(s.tile_mass.size());
  float before = 0.0f, in_tile_target = kPosInf;
  int64_t tile = -1;
  for (int64_t t = 0; t < tiles; ++t) {
    if (!(s.tile_mass[t] > 0.0f)) continue;
    tile = t;
    if (before + s.tile_mass[t] > target) {
      in_tile_target = target;
      break;
    }
    before += s.tile_mass[t];
  }
  const int64_t begin = tile * kTile, n = std::min(kTile, padded - begin);
  fill_tile(begin, n);
  float running = before;
  int64_t last_positive = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (!(s.a[j] > 0.0f)) continue;
    running += s.a[j];
    last_positive = j;
    if (running > in_tile_target) break;
  }
  return begin + last_positive;
}

// Inverse-CDF draw at u in [0, 1) from the kept weights (see the top).
int64_t sample_row(RowScratch& s, const RowCut& cut, float inv_t, float m, float u) {
  const int64_t padded = static_cast<int64_t>(s.x.size());
  const int64_t tiles = (padded + kTile - 1) / kTile;
  s.tile_mass.resize(tiles);
  float total = 0.0f;
  for (int64_t t = 0; t < tiles; ++t) {
    s.tile_mass[t] = kept_weights(s, t * kTile, std::min(kTile, padded - t * kTile), cut, inv_t, m, s.a);
    total += s.tile_mass[t];
  }
  return draw_from_tiles(s, u * total,
                         [&](int64_t begin, int64_t n) { kept_weights(s, begin, n, cut, inv_t, m, s.a); });
}

template <class scalar_t>
void sample_rows(const Rows& r, const TopHParams& params, const float* uniform, int64_t* out) {
  auto never = [](int64_t, const TopHParams&) { return false; };
  auto draw = [&](int64_t row, RowScratch& s, const RowCut& cut, float max_x, const TopHParams& p) {
    if (!cut.defined) {
      out[row] = -1;
    } else if (max_x == kNegInf) {
      out[row] = 0;  // all -inf: the at-least-one token
    } else {
      out[row] = sample_row(s, cut, p.inv_temperature, max_x * p.inv_temperature, uniform[row]);
    }
  };
  for_each_row_cut<scalar_t>(r, params, never, draw);
}

#include "row_filters_cpu.h"

}  // namespace

const PerDtype<TopHKernels> top_h_kernels = PerDtype<TopHKernels>::build([]<class scalar_t>() {
  return TopHKernels<scalar_t>{&mask_rows<scalar_t>, &sample_rows<scalar_t>, &filter_mask_rows<scalar_t>,
                               &filter_logits_rows<scalar_t>, &filter_sample_rows<scalar_t>};
});

}  // namespace logitkit::cpu::CPU_CAPABILITY
