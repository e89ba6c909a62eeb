// CUDA kernels of top_h_mask and sample (rules "hf", "official", "exact";
// definitions in docs/top_h.md, shared math in csrc/core/top_h.h). Host
// launch and registration: top_h.cu. Like every kernel source, also built for
// the CPU through the SIMT emulator (csrc/simt/simt.h).
//
// Design: one block per row, no sort of the vocabulary. Tokens are compared by
// 32-bit orderable keys of their logit (core::orderable_key), ties broken by
// the lower index. The cut is found by a radix selection over the key bits in
// three digits (11 + 11 + 10 bits): each digit pass builds a 2048-bin shared
// histogram of the tokens whose key matches the digits fixed so far, then one
// thread walks the bins from the largest key down, accumulating the rule's
// statistics, and fixes the bin where the rule's predicate first fails.
//   * capped rules: the predicate is "more than K tokens" (select the top K);
//     bins hold counts. The K selected keys are then gathered into shared
//     memory, sorted there (block_bitonic_sort, K <= kMaxCudaCap) and scanned
//     (core::capped_keep_count), which fixes the final cut.
//   * "exact": the predicate is H(q_S) > alpha H(p), with
//     H(q_S) = log E_S - D_S / E_S (core::renormalised_entropy); bins hold
//     (count, sum e, sum d e) with e = exp(z - m), d = z - m, m the row max
//     of z (the first digit's bins are built in pass 1, before m is known,
//     and rescaled to m; see below). H(q_S) increases with S (docs/top_h.md),
//     so the first failing bin holds the cut.
// "exact" stops early once the cut bin holds a single token (that token is
// then dropped); the capped rules always resolve all digits, and gather the
// selected keys during the last digit pass: keys above the candidate range
// directly, keys inside it from the last histogram (whose bins are single key
// values). At the last digit the cut bin is a single key value (a tie
// group): the rule says how many of it to keep (j), and the write pass keeps
// the j lowest indices of the group by an ordered block-wide count.
//
// The selection (capped, exact, or none for plain sampling) is a template
// parameter of the kernels (Selection); the host launcher dispatches on the
// rule. select_cut runs these phases:
//   softmax_state_and_first_digit   pass 1
//   rescale_first_digit_bins        "exact": pass-1 bins relative to m
//   digit_pass + walk               per digit: histogram, then the walk
//   gather_and_sort_candidates      capped: the K selected keys, sorted
//   capped_scan                     capped: the rule's scan over them
// over one shared-memory struct (TopHStorage).
//
// Passes over the row (reads of the logits; every pass is a streaming read):
//   pass 1     softmax state (max, sum exp, sum shifted) + the first digit's
//              histogram. Capped rules count keys. "exact" needs, per bin,
//              (count, sum e, sum d e) relative to the row max m, which is not
//              known yet; it uses the softmax-state merge instead:
//                * each thread keeps its tokens of the highest first-digit bin
//                  it has seen so far (its "top bin") as an online softmax
//                  state (relative to their own max), not in the histogram;
//                * every other token goes to the shared bin sums relative to
//                  the bin's reference r_b = z of the bin's upper end (known
//                  from the key alone); a thread's top-bin state is flushed
//                  there too when a token of a higher bin arrives.
//              After the pass one block reduction ("higher bin wins, equal
//              bins merge") gives B*, the bin of the row max, with its exact
//              state relative to m. Every bin b < B* has r_b <= m (its upper
//              end lies below the row max), so its sums relative to r_b
//              rescale to m (the merge: e *= exp(r_b - m),
//              d = exp(r_b - m) (d + (r_b - m) e)) without losing terms that
//              would not underflow relative to m anyway. Only B* could have
//              r_b far above m (a first-digit bin spans a quarter of a binary
//              octave, e.g. x in [1024, 1280)), and B* never uses r_b.
//   digits     "exact": up to 2 more histogram passes (bf16 / fp16: 1),
//              relative to m (early exit); capped: 2 more (digits 2 and 3, the last one also
//              gathering), or, when V <= K, none and one gather pass instead
//   write      the mask (reads the row once more)
// Mask: at most 4 passes (1 + 2 digits + write) for every rule and every
// row; "exact" typically 2-3, because the cut bin usually holds one token
// after the first or second digit, and at most 3 for bf16 / fp16 rows, whose
// second digit's bins each hold one value (radix_select's kSingleValueLevel;
// before December 7th a tie group there took the third digit's pass: 4 on
// most N(0, sigma^2) bf16 rows of 128256 logits at alpha 0.4 and 0.8);
// capped rules with V <= K: 3.
//
// sample (sample_kernel) runs the same selection (only pass 1 without
// truncation), then a draw pass that stops at the tile holding the drawn
// token, instead of the write pass. The kept mass the draw needs (sum of
// exp(z - m) over the kept set) comes out of the selection (Cut::mass), so no
// pass of its own:
//   plain sampling   the row's softmax state sum_exp (relative to m), pass 1;
//   "exact"          the walk's sums above the cut (+ the kept part of the tie
//                    group at the last digit);
//   capped rules     the sum over the kept sorted keys in shared memory.
// Sample: at most 4 passes for "exact" and the capped rules (1 + 2 digits +
// draw), 2 for plain sampling; the draw pass reads on average part of the row.
//
// fp32 arithmetic, 64-bit element indices, rows up to 2^31 - 1 elements.
// "exact" adds its bin sums with shared-memory float atomics, so the sums'
// rounding (not the kept set on tie-free rows away from the boundary) can
// vary between runs; the sampler family's top-p and typical add theirs in
// 64-bit fixed point (FixedPointBins), the same bits in any order.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../core/row_filters.h"
#include "../core/softmax_state.h"
#include "../core/top_h.h"
#include "../frontend/top_h.h"
#include "collectives.cuh"
#include "launch_config.h"
#include "row_kernels.cuh"

namespace logitkit::cuda {

// Largest K the capped rules support on CUDA (shared-memory candidate list).
constexpr int64_t kMaxCudaCap = 2048;

// Longest row: the kernels count a row's tokens in 32-bit shared counters.
constexpr int64_t kMaxTopHRowLength = 2147483647LL;

// The radix digits of the 32-bit keys: 11 + 11 + 10 bits, most significant
// first. A histogram has at most kBins bins; the last digit's bins are
// single key values.
constexpr int kDigitCount = 3;
constexpr int kBins = 2048;
constexpr int kLastDigitBits = 10;
constexpr uint32_t kLastDigitMask = (1u << kLastDigitBits) - 1u;

// Survivors the sampler family's gathered path holds (ties included): its
// largest top-k and 128 slots for ties across the k-th logit
// (row_filters_kernels.cuh). Its four arrays fill TopHStorage's second sum
// array (16 KiB).
constexpr int kGatherCapacity = 1024;

// typical's and top-p's selections stop at a crossing bin of at most this many
// candidates, which the write / draw pass gathers (kGathersCrossing) and sorts
// (block_bitonic_sort: at 1024 candidates and 512 threads, 55 steps of one
// compare per thread, each computing two distance keys for typical; about a
// tenth of a digit pass's time, docs/sampling.md). The whole capacity.
constexpr int kCrossingCapacity = kGatherCapacity;

LK_DEVICE inline int digit_shift(int level) { return level == 0 ? 21 : (level == 1 ? kLastDigitBits : 0); }
LK_DEVICE inline int digit_bits(int level) { return level == kDigitCount - 1 ? kLastDigitBits : 11; }

// Which kept set a kernel selects; the host launcher dispatches on the rule.
enum class Selection : int {
  all,     // plain sampling (sample without alpha): every token
  capped,  // "hf" and "official": a scan over the top K
  exact,   // "exact": the entropy-bounded prefix of the whole row
  rank,    // the sampler family's top-k / keep floor: the k-th largest key (counts, nothing gathered)
};

// "exact", first digit: the reference r of a bin's sums exp(z - r), taken
// before the row max is known: z of the largest float whose key falls in the
// bin (>= every z in the bin), clamped to the largest finite float. Used only
// for bins below the bin of the row max, where r <= m (see the top).
LK_DEVICE inline float first_digit_reference(int bin, float inv_t) {
  const uint32_t top_key = (static_cast<uint32_t>(bin) << digit_shift(0)) | ((1u << digit_shift(0)) - 1u);
  const float upper = core::key_to_float(top_key);
  const float finite = upper == upper && upper <= core::max_finite() ? upper : core::max_finite();
  return core::scaled_logit(finite, inv_t);
}

// Statistics of a set of tokens, accumulated over bins.
struct BinTotals {
  int64_t count;
  float e;  // sum exp(z - m)       ("exact" only)
  float d;  // sum (z - m) exp(z - m)
};

// "exact", pass 1: a thread's tokens of the highest first-digit bin it has
// seen so far, as an online softmax state relative to their own max.
struct TopBinState {
  int bin;         // -1: no token yet
  unsigned count;  // tokens accumulated, including any whose weight underflows
  core::SoftmaxState st;
};

LK_DEVICE inline TopBinState empty_top_bin() { return TopBinState{-1, 0u, core::empty_state()}; }

// The block reduction's combine: the higher bin wins, equal bins merge.
LK_DEVICE inline TopBinState merge_top_bins(const TopBinState& a, const TopBinState& b) {
  if (a.bin != b.bin) return a.bin > b.bin ? a : b;
  return TopBinState{a.bin, a.count + b.count, core::merge(a.st, b.st)};
}

// What kind of distribution a row has (see the special rows in ops.py).
enum class RowKind : int { defined, undefined /* NaN or +inf */, all_masked /* all -inf */ };

LK_DEVICE inline RowKind row_kind(const core::SoftmaxState& row) {
  // NaN or +inf in the row: no defined distribution. All -inf: token 0 only.
  RowKind kind = RowKind::defined;
  if (row.sum_exp != row.sum_exp || row.max == core::pos_infinity()) kind = RowKind::undefined;
  if (row.max == core::neg_infinity()) kind = RowKind::all_masked;
  return kind;
}

// Result of the selection, in shared memory.
struct Cut {
  uint64_t full_from;  // keys >= full_from are kept (64-bit: "none" is 2^32)
  uint32_t tie_key;    // tokens with this key: the first tie_keep by index are kept
  int64_t tie_keep;
  int64_t tie_total;  // tokens with tie_key in the row
  int64_t selected;   // capped rules: tokens with key >= full_from
  int done;           // 0 while searching, then 1 + the digit level that resolved the cut
  RowKind kind;
  float m;     // max z of the row (the reference of the weights exp(z - m))
  float mass;  // sum of exp(z - m) over the kept set (what sampling draws from)
};

// Everything the kernels keep in shared memory, one instance per block.
struct TopHStorage {
  // The histogram of the current digit: counts, and for "exact" the sums
  // (e, d e) relative to the row max (first digit: see pass 1); for the
  // rank selection each bin's largest key instead of the sum e.
  // Top-p and typical keep the sums in fixed point (fixed_e, fixed_d), the
  // others as floats (bin_e, bin_d); read through bin_sum_e / bin_sum_d.
  unsigned bin_count[kBins];
  union {
    unsigned long long fixed_e[kBins];
    float bin_e[kBins];
    uint32_t bin_max_key[kBins];
  };
  union {
    unsigned long long fixed_d[kBins];
    float bin_d[kBins];
    // The sampler family's gathered top-k survivors (row_filters_kernels.cuh):
    // their keys, then their z, weights and keys in rank order. The rank selections
    // never touch this array (counts and bin_max_key only), so the survivors
    // stay here across the top-k and keep-floor selections.
    struct {
      uint32_t key[kGatherCapacity];
      float ranked_z[kGatherCapacity];
      float ranked_e[kGatherCapacity];
      uint32_t ranked_key[kGatherCapacity];
    } survivors;
  };
  static_assert(4 * kGatherCapacity * sizeof(float) <= kBins * sizeof(unsigned long long));
  float fixed_one;  // FixedPointBins::one(cols), set by reset_histogram
  Cut cut;
  BinTotals above;  // totals of the tokens above the current candidate range
  // The sums (e, d) of the bin the walk refines into, the current candidate
  // range (count 0 and no sums at the first digit; predicates with
  // kKeptShifted only: the sampler family's guess of typical's center).
  BinTotals refined;
  uint32_t prefix;  // digits fixed so far
  int gathered;     // capped rules: selected keys gathered so far
  // Scratch of the block collectives.
  core::SoftmaxState state_scratch[kReduceScratchSize];
  TopBinState top_bin_scratch[kReduceScratchSize];
  int warp_counts[kMaxWarpsPerBlock];
  float mass_scratch[kReduceScratchSize];
  int64_t index_scratch[kReduceScratchSize];
  // The rank selection's first digit: NaN tokens seen, and the row max x
  // (NaN when the row holds one), set by the walk.
  unsigned nan_tokens;
  float row_max_x;
  // sum of (z - m) exp(z - m) over the kept set, beside cut.mass (predicates
  // with sums; read by the sampler family's top-p). Not a member of Cut: a
  // larger Cut made ptxas spill in top_h_mask_kernel.
  float kept_shifted;
  // The walk stopped at a crossing bin left to the caller (kGathersCrossing:
  // typical, top-p): keys >= cut.full_from are kept, the cut lies among the bin's
  // cut.tie_total candidates of keys in [cut.tie_key, cut.full_from), and
  // s.above holds the totals of the candidates above the bin.
  bool crossing_pending;
};

// The rule's predicate over the statistics of a candidate prefix set.
struct CountPredicate {
  static constexpr bool kSums = false;  // bins hold counts only
  static constexpr bool kFixedPointSums = false;
  static constexpr bool kKeptShifted = false;
  static constexpr bool kKeepsCrossing = false;
  static constexpr bool kGathersCrossing = false;
  int64_t k;
  LK_DEVICE bool exceeds(const BinTotals& t) const { return t.count > k; }
  // No early stop: the capped rules always resolve all three digits, because
  // the last digit's histogram then spells out the selected keys exactly (see
  // gather_and_sort_candidates), which saves the gather pass.
  LK_DEVICE bool bin_fully_dropped(const BinTotals&, int64_t) const { return false; }
  LK_DEVICE bool bin_fully_kept(int64_t) const { return false; }
  // How many tokens of a tie group (of `group` tokens with equal logit) fit.
  LK_DEVICE int64_t tie_keep(const BinTotals& above, int64_t, float, float) const { return k - above.count; }
};

// Whether the tokens just below key (x one key lower) also reach z_k: z = x *
// (1/T) rounds distinct x to one float (T < 1, adjacent floats). A survivor
// list of the keys >= key then misses them (keep_last_digit_survivors,
// kth_largest_of_gathered_range), and top-p's crossing bin of lowest key
// `key` may not be gathered (TopPPredicate::gathers_crossing, nor
// top-k's: RankPredicate::stops_at_crossing). A NaN z below
// never reaches z_k.
LK_DEVICE inline bool key_below_reaches(uint32_t key, float z_k, float inv_t) {
  return key > 0u && core::scaled_logit(core::key_to_float(key - 1u), inv_t) >= z_k;
}

// The sampler family's k-th largest logit (Selection::rank): CountPredicate's
// walk, resolved at the first failing bin that holds a single key value, which
// is then the bin's largest key (TopHStorage::bin_max_key): a bin of one token,
// or any bin from radix_select's single-value level on (for 16-bit inputs the
// second digit: see kSingleValueLevel there). So top-k takes 1 to 3 digit passes (16-bit inputs: 1 or
// 2) instead of always 3. With a gather capacity, a failing bin that is not
// single-valued stops the walk too when it and the tokens above it are at most
// that many: the cut is then the range of keys >= the bin's lowest key
// (tie_total 0), whose tokens the caller gathers and ranks itself. With a
// crossing capacity, a failing bin of at most that many tokens stops the walk
// as a crossing bin (TopHStorage::crossing_pending, as TopPPredicate's: keys
// >= cut.full_from lie above it, cut.selected of them; cut.tie_key is the
// bin's lowest key, cut.tie_total its tokens), which the caller gathers in its
// next pass and ranks there; only on a row without NaN whose bin lies above
// -inf and whose key below the bin scales below the bin's lowest z at the
// temperature inv_t (key_below_reaches: the tokens below are then top-k's
// dropped ones whatever the k-th largest turns out to be).
struct RankPredicate : CountPredicate {
  int64_t gather_capacity;    // 0: always refine to a single value
  int64_t crossing_capacity;  // 0: never stop at a crossing bin
  float inv_t;                // the temperature the caller's survivors are scaled with (crossing_capacity > 0)
  LK_DEVICE bool stops_at_crossing(uint32_t lowest_key, int64_t bin_count, unsigned nan_tokens) const {
    const float lowest = core::key_to_float(lowest_key);
    return bin_count <= crossing_capacity && nan_tokens == 0u && lowest > core::neg_infinity() &&
           !key_below_reaches(lowest_key, core::scaled_logit(lowest, inv_t), inv_t);
  }
};

struct EntropyPredicate {
  static constexpr bool kSums = true;             // bins hold (count, sum e, sum d e)
  static constexpr bool kFixedPointSums = false;  // float atomics: see FixedPointBins
  static constexpr bool kKeptShifted = false;
  static constexpr bool kKeepsCrossing = false;
  static constexpr bool kGathersCrossing = false;
  float budget;  // alpha H(p), see core::exact_budget
  LK_DEVICE bool exceeds(const BinTotals& t) const {
    return t.e > 0.0f && core::renormalised_entropy(t.e, t.d) > budget;
  }
  // The failing bin's single token would exceed the budget on its own,
  // unless it is the row's most probable token (nothing above it), which
  // always fits: should rounding of merged sums put its H above a budget of
  // 0, refining (relative to m) keeps it. A bin's count may include tokens of
  // weight 0 (first digit, see pass 1): a count above 1 then only refines.
  LK_DEVICE bool bin_fully_dropped(const BinTotals& above, int64_t bin_count) const {
    return bin_count == 1 && above.e > 0.0f;
  }
  LK_DEVICE bool bin_fully_kept(int64_t) const { return false; }
  // Largest j in [0, group] with H(above + j tokens of (e, d)) <= budget
  // (monotone in j: binary search).
  LK_DEVICE int64_t tie_keep(const BinTotals& above, int64_t group, float e, float d) const {
    int64_t lo = 0, hi = group;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      const float es = above.e + static_cast<float>(mid) * e;
      const float ds = above.d + static_cast<float>(mid) * d * e;
      if (core::renormalised_entropy(es, ds) <= budget) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

// The sampler family's top-p (core::top_p_reached; row_filters_kernels.cuh):
// the first bin whose inclusion brings the mass to the limit holds the
// crossing token, which is kept (the mass above it is below the limit), so a
// failing bin of one token is kept whole, and at the last digit the whole tie
// group is kept. Bins hold (count, sum e, sum d e) over the top-k survivors.
// When no later rule needs top-p's kept sums (core::top_p_cut_may_wait), a
// crossing bin of 2 to kCrossingCapacity candidates below the last digit ends
// the selection (gathers_crossing, as TypicalPredicate's), unless a token
// below the bin may scale to the z of one in it (key_below_reaches: the
// pass that gathers the bin decides the tokens below it without top-p's
// threshold, so their z must lie below it).
struct TopPPredicate {
  static constexpr bool kSums = true;
  static constexpr bool kFixedPointSums = true;  // see FixedPointBins
  static constexpr bool kKeptShifted = true;     // also sum (z - m) e of the kept set (TopHStorage::kept_shifted)
  static constexpr bool kKeepsCrossing = true;   // the token that reaches the limit is kept
  static constexpr bool kGathersCrossing = true;
  float limit;  // top_p * s
  bool may_gather_crossing;
  LK_DEVICE bool gathers_crossing(uint32_t lowest_key, float inv_t) const {
    return may_gather_crossing &&
           !key_below_reaches(lowest_key, core::scaled_logit(core::key_to_float(lowest_key), inv_t), inv_t);
  }
  LK_DEVICE bool exceeds(const BinTotals& t) const { return core::top_p_reached(t.e, limit); }
  LK_DEVICE bool bin_fully_dropped(const BinTotals&, int64_t) const { return false; }
  LK_DEVICE bool bin_fully_kept(int64_t bin_count) const { return bin_count == 1; }
  LK_DEVICE int64_t tie_keep(const BinTotals&, int64_t group, float, float) const { return group; }
};

// The sampler family's typical (core::typical_reached; row_filters_kernels.cuh)
// over keys of the negated distance -|z - c| (DistanceKey: the nearest token
// has the largest key, so the walk from the top visits increasing
// distances): like top-p, the crossing token and its ties are kept. Bins
// hold (count, sum e, sum d e) of the candidates; only the cut's keys are
// used (the Cut's mass, computed from a key as if it were a logit, is not).
// Below the last digit, a crossing bin of 2 to kCrossingCapacity candidates
// ends the selection too (kGathersCrossing; TopHStorage::crossing_pending):
// the caller's next pass gathers that bin's candidates and resolves the cut
// among them (row_filters_kernels.cuh), which saves the remaining digit passes.
struct TypicalPredicate {
  static constexpr bool kSums = true;
  static constexpr bool kFixedPointSums = true;
  static constexpr bool kKeptShifted = false;
  static constexpr bool kKeepsCrossing = true;
  static constexpr bool kGathersCrossing = true;
  core::TypicalLimit limit;
  LK_DEVICE bool gathers_crossing(uint32_t, float) const { return true; }
  LK_DEVICE bool exceeds(const BinTotals& t) const {
    return core::typical_reached(t.e, static_cast<float>(t.count), limit);
  }
  LK_DEVICE bool bin_fully_dropped(const BinTotals&, int64_t) const { return false; }
  LK_DEVICE bool bin_fully_kept(int64_t bin_count) const { return bin_count == 1; }
  LK_DEVICE int64_t tie_keep(const BinTotals&, int64_t group, float, float) const { return group; }
};

// The key a radix selection ranks a token by (largest first): its logit
// (Top-H, top-p), or typical's negated distance from the center.
struct LogitKey {
  LK_DEVICE uint32_t operator()(float x, float) const { return core::orderable_key(x); }
};
struct DistanceKey {
  float center;
  LK_DEVICE uint32_t operator()(float, float z) const {
    return core::orderable_key(-core::typical_distance(z, center));
  }
};

// The predicate of a selection: capped rules select the top K tokens, "exact"
// the largest prefix whose renormalised entropy fits alpha H(p).
template <Selection kSel>
LK_DEVICE inline auto rule_predicate(const TopHParams& p, const core::SoftmaxState& row) {
  if constexpr (kSel == Selection::capped) {
    return CountPredicate{p.k};
  } else {
    return EntropyPredicate{core::exact_budget(p.alpha, core::entropy(row))};
  }
}

// Block-wide ordered count: every thread passes a flag for element
// base + threadIdx.x of one tile; returns the number of flagged elements of
// the tile before it (in index order), and adds the tile's total to `running`
// (same value in every thread). `warp_counts` is shared, kMaxWarpsPerBlock.
LK_DEVICE inline int64_t ordered_rank(bool flag, int64_t& running, int* warp_counts) {
  const unsigned ballot = __ballot_sync(warp_live_mask(), flag);
  const int lane = lane_rank();
  const int below_in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp_rank()] = __popc(ballot);
  __syncthreads();
  int64_t before = running, total = running;
  for (int w = 0; w < warps_per_block(); ++w) {
    if (w < warp_rank()) before += warp_counts[w];
    total += warp_counts[w];
  }
  __syncthreads();  // warp_counts is rewritten by the next tile
  running = total;
  return before + below_in_warp;
}

// Every read of an input row element (the emulator counts them: passes).
template <class scalar_t>
LK_DEVICE inline float load_logit(const scalar_t* row, int64_t i) {
  LK_COUNT_ROW_READ();
  return static_cast<float>(row[i]);
}

// Bin sums in 64-bit fixed point (the sampler family's top-p and typical).
// A float atomicAdd makes a bin's sum depend on the order in which threads
// reach it, so a row whose cut lies within rounding of its limit could keep
// a different set from run to run; integer addition gives the same bits in
// any order. Every term is a weight e = exp(z - r) <= 1 or d e with
// |d e| <= 1/e, relative to a reference r >= z (the row max m, or a
// first-digit bin's upper end; a thread's top-bin state adds at most its
// count), so a bin's sum is at most `cols` in magnitude and fits a signed
// 64-bit integer with 62 - bit_width(cols) fraction bits (45 at V = 128256).
// The absolute error, below cols * 2^-(fraction bits) of exp(r), is far
// below what top-p and typical compare with: top_p (typical_p) times a mass
// >= 1 (the max token weighs 1). "exact" keeps float sums: its entropy
// budget on peaked rows (~1e-24) is set by tokens ~60 nats below the max,
// which fixed point relative to m (or to a first-digit bin that spans more
// than 31 nats, |z| >= 128) rounds to 0 (docs/determinism.md).
struct FixedPointBins {
  // 2^(62 - bit_width(cols)), a power of two (exact as a float).
  LK_DEVICE static float one(int64_t cols) {
    int bits = 0;
    for (int64_t c = cols; c > 0; c >>= 1) ++bits;
    return ldexpf(1.0f, 62 - bits);
  }
  // A term in fixed point, negative ones as two's complement; inf / NaN (only
  // in a row holding NaN or +inf, whose bins are never read) add nothing.
  LK_DEVICE static unsigned long long term(float v, float fixed_one) {
    const float scaled = v * fixed_one;
    if (!(fabsf(scaled) < 9.0e18f)) return 0ull;  // (< 2^63)
    return static_cast<unsigned long long>(llrintf(scaled));
  }
  LK_DEVICE static float value(unsigned long long sum, float fixed_one) {
    return static_cast<float>(static_cast<long long>(sum)) * (1.0f / fixed_one);
  }
};

// Resets the histogram for a new selection: zeroes its bins (the sums only
// where the selection uses them: the fixed-point words hold the float sums'
// storage too) and the NaN count ("rank"), and sets the fixed-point scale
// for this row length ("exact"). A barrier must follow.
template <Selection kSel>
LK_DEVICE inline void reset_histogram(TopHStorage& s, int64_t cols) {
  for (int64_t b = threadIdx.x; b < kBins; b += blockDim.x) {
    s.bin_count[b] = 0;
    if constexpr (kSel == Selection::exact) {
      s.fixed_e[b] = 0ull;
      s.fixed_d[b] = 0ull;
    }
    if constexpr (kSel == Selection::rank) s.bin_max_key[b] = 0u;
  }
  if (threadIdx.x == 0) {
    if constexpr (kSel == Selection::rank) s.nan_tokens = 0u;
    if constexpr (kSel == Selection::exact) s.fixed_one = FixedPointBins::one(cols);
  }
}

// "exact": adds a token of weight e = exp(d) (or a state of `count` tokens)
// to a bin: in fixed point (kFixed) or with float atomics.
template <bool kFixed>
LK_DEVICE inline void add_to_bin(TopHStorage& s, int bin, unsigned count, float e, float de) {
  atomicAdd(&s.bin_count[bin], count);
  if constexpr (kFixed) {
    atomicAdd(&s.fixed_e[bin], FixedPointBins::term(e, s.fixed_one));
    atomicAdd(&s.fixed_d[bin], FixedPointBins::term(de, s.fixed_one));
  } else {
    atomicAdd(&s.bin_e[bin], e);
    atomicAdd(&s.bin_d[bin], de);
  }
}

// A bin's sums as floats: read from the fixed-point words (kFixed; the walk
// converts each bin it visits, so no pass over the histogram and no barrier)
// or from the float sums.
template <bool kFixed>
LK_DEVICE __forceinline__ float bin_sum_e(const TopHStorage& s, int64_t b) {
  if constexpr (kFixed) return FixedPointBins::value(s.fixed_e[b], s.fixed_one);
  return s.bin_e[b];
}
template <bool kFixed>
LK_DEVICE __forceinline__ float bin_sum_d(const TopHStorage& s, int64_t b) {
  if constexpr (kFixed) return FixedPointBins::value(s.fixed_d[b], s.fixed_one);
  return s.bin_d[b];
}

// Overwrites a bin's sums (rescale_first_digit_bins).
template <bool kFixed>
LK_DEVICE __forceinline__ void set_bin_sums(TopHStorage& s, int64_t b, const core::SoftmaxState& sums) {
  if constexpr (kFixed) {
    s.fixed_e[b] = FixedPointBins::term(sums.sum_exp, s.fixed_one);
    s.fixed_d[b] = FixedPointBins::term(sums.sum_shifted, s.fixed_one);
  } else {
    s.bin_e[b] = sums.sum_exp;
    s.bin_d[b] = sums.sum_shifted;
  }
}

// Adds a top-bin state to its bin's shared sums, rescaled from the state's
// max m_t to the bin's reference r >= m_t (the softmax-state merge):
// e *= exp(m_t - r), d = exp(m_t - r) (d + (m_t - r) e).
template <bool kFixed>
LK_DEVICE inline void flush_top_bin(const TopBinState& t, float inv_t, TopHStorage& s) {
  const core::SoftmaxState relative = core::rescaled(t.st, first_digit_reference(t.bin, inv_t));
  add_to_bin<kFixed>(s, t.bin, t.count, relative.sum_exp, relative.sum_shifted);
}

// "exact", pass 1: one token z (of first-digit bin `bin`, not -inf) into the
// histogram or into this thread's top bin (see the top of the file).
template <bool kFixed>
LK_DEVICE inline void add_first_digit_token(TopHStorage& s, TopBinState& mine, int bin, float z, float inv_t) {
  if (bin < mine.bin) {
    // Below this thread's top bin, hence below the row max's bin:
    // r_b <= m, so exp(z - r_b) >= exp(z - m) and dropping an underflow
    // here loses no term that relative to m would be positive.
    const float d = z - first_digit_reference(bin, inv_t);  // <= 0
    const float e = expf(d);
    if (e != 0.0f) add_to_bin<kFixed>(s, bin, 1u, e, d * e);
    return;
  }
  if (bin > mine.bin) {  // a new top bin: the previous one goes to the histogram
    if (mine.bin >= 0) flush_top_bin<kFixed>(mine, inv_t, s);
    mine = TopBinState{bin, 0u, core::empty_state()};
  }
  core::accumulate(mine.st, &z, 1);
  ++mine.count;
}

// "exact", pass 1: a state t of tokens of one first-digit bin (count > 0) into
// the histogram or into this thread's top bin, as add_first_digit_token adds
// one token.
template <bool kFixed>
LK_DEVICE inline void add_first_digit_bin(TopHStorage& s, TopBinState& mine, const TopBinState& t, float inv_t) {
  if (t.bin < mine.bin) {
    flush_top_bin<kFixed>(t, inv_t, s);
  } else if (t.bin > mine.bin) {
    if (mine.bin >= 0) flush_top_bin<kFixed>(mine, inv_t, s);
    mine = t;
  } else {
    mine = merge_top_bins(mine, t);
  }
}

// What pass 1 leaves in every thread.
struct FirstDigit {
  core::SoftmaxState row;  // the row's softmax state (block-reduced)
  TopBinState mine;        // "exact": this thread's top bin
  TopBinState best;        // "exact": B*, the bin of the row max, with all its tokens
};

// Pass 1: softmax state + the first digit's histogram. The first digit needs
// no reference max: capped rules count; "exact" sums relative to each bin's
// own upper end r_b (first_digit_reference), except each thread's top bin,
// kept as a softmax state (see the top of the file).
template <Selection kSel, class scalar_t>
LK_DEVICE inline FirstDigit softmax_state_and_first_digit(const scalar_t* x, int64_t cols, float inv_t,
                                                          TopHStorage& s) {
  if constexpr (kSel != Selection::all) reset_histogram<kSel>(s, cols);
  __syncthreads();
  FirstDigit f{core::empty_state(), empty_top_bin(), empty_top_bin()};
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float xv = load_logit(x, i);
    const float z = core::scaled_logit(xv, inv_t);
    core::accumulate(f.row, &z, 1);
    if constexpr (kSel != Selection::all) {
      const int bin = static_cast<int>(core::orderable_key(xv) >> digit_shift(0));
      if constexpr (kSel == Selection::capped) atomicAdd(&s.bin_count[bin], 1u);
      if constexpr (kSel == Selection::exact) {
        if (xv != core::neg_infinity()) add_first_digit_token<false>(s, f.mine, bin, z, inv_t);
      }
    }
  }
  f.row = block_reduce(
      f.row, [](const core::SoftmaxState& a, const core::SoftmaxState& b) { return core::merge(a, b); },
      core::empty_state(), s.state_scratch);
  // "exact": B* = the highest top bin of the block = the bin of the row max,
  // with the state of all its tokens (its max is m).
  if constexpr (kSel == Selection::exact) {
    f.best = block_reduce(
        f.mine, [](const TopBinState& a, const TopBinState& b) { return merge_top_bins(a, b); }, empty_top_bin(),
        s.top_bin_scratch);
  }
  return f;
}

// "exact", after pass 1: every first-digit bin relative to the row max m
// (kFixed: the bins were added in fixed point).
template <bool kFixed>
LK_DEVICE inline void rescale_first_digit_bins(TopHStorage& s, const FirstDigit& f, float inv_t) {
  const float m = f.row.max;
  // Top bins below B* join the histogram (relative to their r_b); B*'s
  // tokens are all in `best` (a token of B* is never below its thread's
  // top bin, and B* is never flushed): B*'s shared entry is still empty.
  if (f.mine.bin >= 0 && f.mine.bin != f.best.bin) flush_top_bin<kFixed>(f.mine, inv_t, s);
  __syncthreads();
  // Rescale the bins b < B* from r_b <= m to m, as merging softmax states:
  // e *= exp(r - m), d = exp(r - m) (d + (r - m) e). B* is written
  // directly relative to m (its max is m: the factor is 1).
  // (kFixed: back in fixed point, now relative to m, whose absolute
  // resolution suffices for the mass rules that use it; FixedPointBins.)
  for (int64_t b = threadIdx.x; b < kBins; b += blockDim.x) {
    if (b == f.best.bin || s.bin_count[b] == 0) continue;
    const float r = first_digit_reference(static_cast<int>(b), inv_t);
    const core::SoftmaxState to_m =
        core::rescaled(core::SoftmaxState{r, bin_sum_e<kFixed>(s, b), bin_sum_d<kFixed>(s, b)}, m);
    set_bin_sums<kFixed>(s, b, to_m);
  }
  if (threadIdx.x == 0 && f.best.bin >= 0) {  // (always: a defined row has a finite token)
    s.bin_count[f.best.bin] = f.best.count;
    set_bin_sums<kFixed>(s, f.best.bin, core::rescaled(f.best.st, m));
  }
}

// A selection's side work (NoSideWork: none): a histogram of its own that
// digit_pass builds beside the selection's (begin: before the pass, after a
// barrier; takes: whether a token, given its z and key, goes into it; add:
// each token it takes, with its logit, z, key and weight exp(z - m)), and
// next_digit_ready, which may fill the selection's histogram of the next
// digit without a pass (the sampler family's typical, row_filters_kernels.cuh).
struct NoSideWork {
  static constexpr bool kActive = false;
  LK_DEVICE void begin(const TopHStorage&, int, uint32_t) {}
  LK_DEVICE bool takes(float, uint32_t) const { return false; }
  LK_DEVICE void add(float, float, uint32_t, float) const {}
  LK_DEVICE bool next_digit_ready(TopHStorage&, int) const { return false; }
};

// Digit passes (2 and 3; also the first for a key pass 1 could not build:
// typical's distance): the histogram of the tokens whose key (key_of: the
// logit's, or typical's distance) has the digits fixed so far (`prefix`);
// "exact" relative to the row max m, without tokens of zero probability
// (never candidates). Capped rules (and the rank selection when given
// `candidates`), last digit: the keys above the candidate range are selected
// for sure and are collected into `candidates` now (no separate gather
// pass). Tokens with z < floor_z (top-k's dropped tokens, for
// the sampler family's top-p; the candidates' threshold for typical) are no
// candidates (kFloor; floor_z = -inf for Top-H).
template <Selection kSel, bool kFloor, bool kFixed, class scalar_t, class KeyOf = LogitKey, class Side = NoSideWork>
LK_DEVICE inline void digit_pass(const scalar_t* x, int64_t cols, int level, uint32_t prefix, float m, float inv_t,
                                 float floor_z, TopHStorage& s, uint32_t* candidates, KeyOf key_of = LogitKey{},
                                 Side side = Side{}) {
  __syncthreads();  // previous readers of the bins are done
  reset_histogram<kSel>(s, cols);
  if constexpr (Side::kActive) side.begin(s, level, prefix);
  __syncthreads();
  const int shift = digit_shift(level);
  const int prefix_shift = shift + digit_bits(level);
  constexpr bool kCountsOnly = kSel == Selection::capped || kSel == Selection::rank;  // bins without weights
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float xv = load_logit(x, i);
    if constexpr (kSel == Selection::rank) {
      if (level == 0 && xv != xv) atomicAdd(&s.nan_tokens, 1u);  // (either sign: see walk)
    }
    const float z = core::scaled_logit(xv, inv_t);
    const uint32_t key = key_of(xv, z);
    const float d = z - m;
    const bool in_range = level == 0 || (key >> prefix_shift) == prefix;  // (the first digit has no prefix)
    float e = 0.0f;  // the token's weight exp(z - m), computed once for the selection and the side work
    if constexpr (Side::kActive) {
      const bool side_takes = side.takes(z, key);
      if (side_takes || (in_range && !kCountsOnly)) e = expf(d);
      if (side_takes) side.add(xv, z, key, e);
    }
    if (!in_range) {
      if constexpr (kSel == Selection::capped || kSel == Selection::rank) {
        if (level == kDigitCount - 1 && candidates != nullptr && (key >> prefix_shift) > prefix) {
          candidates[atomicAdd(&s.gathered, 1)] = key;
        }
      }
      continue;
    }
    const int bin = static_cast<int>((key >> shift) & ((1u << digit_bits(level)) - 1u));
    if constexpr (kCountsOnly) {
      atomicAdd(&s.bin_count[bin], 1u);
      if constexpr (kSel == Selection::rank) atomicMax(&s.bin_max_key[bin], key);
    } else {
      if constexpr (!Side::kActive) e = expf(d);
      if (e != 0.0f && !(kFloor && z < floor_z)) add_to_bin<kFixed>(s, bin, 1u, e, d * e);
    }
  }
}

// The walk's end inside the failing bin b of digit `level` (with prefix
// bin_prefix): from level single_value_level on (radix_select's
// kSingleValueLevel) a single key value, whose tie group keeps its first j
// tokens (weight: the draw pass's expf(x / T - m) of the same float x); else a
// bin whose single token is dropped (see bin_fully_dropped) or kept
// (bin_fully_kept; bin_e, bin_d: the bin's sums, passed as values: a reference
// to the walk's local totals made ptxas spill), or a bin to refine with the
// next digit. Returns whether the cut is resolved.
template <class Predicate>
LK_DEVICE __forceinline__ bool resolve_in_bin(const Predicate& pred, int level, int single_value_level,
                                              uint32_t bin_prefix, int64_t bin_count, const BinTotals& above,
                                              float bin_e, float bin_d, float m, float inv_t, Cut& cut,
                                              float& kept_shifted) {
  if (level >= single_value_level) {
    // The bin's one key: its prefix, then the constant low bits, which are
    // set for a negative value (whose key is ~bits(x), core::orderable_key).
    const uint32_t high = bin_prefix << digit_shift(level);
    const uint32_t key = (high & 0x80000000u) ? high : (high | ((1u << digit_shift(level)) - 1u));
    const float z = core::scaled_logit(core::key_to_float(key), inv_t);
    const float d = z - m;
    const float e = expf(d);
    cut.full_from = static_cast<uint64_t>(key) + 1;
    cut.tie_key = key;
    cut.tie_total = bin_count;
    cut.tie_keep = pred.tie_keep(above, bin_count, e, d);
    cut.selected = above.count;
    cut.mass = above.e + static_cast<float>(cut.tie_keep) * e;
    if constexpr (Predicate::kKeptShifted) kept_shifted = above.d + static_cast<float>(cut.tie_keep) * (d * e);
    return true;
  }
  if (pred.bin_fully_dropped(above, bin_count)) {
    cut.full_from = (static_cast<uint64_t>(bin_prefix) + 1) << digit_shift(level);
    cut.selected = above.count;
    cut.mass = above.e;
    if constexpr (Predicate::kKeptShifted) kept_shifted = above.d;
    return true;
  }
  if constexpr (Predicate::kKeepsCrossing) {  // top-p and typical: Top-H's walk stays as it was (register budget)
    if (pred.bin_fully_kept(bin_count)) {
      cut.full_from = static_cast<uint64_t>(bin_prefix) << digit_shift(level);
      cut.selected = above.count + bin_count;
      cut.mass = above.e + bin_e;
      if constexpr (Predicate::kKeptShifted) kept_shifted = above.d + bin_d;
      return true;
    }
  }
  return false;
}

// Whether a predicate's walk may stop at a crossing bin left to the caller.
// (lowest_key: the crossing bin's lowest key.)
template <class Predicate>
LK_DEVICE inline bool gathers_crossing(const Predicate& pred, uint32_t lowest_key, float inv_t) {
  if constexpr (Predicate::kGathersCrossing) {
    return pred.gathers_crossing(lowest_key, inv_t);
  } else {
    return false;
  }
}

// The walk stops at crossing bin `bin_prefix` of digit `level`, holding
// bin_count tokens, and leaves it to the caller (thread 0): keys >= full_from
// lie above it (s.above.count of them), tie_key is its lowest key.
LK_DEVICE inline void stop_at_crossing_bin(int level, uint32_t bin_prefix, int64_t bin_count, TopHStorage& s) {
  const int shift = digit_shift(level);
  s.cut.full_from = (static_cast<uint64_t>(bin_prefix) + 1) << shift;
  s.cut.tie_key = bin_prefix << shift;
  s.cut.tie_total = bin_count;
  s.cut.selected = s.above.count;
  s.crossing_pending = true;
  s.cut.done = level + 1;
}

// The radix-selection step after one digit's histogram (thread 0): walks the
// bins from the top. s.above holds the totals of the tokens above the current
// candidate range and is updated to the tokens above the failing bin, whose
// digit joins s.prefix when the cut is not resolved yet. When the cut is
// resolved, cut.mass = the kept tokens' sum of exp(z - m) ("exact"; the
// capped rules' bins hold no sums, their mass is set by capped_scan).
template <class Predicate>
LK_DEVICE inline void walk(const Predicate& pred, int level, int single_value_level, float m, float inv_t,
                           TopHStorage& s) {
  for (int b = (1 << digit_bits(level)) - 1; b >= 0; --b) {
    if constexpr (std::is_same_v<Predicate, RankPredicate>) {
      // The first digit's highest non-empty bin holds the row's largest key. A
      // positive NaN's key lies above +inf's, a negative NaN's below -inf's:
      // counted apart.
      if (level == 0 && s.above.count == 0 && s.bin_count[b] > 0) {
        s.row_max_x = s.nan_tokens > 0 ? core::quiet_nan() : core::key_to_float(s.bin_max_key[b]);
      }
    }
    BinTotals with = s.above;
    with.count += s.bin_count[b];
    if constexpr (Predicate::kSums) {
      with.e += bin_sum_e<Predicate::kFixedPointSums>(s, b);
      with.d += bin_sum_d<Predicate::kFixedPointSums>(s, b);
    }
    if (!pred.exceeds(with)) {
      s.above = with;
      continue;
    }
    const uint32_t bin_prefix = (s.prefix << digit_bits(level)) | static_cast<uint32_t>(b);
    if constexpr (std::is_same_v<Predicate, RankPredicate>) {
      if (s.bin_count[b] == 1 || level >= single_value_level) {  // the failing bin's one key is the k-th largest
        const uint32_t key = s.bin_max_key[b];
        s.cut.full_from = static_cast<uint64_t>(key) + 1;
        s.cut.tie_key = key;
        s.cut.tie_total = s.bin_count[b];
        s.cut.tie_keep = pred.tie_keep(s.above, s.bin_count[b], 0.0f, 0.0f);
        s.cut.selected = s.above.count;
        s.cut.done = level + 1;
        return;
      }
      if (s.above.count + s.bin_count[b] <= pred.gather_capacity) {  // few enough to gather: stop here
        s.cut.full_from = static_cast<uint64_t>(bin_prefix) << digit_shift(level);
        s.cut.tie_total = 0;
        s.cut.selected = s.above.count + s.bin_count[b];
        s.cut.done = level + 1;
        return;
      }
      if (pred.stops_at_crossing(bin_prefix << digit_shift(level), s.bin_count[b], s.nan_tokens)) {
        stop_at_crossing_bin(level, bin_prefix, s.bin_count[b], s);
        return;
      }
    }
    // (the bin's sums only for fully kept bins: no loads for Top-H's rules)
    const float bin_e = Predicate::kKeepsCrossing ? bin_sum_e<Predicate::kFixedPointSums>(s, b) : 0.0f;
    const float bin_d = Predicate::kKeptShifted ? bin_sum_d<Predicate::kFixedPointSums>(s, b) : 0.0f;
    if (resolve_in_bin(pred, level, single_value_level, bin_prefix, s.bin_count[b], s.above, bin_e, bin_d, m, inv_t,
                       s.cut, s.kept_shifted)) {
      s.cut.done = level + 1;
    } else if (s.bin_count[b] <= kCrossingCapacity && gathers_crossing(pred, bin_prefix << digit_shift(level), inv_t)) {
      // (below the single-value level: resolve_in_bin resolves from there on)
      // few enough candidates for the caller to gather and rank: stop here
      stop_at_crossing_bin(level, bin_prefix, s.bin_count[b], s);
    } else {
      s.prefix = bin_prefix;  // refine inside this bin with the next digit
      if constexpr (Predicate::kKeptShifted) s.refined = BinTotals{s.bin_count[b], bin_e, bin_d};
    }
    return;
  }
  // Every candidate fits: keep all keys with the current prefix.
  s.cut.full_from = level == 0 ? 0 : static_cast<uint64_t>(s.prefix) << (digit_shift(level) + digit_bits(level));
  s.cut.selected = s.above.count;
  s.cut.mass = s.above.e;
  if constexpr (Predicate::kKeptShifted) s.kept_shifted = s.above.d;
  s.cut.done = level + 1;
}

// After a selection resolved at the last digit (thread 0): appends to
// keys[s.gathered, ...) the keys of the candidate range above the tie key,
// each as often as its last-digit bin counts it (bin b <-> key
// prefix * 1024 + b exactly), then tie_count copies of the tie key. With the
// keys above the range, which that digit pass gathered into keys[0,
// s.gathered), these are the selected keys. Returns how many keys[] holds.
LK_DEVICE inline int64_t append_last_digit_keys(const TopHStorage& s, int64_t tie_count, uint32_t* keys) {
  const Cut& cut = s.cut;
  int64_t n = s.gathered;
  const uint32_t range_base = cut.tie_key & ~kLastDigitMask;
  for (uint32_t b = kLastDigitMask; b > (cut.tie_key & kLastDigitMask); --b) {
    for (unsigned c = 0; c < s.bin_count[b]; ++c) keys[n++] = range_base | b;
  }
  for (int64_t j = 0; j < tie_count; ++j) keys[n++] = cut.tie_key;
  return n;
}

// Capped rules: the K selected keys into candidates[0, K), then sorted
// (descending) into sorted[0, K).
template <class scalar_t>
LK_DEVICE inline void gather_and_sort_candidates(const scalar_t* x, int64_t cols, int64_t k, TopHStorage& s,
                                                 uint32_t* candidates, uint32_t* sorted) {
  const Cut& cut = s.cut;
  if (cut.done == kDigitCount) {
    // Resolved at the last digit: the keys above the candidate range were
    // gathered during that pass, and the last histogram holds each key of
    // the range exactly (bin b <-> key prefix * 1024 + b), with counts.
    if (threadIdx.x == 0) append_last_digit_keys(s, cut.tie_keep, candidates);
  } else {
    // Resolved at the first digit (V <= K: every token is selected): one
    // gather pass.
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
      const uint32_t key = core::orderable_key(load_logit(x, i));
      if (key >= cut.full_from) candidates[atomicAdd(&s.gathered, 1)] = key;
    }
  }
  __syncthreads();
  for (int64_t a = threadIdx.x; a < k; a += blockDim.x) sorted[a] = candidates[a];
  // (equal keys are equal values: the sorted keys do not depend on their order)
  block_bitonic_sort(static_cast<int>(k), sorted, LargerKeyFirst{});
}

// Capped rules (thread 0): the rule's scan over the K sorted keys
// (core::capped_keep_count) fixes the final cut and its mass.
LK_DEVICE inline void capped_scan(const TopHParams& p, const core::SoftmaxState& row, const uint32_t* sorted,
                                  Cut& cut) {
  const float inv_t = p.inv_temperature;
  auto z_of = [&](int64_t i) { return core::scaled_logit(core::key_to_float(sorted[i]), inv_t); };
  const int64_t kept = core::capped_keep_count(z_of, p.k, p.rule, core::log_sum_exp(row), p.alpha);
  const uint32_t last = sorted[kept - 1];
  int64_t equal_kept = 0, equal_selected = 0;
  for (int64_t i = 0; i < p.k; ++i) {
    equal_selected += sorted[i] == last;
    equal_kept += i < kept && sorted[i] == last;
  }
  // Tokens with key `last` in the row: all of them were selected unless
  // `last` is the tie key at the K boundary.
  const int64_t total = (cut.tie_keep > 0 && last == cut.tie_key) ? cut.tie_total : equal_selected;
  cut.full_from = static_cast<uint64_t>(last) + 1;
  cut.tie_key = last;
  cut.tie_keep = equal_kept;
  cut.tie_total = total;
  // The kept tokens are sorted[0, kept): their weights, with the draw
  // pass's expression expf(x / T - m) (key_to_float gives x back exactly).
  float mass = 0.0f;
  for (int64_t i = 0; i < kept; ++i) mass += expf(z_of(i) - cut.m);
  cut.mass = mass;
}

// The radix selection of a defined row of max z m: the walk over the first
// digit's histogram (built by pass 1, or here by a digit pass when
// first_digit_built is false), then per further digit a histogram
// (digit_pass) and the walk, until pred resolves the cut into s.cut.
template <Selection kSel, class Predicate, class scalar_t, class KeyOf = LogitKey, class Side = NoSideWork>
LK_DEVICE __forceinline__ void radix_select(const scalar_t* x, int64_t cols, const Predicate pred, float m, float inv_t,
                                            float floor_z, TopHStorage& s, uint32_t* candidates,
                                            bool first_digit_built = true, KeyOf key_of = LogitKey{},
                                            Side side = Side{}) {
  if (threadIdx.x == 0) {
    s.above = BinTotals{0, 0.0f, 0.0f};
    s.cut = Cut{0, 0, 0, 0, 0, 0, RowKind::defined, m, 0.0f};
    if constexpr (Predicate::kKeptShifted) {
      s.kept_shifted = 0.0f;
      s.refined = BinTotals{0, 0.0f, 0.0f};
    }
    s.crossing_pending = false;
    s.prefix = 0;
    s.gathered = 0;
  }
  // The first level whose bins each hold one key value: the last, except for
  // the logits' own keys of 16-bit inputs (bf16 / fp16 values widened to
  // float leave the key's low 13 bits constant, and the second digit's bins
  // span only the low 10), which the walk of the rank selection and of the
  // rules with sums then resolves at the second digit instead of after one
  // more pass that would find the failing bin's tokens in one last-digit bin.
  // (The capped rules gather the selected keys in the last digit's pass.)
  constexpr bool kSixteenBitLogitKeys = sizeof(scalar_t) == 2 && std::is_same_v<KeyOf, LogitKey>;
  constexpr int kSingleValueLevel =
      kSixteenBitLogitKeys && (Predicate::kSums || kSel == Selection::rank) ? 1 : kDigitCount - 1;
  uint32_t prefix = 0;  // digits fixed so far (same in every thread: read back from shared memory)
  for (int level = 0; level < kDigitCount; ++level) {
    bool built = level == 0 && first_digit_built;
    if constexpr (Side::kActive) built = built || (level > 0 && side.next_digit_ready(s, level));
    if (!built) {
      digit_pass<kSel, Predicate::kKeepsCrossing, Predicate::kFixedPointSums>(x, cols, level, prefix, m, inv_t, floor_z,
                                                                              s, candidates, key_of, side);
    }
    __syncthreads();
    if (threadIdx.x == 0) walk(pred, level, kSingleValueLevel, m, inv_t, s);
    __syncthreads();
    if (s.cut.done) break;
    prefix = s.prefix;
  }
}

// The digit passes of a defined row ("exact" and capped rules), and for the
// capped rules the sort and scan of the K selected keys.
template <Selection kSel, class scalar_t>
LK_DEVICE inline void refine_cut(const scalar_t* x, int64_t cols, const TopHParams& p, const FirstDigit& f,
                                 TopHStorage& s) {
  LK_DYNAMIC_SHARED(uint32_t, candidates);  // 2 * k keys (capped rules)
  const auto pred = rule_predicate<kSel>(p, f.row);
  radix_select<kSel>(x, cols, pred, f.row.max, p.inv_temperature, core::neg_infinity(), s, candidates);
  if constexpr (kSel == Selection::capped) {
    uint32_t* sorted = candidates + p.k;
    gather_and_sort_candidates(x, cols, p.k, s, candidates, sorted);
    if (threadIdx.x == 0) capped_scan(p, f.row, sorted, s.cut);
    __syncthreads();
  }
}

// Finds the kept set of the block's row x (pass 1 and the digit passes of the
// top of the file) and leaves it in s.cut (read by every thread after the
// call). Without truncation (Selection::all) only pass 1 runs and every token
// is kept.
template <Selection kSel, class scalar_t>
LK_DEVICE inline void select_cut(const scalar_t* x, int64_t cols, const TopHParams& p, TopHStorage& s) {
  const FirstDigit f = softmax_state_and_first_digit<kSel>(x, cols, p.inv_temperature, s);
  if (threadIdx.x == 0) {
    // Plain sampling keeps every token (full_from = 0): its mass is the
    // row's sum exp(z - m).
    s.cut = Cut{0, 0, 0, 0, 0, 0, row_kind(f.row), f.row.max, f.row.sum_exp};
  }
  __syncthreads();
  if constexpr (kSel != Selection::all) {
    if (s.cut.kind != RowKind::defined) return;
    if constexpr (kSel == Selection::exact) rescale_first_digit_bins<false>(s, f, p.inv_temperature);
    __syncthreads();  // every thread has read cut.kind before thread 0 rewrites cut
    refine_cut<kSel>(x, cols, p, f, s);
  }
}

// The keep decisions of a row's tokens from its cut, one tile of blockDim
// consecutive tokens at a time: every thread calls next() for every tile
// (a block-wide collective when a tie group must be ranked in index order).
template <Selection kSel>
struct KeepTest {
  uint64_t full_from;
  uint32_t tie_key;
  int64_t tie_keep;
  bool need_rank;  // only part of the tie group is kept
  float inv_t, m;
  int64_t running = 0;  // tie tokens in the tiles before (same in every thread)

  LK_DEVICE KeepTest(const Cut& cut, const TopHParams& p)
      : full_from(cut.full_from),
        tie_key(cut.tie_key),
        tie_keep(cut.tie_keep),
        need_rank(cut.tie_keep > 0 && cut.tie_keep < cut.tie_total),
        inv_t(p.inv_temperature),
        m(cut.m) {}

  LK_DEVICE bool next(bool valid, float xv, int* warp_counts) {
    const uint32_t key = core::orderable_key(xv);
    bool positive = true;  // "exact": zero probabilities were not candidates
    if constexpr (kSel == Selection::exact) positive = expf(core::scaled_logit(xv, inv_t) - m) > 0.0f;
    const bool keep = valid && positive && key >= full_from;
    const bool tie = valid && positive && key == tie_key && tie_keep > 0;
    if (!need_rank) return keep || tie;
    const int64_t rank = ordered_rank(tie, running, warp_counts);
    return keep || (tie && rank < tie_keep);
  }
};

template <Selection kSel, class scalar_t>
__global__ void __launch_bounds__(kMaxTopHThreads)
    top_h_mask_kernel(RowsView<scalar_t> rows, int64_t cols, TopHParams params, bool* mask) {
  const scalar_t* x = rows.row(blockIdx.x);
  bool* out = mask + static_cast<int64_t>(blockIdx.x) * cols;
  const int64_t tid = threadIdx.x, stride = blockDim.x;
  const TopHParams p = params.for_row(blockIdx.x);  // (top_h_mask_per_row: the row's alpha and temperature)
  if (!p.truncate) {  // Top-H off for this row (block-uniform): every token kept, the row unread
    for (int64_t i = tid; i < cols; i += stride) out[i] = true;
    return;
  }
  __shared__ TopHStorage s;
  select_cut<kSel>(x, cols, p, s);
  if (s.cut.kind != RowKind::defined) {
    // NaN or +inf: nothing is kept; all -inf: token 0 only.
    for (int64_t i = tid; i < cols; i += stride) out[i] = s.cut.kind == RowKind::all_masked && i == 0;
    return;
  }
  // ---- write pass ----
  KeepTest<kSel> keep(s.cut, p);
  for (int64_t base = 0; base < cols; base += stride) {
    const int64_t i = base + tid;
    const bool valid = i < cols;
    const bool kept = keep.next(valid, valid ? load_logit(x, i) : 0.0f, s.warp_counts);
    if (valid) out[i] = kept;
  }
}

// One token per row by inverse CDF over the kept weights w_i = exp(z_i - m)
// (dropped tokens: w = 0). The selection gives their sum, total = cut.mass
// (see the top of the file), so one pass follows it:
//   draw pass    tile by tile, a block-wide inclusive scan of w on top of the
//                mass of the tiles before; the token is the first one of
//                positive weight whose running sum exceeds u * total. The
//                pass stops at that tile.
// A token of zero weight is never returned. total and the scan's sums are
// different roundings of the same sum: when the scan ends at or below
// u * total (u close to 1), no token crosses, the pass has read the whole
// row, and the last kept token of positive weight is returned (each thread
// tracks its own last one; reduced only then, which is block-uniform).
template <Selection kSel, class scalar_t>
__global__ void __launch_bounds__(kMaxTopHThreads)
    sample_kernel(RowsView<scalar_t> rows, int64_t cols, TopHParams params, const float* uniform, int64_t* tokens) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = rows.row(row);
  const int64_t tid = threadIdx.x;
  const TopHParams p = params.for_row(row);  // (sample_per_row: the row's alpha and temperature)
  __shared__ TopHStorage s;
  if (kSel == Selection::all || p.truncate) {
    select_cut<kSel>(x, cols, p, s);
  } else {  // Top-H off for this row (block-uniform): every token, as plain sampling (full_from = 0)
    select_cut<Selection::all>(x, cols, p, s);
  }
  if (s.cut.kind != RowKind::defined) {
    if (tid == 0) tokens[row] = s.cut.kind == RowKind::all_masked ? 0 : -1;
    return;
  }
  const float inv_t = p.inv_temperature, m = s.cut.m;
  const float target = uniform[row] * s.cut.mass;

  // ---- draw pass ----
  // The keep test counts the tie group's tokens in index order: a block
  // collective, called by every thread once per tile (as the draw does).
  KeepTest<kSel> keep(s.cut, p);
  auto weight = [&](int64_t i, bool valid) {
    const float xv = valid ? load_logit(x, i) : 0.0f;
    return keep.next(valid, xv, s.warp_counts) ? expf(core::scaled_logit(xv, inv_t) - m) : 0.0f;
  };
  const int64_t found = block_inverse_cdf_draw(cols, target, weight, s.mass_scratch, s.index_scratch);
  if (tid == 0) tokens[row] = found;
}

}  // namespace logitkit::cuda
