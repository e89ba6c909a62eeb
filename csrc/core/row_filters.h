// The "row-statistics" truncation rules of the sampler family (docs/sampling.md),
// shared by the CPU and CUDA kernels: each rule keeps the tokens whose scaled
// logit z = x / T reaches a threshold that follows from a few mergeable sums
// over the row, so a kernel needs one pass for the statistics and one pass to
// write the mask or draw.
//
// top-k comes first (transformers' order): the k-th largest x gives z_k, and
// every statistic below is over the survivors z >= z_k only (the others'
// "renormalised" distribution); the threshold is then at least z_k.
// top-p comes next: its threshold z_p is found by a radix / bucket walk over
// the survivors (not from the sums below; TopPCut), and it hands the mass K
// and shifted sum D of its own kept set to epsilon and eta, which then see the
// renormalised top-p survivors (s -> K, H -> log K - D / K), as in
// transformers' chain. min-p is a ratio to p_max, which renormalisation does
// not change; p-less and top-n-sigma stay on the top-k survivors
// (docs/sampling.md).
// Per row, over the survivors z (m = max z, e_i = exp(z_i - m), s = sum e_i, p_i = e_i / s):
//   min-p        p_i >= min_p * p_max          <=>  z_i >= m + log(min_p)
//   p-less       p_i >= sum_j p_j^2            <=>  z_i >= m + log(s2 / s),   s2 = sum e_j^2
//   epsilon      p_i >= eps                    <=>  z_i >= m + log(s) + log(eps)
//   eta          p_i >= min(eta, sqrt(eta) e^-H) <=> z_i >= m + log(s) + log(min(...))
//   top-n-sigma  z_i >= m - n * sigma,  sigma = population std of the finite z
// with H = log s - b / s (SoftmaxState). The kept set is the intersection of
// the enabled rules (the largest threshold), never empty: the threshold is at
// most m, and at most `floor` (the k-th largest z, for min_tokens_to_keep = k).
//
// typical (Meister et al., locally typical sampling) comes last and acts on
// the kept set of all the rules above renormalised (its "candidates",
// z >= threshold, of mass K and shifted sum D): with q_i = e_i / K and
// H(q) = log K - D / K, a token's distance |-log q_i - H(q)| is
//   |z_i - c|,  c = m + D / K   (the expected z under q),
// and typical keeps the candidates of distance <= d*, where d* is the
// distance of the first token, in order of increasing distance, at which the
// running mass reaches typical_p * K and the running count min_tokens_to_keep
// (transformers' TypicalLogitsWarper; ties of d* kept). That is an interval
// of z around c, not a prefix of the probability ranking: FilterCut carries
// it as (center, radius), found by a selection keyed on the distance (CPU:
// apply_typical, CUDA: typical_passes). It keeps at least one candidate, so
// the kept set stays non-empty (the most probable token may be dropped, as
// in transformers).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "softmax_state.h"

namespace logitkit::core {

// The per-row parameter table (float32, one row of kFilterParamCount per
// logits row) written by python/logitkit/sampling.py. A disabled rule has its
// "off" value: min_p 0, top_n_sigma +inf, p_less 0, epsilon 0, eta 0,
// top_k 0, top_p 1, typical_p 1; keep_count 1 (min_tokens_to_keep).
enum FilterParam : int {
  kTemperature = 0,  // T > 0; 0 (or a T whose 1 / T overflows): greedy
  kMinP = 1,
  kTopNSigma = 2,
  kPLess = 3,
  kEpsilon = 4,
  kEta = 5,
  kTopK = 6,        // k = max(top_k, min_tokens_to_keep) < V; 0: off (the kernels find the k-th largest x)
  kTopP = 7,        // in (0, 1]; 1: off
  kTypicalP = 8,    // in (0, 1]; 1: off
  kKeepCount = 9,   // min_tokens_to_keep (>= 1): the floor of every rule, and typical's count
  kTopHAlpha = 10,  // Top-H "hf" as the chain's first rule (fused; docs/sampling.md): alpha in (0, 1]; 0: off
  kTopHCount = 11,  // its K = min(cap, V) (1 <= K < V)
  kFilterParamCount = 12,
};

// The extended row state: the softmax state of z plus what the thresholds
// need. Mergeable like SoftmaxState (the same rescaling for s2, with the
// factor squared), and the finite z's count / mean / M2 merge as Chan et al.
// (1979)'s pairwise variance update.
struct FilterState {
  SoftmaxState sm;
  float sum_exp2;  // s2 = sum exp(2 (z - m))
  float count;     // finite z
  float mean;      // their mean
  float m2;        // sum (z - mean)^2 over them
};

LK_HOST_DEVICE FilterState empty_filter_state() { return FilterState{empty_state(), 0.0f, 0.0f, 0.0f, 0.0f}; }

LK_HOST_DEVICE FilterState merge(const FilterState& a, const FilterState& b) {
  FilterState r;
  r.sm = merge(a.sm, b.sm);
  const float fa = rescale_factor(a.sm.max, r.sm.max), fb = rescale_factor(b.sm.max, r.sm.max);
  r.sum_exp2 = a.sum_exp2 * fa * fa + b.sum_exp2 * fb * fb;
  r.count = a.count + b.count;
  if (r.count == 0.0f) {
    r.mean = r.m2 = 0.0f;
    return r;
  }
  const float delta = b.mean - a.mean, wb = b.count / r.count;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  return r;
}

// Adds one scaled logit (online: the softmax state's update, s2 rescaled by
// the same factor squared, Welford's update of the finite z's mean and M2).
LK_HOST_DEVICE void accumulate(FilterState& st, float z) {
  const float old_max = st.sm.max;
  accumulate(st.sm, &z, 1);
  if (!(z > neg_infinity() && z < pos_infinity())) return;  // -inf adds nothing; NaN/+inf: undefined row
  const float f = rescale_factor(old_max, st.sm.max);
  const float e = exp_of(z - st.sm.max);
  st.sum_exp2 = st.sum_exp2 * f * f + e * e;
  st.count += 1.0f;
  const float delta = z - st.mean;
  st.mean += delta / st.count;
  st.m2 += delta * (z - st.mean);
}

// The per-row rule parameters, decoded from the table.
struct FilterParams {
  bool greedy;  // the T -> 0 limit: every token equal to the max, uniformly
  float inv_temperature;
  float min_p, top_n_sigma, p_less, epsilon, eta;
  float top_k;        // top-k's k (0: off)
  float top_p;        // 1: off
  float typical_p;    // 1: off
  float keep_count;   // min_tokens_to_keep
  float top_h_alpha;  // Top-H "hf" first (uses_top_h); 0: off
  float top_h_count;  // its K
  // Filled by the kernels from the counts (with_rank_cuts): z of the top_k-th
  // largest logit (the statistics' survivors are z >= top_k_z; -inf: top-k
  // off) and the min_tokens_to_keep-th largest logit x (+inf: no floor).
  float top_k_z;
  float keep_floor;
};

LK_HOST_DEVICE FilterParams decode_filter_params(const float* row) {
  FilterParams p;
  const float t = row[kTemperature];
  const float inv_t = 1.0f / t;
  p.greedy = !(t > 0.0f) || !(inv_t < pos_infinity());
  p.inv_temperature = p.greedy ? 1.0f : inv_t;
  p.min_p = row[kMinP];
  p.top_n_sigma = row[kTopNSigma];
  p.p_less = row[kPLess];
  p.epsilon = row[kEpsilon];
  p.eta = row[kEta];
  p.top_k = row[kTopK];
  p.top_p = row[kTopP];
  p.typical_p = row[kTypicalP];
  p.keep_count = row[kKeepCount];
  p.top_h_alpha = row[kTopHAlpha];
  p.top_h_count = row[kTopHCount];
  p.top_k_z = neg_infinity();
  p.keep_floor = pos_infinity();
  return p;
}

// The ranks whose logits a row needs (a kernel selects the k-th largest x
// for each): top-k's k, and the floor's k = min_tokens_to_keep (clamped to
// the row); 0 where none is needed (top-k off; min_tokens_to_keep 1, which
// the row max satisfies). A greedy row needs neither (it keeps the max).
struct RankCounts {
  int64_t top_k;
  int64_t floor;
};

LK_HOST_DEVICE RankCounts rank_counts(const FilterParams& p, int64_t cols) {
  if (p.greedy) return RankCounts{0, 0};
  const int64_t top_k = p.top_k >= 1.0f ? static_cast<int64_t>(p.top_k) : 0;
  const int64_t keep = p.keep_count > 1.0f ? static_cast<int64_t>(p.keep_count) : 0;
  return RankCounts{top_k < cols ? top_k : 0, keep < cols ? keep : (keep > 0 ? cols : 0)};
}

// Whether a row runs Top-H's "hf" rule (docs/top_h.md) as the chain's first
// rule, before top-k: a non-greedy row (a greedy row skips Top-H, as it skips
// every rule) with alpha in (0, 1] and 1 <= K < V (the frontend writes
// K = min(cap, V) and keeps V <= cap on the unfused route; a CUDA table is not
// checked on the host, and a row with other values, or K above
// kFusedTopHMaxCount, skips Top-H). The rules after it then see only its kept
// tokens (the others count as -inf), as on the unfused route (top_h_mask and
// a masked copy).
constexpr int64_t kFusedTopHMaxCount = 256;  // the largest K (CUDA: the gathered survivors)

LK_HOST_DEVICE bool uses_top_h(const FilterParams& p, int64_t cols) {
  return !p.greedy && p.top_h_alpha > 0.0f && p.top_h_alpha <= 1.0f && p.top_h_count >= 1.0f &&
         p.top_h_count <= static_cast<float>(kFusedTopHMaxCount) && p.top_h_count < static_cast<float>(cols);
}

// Whether Top-H's kept set holds a token of orderable key `key` at `index`,
// given its last kept token (rank order of docs/top_h.md: larger logit, then
// lower index): a larger key, or the same key at an index not after it.
LK_HOST_DEVICE bool top_h_keeps(uint32_t key, int64_t index, uint32_t last_key, int64_t last_index) {
  return key > last_key || (key == last_key && index <= last_index);
}

// The params with the selected logits filled in (x of the k-th largest; the
// off values where a count is 0).
LK_HOST_DEVICE FilterParams with_rank_cuts(FilterParams p, float top_k_x, float floor_x) {
  p.top_k_z = scaled_logit(top_k_x, p.inv_temperature);
  p.keep_floor = floor_x;
  return p;
}

// Whether a row runs the top-p walk: a defined, non-greedy row (max z finite)
// with top_p < 1 (NaN counts as off; Python rejects it).
LK_HOST_DEVICE bool uses_top_p(const FilterParams& p, float max_z) {
  return p.top_p < 1.0f && !p.greedy && max_z > neg_infinity() && max_z < pos_infinity();
}

// Whether top-p's cut may be left to the pass after its selection (the CUDA
// kernels' crossing gather): no later rule reads top-p's kept sums (typical's
// candidates, epsilon's and eta's renormalised K and H; filter_cut), so
// filter_cut without top-p's threshold, t0, and the keep floor f give the
// final threshold once top-p's, t_p, is known: min(f, max(A, t_p)) clamped to
// m equals max(t0, min(f, t_p)) for t_p <= m (A: the other rules' largest).
LK_HOST_DEVICE bool top_p_cut_may_wait(const FilterParams& p) {
  return p.typical_p >= 1.0f && !(p.epsilon > 0.0f) && !(p.eta > 0.0f);
}

// top-p (transformers' TopPLogitsWarper) on the tokens ranked by z, with
// weights e = exp(z - m) over the top-k survivors of total s: a token is kept
// iff the mass of the tokens ranked strictly before it is < top_p * s. The
// kept set is a prefix of the ranking, ending at the first token whose
// running mass (itself included) reaches the limit, plus the ties of that
// token. A walk over ranked prefixes stops at the first prefix for which
// top_p_reached() holds; that prefix's last token is the last one kept.
template <class T>
LK_HOST_DEVICE T top_p_mass_limit(float top_p, T total_mass) {
  return static_cast<T>(top_p) * total_mass;
}
template <class T>
LK_HOST_DEVICE bool top_p_reached(T prefix_mass, T limit) {
  return prefix_mass >= limit;
}

// What the top-p walk found: keep z >= threshold; the kept set's
// K = sum e and D = sum (z - m) e (relative to the row max m). Without
// top-p: threshold -inf and K, D of all the survivors.
struct TopPCut {
  float threshold;
  float mass;
  float shifted;
};

LK_HOST_DEVICE TopPCut no_top_p_cut(const FilterState& st) {
  return TopPCut{neg_infinity(), st.sm.sum_exp, st.sm.sum_shifted};
}

// What a row's kernel needs after pass 1: keep z >= threshold (z = x * inv_t),
// weights exp(z - max). `defined` is false for a row holding NaN or +inf (no
// distribution: nothing kept, no token); an all -inf row is defined with
// max = -inf and keeps token 0 only (handled by the kernels).
struct FilterCut {
  bool defined;
  float max;        // m
  float threshold;  // keep z >= threshold (<= m)
  float log_sum;    // log s over the whole row (log-probs under the scaled distribution)
  // typical: keep also only |z - center| <= radius (typical_distance);
  // without typical, center 0 and radius +inf (every z passes).
  float center;
  float radius;
};

LK_HOST_DEVICE float max_of(float a, float b) { return a > b ? a : b; }

// Whether a rule other than top-k and top-p takes part in filter_cut's
// threshold (min-p, p-less, epsilon, eta, top-n-sigma), so that the threshold
// may lie above top-k's and top-p's (typical_candidates_known then fails).
LK_HOST_DEVICE bool has_threshold_rule(const FilterParams& p) {
  return p.min_p > 0.0f || p.p_less != 0.0f || p.epsilon > 0.0f || p.eta > 0.0f || p.top_n_sigma < pos_infinity();
}

// The combined threshold of the enabled rules (the largest), clamped to the
// row max and to the keep floor. Greedy rows keep the max only (ties: all).
// epsilon and eta see the renormalised top-p survivors: log K for log s, and
// H = log K - D / K (top_p.mass = s, top_p.shifted = b without top-p).
LK_HOST_DEVICE FilterCut filter_cut(const FilterState& st, const FilterParams& p, const TopPCut& top_p) {
  const float m = st.sm.max;
  FilterCut c{true, m, m, 0.0f, 0.0f, pos_infinity()};
  if (m != m || m == pos_infinity()) {
    c.defined = false;
    return c;
  }
  if (m == neg_infinity()) return c;
  const float log_s = log_of(st.sm.sum_exp);
  c.log_sum = log_s;
  if (p.greedy) return c;
  float t = max_of(p.top_k_z, top_p.threshold);  // -inf when top-k / top-p are off
  const bool renormalised = top_p.threshold > neg_infinity();
  const float log_kept = renormalised ? log_of(top_p.mass) : log_s;
  // (the rules of has_threshold_rule)
  if (p.min_p > 0.0f) t = max_of(t, m + log_of(p.min_p));
  if (p.p_less != 0.0f) t = max_of(t, m + log_of(st.sum_exp2) - log_s);
  if (p.epsilon > 0.0f) t = max_of(t, m + log_kept + log_of(p.epsilon));
  if (p.eta > 0.0f) {
    const float h = renormalised ? log_kept - top_p.shifted / top_p.mass : entropy(st.sm);
    const float eta = fminf(p.eta, sqrtf(p.eta) * exp_of(-h));
    t = max_of(t, m + log_kept + log_of(eta));
  }
  if (p.top_n_sigma < pos_infinity() && st.count > 0.0f) {
    const float sigma = sqrtf(st.m2 / st.count);  // population std (docs/sampling.md)
    t = max_of(t, m - p.top_n_sigma * sigma);
  }
  const float floor_z = scaled_logit(p.keep_floor, p.inv_temperature);
  if (t > floor_z) t = floor_z;  // at least min_tokens_to_keep tokens
  c.threshold = t > m ? m : t;
  return c;
}

// Whether the row's cut needs pass 1's sums (sum exp, shifted sum, moments):
// top-p, typical, p-less, epsilon, eta and top-n-sigma do. Temperature, top-k,
// min-p and the keep floor need only the max z, which is the row's max x
// scaled (x -> x * inv_t rounds monotonically, and top-k keeps the max); a
// greedy row is left to pass 1.
LK_HOST_DEVICE bool needs_row_sums(const FilterParams& p) {
  return p.greedy || p.top_p < 1.0f || p.typical_p < 1.0f || p.p_less != 0.0f || p.epsilon > 0.0f || p.eta > 0.0f ||
         p.top_n_sigma < pos_infinity();
}

// A scaled logit as pass 1 sees it: top-k's dropped tokens (z < z_k) count as
// masked (-inf); NaN and +inf pass unchanged, so such a row stays undefined.
LK_HOST_DEVICE float top_k_survivor(float z, const FilterParams& p) { return z < p.top_k_z ? neg_infinity() : z; }

// typical's distance of a scaled logit z from the center c: |z - c| =
// |-log q - H(q)| (see the top). z is core::scaled_logit's rounded product,
// so the selection and every keep test compute the same float.
LK_HOST_DEVICE float typical_distance(float z, float center) {
  const float d = z - center;
  return d < 0.0f ? -d : d;
}

// Whether a token is kept, and its weight exp(z - m) (0 when dropped).
LK_HOST_DEVICE float kept_weight(const FilterCut& c, float x, float inv_t) {
  const float z = scaled_logit(x, inv_t);
  return z >= c.threshold && typical_distance(z, c.center) <= c.radius ? exp_of(z - c.max) : 0.0f;
}

// Whether a defined, non-greedy row runs typical (after filter_cut).
LK_HOST_DEVICE bool uses_typical(const FilterParams& p, const FilterCut& c) {
  return p.typical_p < 1.0f && !p.greedy && c.defined && c.max > neg_infinity();
}

// Whether the candidates' sums (K, D over z >= c.threshold) are already
// known: the top-p walk's kept sums, or pass 1's sums over the top-k
// survivors; otherwise (min-p, epsilon, ... or the floor moved the
// threshold) typical needs a pass of its own over the row to sum them.
LK_HOST_DEVICE bool typical_candidates_known(const FilterParams& p, const TopPCut& top_p, const FilterCut& c) {
  return c.threshold == max_of(p.top_k_z, top_p.threshold);
}

// typical's selection over the candidates ranked by increasing distance: a
// prefix of that order "fits" while its mass is below typical_p * K or it
// holds fewer than min_tokens_to_keep tokens; the first token at which it
// stops fitting sets d*, and it is kept (as top-p's crossing token).
struct TypicalLimit {
  float mass;   // typical_p * K
  float count;  // min_tokens_to_keep
};

LK_HOST_DEVICE TypicalLimit typical_limit(const FilterParams& p, float candidate_mass) {
  return TypicalLimit{p.typical_p * candidate_mass, p.keep_count};
}

template <class T>
LK_HOST_DEVICE bool typical_reached(T prefix_mass, T prefix_count, const TypicalLimit& limit) {
  return prefix_mass >= static_cast<T>(limit.mass) && prefix_count >= static_cast<T>(limit.count);
}

// The center c = m + D / K of the candidates (see the top).
LK_HOST_DEVICE float typical_center(float m, float candidate_mass, float candidate_shifted) {
  return m + candidate_shifted / candidate_mass;
}

// The processed distribution's outputs from its kept sums (relative to m):
// K = sum kept e, D = sum kept (z - m) e; log q_tok = (z_tok - m) - log K,
// H(q) = log K - D / K.
struct KeptSums {
  float mass;     // K
  float shifted;  // D
  float count;
};

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011): a counter-based generator, one 128-bit block per (key,
// counter). The uniform of a row is the first 32-bit output of
// Philox(key = seed, counter = (offset, 0)), as (bits >> 8) * 2^-24 in [0, 1):
// the same number on every backend for the same seed and offset.
struct Philox4x32 {
  uint32_t v[4];
};

LK_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
}

LK_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kMul0, ctr.v[0], hi0, lo0);
    mul_hi_lo(kMul1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

LK_HOST_DEVICE float philox_uniform(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const Philox4x32 ctr{{static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), 0u, 0u}};
  const Philox4x32 out = philox4x32_10(ctr, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return static_cast<float>(out.v[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace logitkit::core
