// CUDA kernels of filter_mask and filter_sample (the row-statistics rules of
// csrc/core/row_filters.h, docs/sampling.md), also built for the host through
// the SIMT emulator. Host launch and registration: top_h.cu.
//
// One block per row, one parameterised body for every rule (the rules differ
// only in core::filter_cut's threshold). Passes over the row:
//   ranks    only for top-k / min_tokens_to_keep > 1: the k-th largest
//            logit (kth_largest_logit: 1 to 3 digit passes, bf16 / fp16 1
//            or 2), whose first pass also finds the row max. For a top-k
//            that may gather (below), top_k_with_survivors: the selection
//            stops at a bin of at most kGatherCapacity tokens from the
//            top and the gather pass finds the k-th in it. A larger top-k
//            whose cut needs pass 1 (and no keep floor) stops at a crossing
//            bin of at most kTopKCrossingCapacity tokens instead
//            (top_k_may_stop_at_crossing): pass 1 gathers its keys and counts
//            the tokens above it, and resolve_top_k_crossing finds the k-th
//            among them after the pass (one or two digit passes fewer: on
//            dense rows the first digit's bin usually suffices). When the cut
//            needs nothing more (temperature, top-k, min-p, the floor:
//            core::needs_row_sums), pass 1 is skipped.
//   Top-H    ("hf", K <= 256, core::uses_top_h; first in the chain): its K
//            candidates (x >= x_K) gathered as a top-k of K (the selection's
//            shortcuts or one pass; never overflowing: x_K's tie group is
//            counted, gather_top_h_candidates), ranked, and top_h_mask's scan
//            keeps a prefix of them (top_h_prefix); top-k and the floor are
//            ranks in that prefix, and everything below runs over it as over
//            gathered survivors. The write and the draw also test Top-H's
//            last kept token (top_h_keeps); a tie group split by Top-H's cut
//            costs one partial pass (index_in_tie_group).
//   gather   instead of pass 1 and top-p's passes, for a top-k of at most
//            kGatheredSurvivors tokens whose cut needs sums: one pass
//            copies the survivors' keys to shared memory (none when the
//            selection's last digit spelled them out:
//            keep_last_digit_survivors), a bitonic sort orders them, and the
//            statistics and top-p run over that copy (gathered_state,
//            gathered_top_p).
//   pass 1   every thread folds its tokens (strided, coalesced) into a
//            core::FilterState; one block reduction; every thread then
//            computes the same cut (threshold, max). With top_p < 1 the
//            pass also builds the first radix digit's histogram of the top-k
//            survivors, as Top-H "exact"'s pass 1 does (per-bin references,
//            each thread's top bin as a softmax state, rescaled to the row
//            max after the pass: top_h_kernels.cuh), its sums in 64-bit
//            fixed point (FixedPointBins: the same bits in any thread
//            order, so the kept set is the same run to run; also in the
//            top-p and typical digit passes).
//   top-p    only for a row with top_p < 1: Top-H "exact"'s radix selection
//            (radix_select) with TopPPredicate over the top-k survivors: the
//            walk over the first digit, then 0 to 2 digit passes (bf16 /
//            fp16: 0 or 1, their second digit's bins holding one value each),
//            stopping at the first digit whose failing bin holds one token. It gives
//            top-p's threshold and the kept K, D that epsilon / eta
//            (core::filter_cut) use. When no later rule reads those
//            (core::top_p_cut_may_wait: no typical, epsilon, eta), the
//            selection also stops at a crossing bin of at most
//            kCrossingCapacity candidates, which pass 2 gathers and
//            resolve_crossing resolves after it (as for typical below):
//            0 to 1 digit passes (2 when the second digit's crossing bin
//            holds more, e.g. a tie group).
//   typical  only for a row with typical_p < 1 (typical_passes): the
//            radix selection again, keyed on -|z - c| (1 or 2 digit passes,
//            the first included; 3 when the second digit's crossing bin
//            holds more than kCrossingCapacity candidates), after one pass for
//            the candidates' sums when no earlier pass summed them: the
//            cut's center and radius. After top-p's digit passes, or that
//            pass of the candidates' sums (pass 1 then builds the logits'
//            first digit, whose bins give the estimate), which guess
//            typical's first digit around an estimated center
//            (TypicalFirstDigitGuess; typical_passes), the first digit pass also builds the
//            guessed crossing bin's second digit (GuessedBinSecondDigit):
//            no second digit pass where the guess holds. The selection stops at a crossing bin
//            of at most kCrossingCapacity candidates, which pass 2 (mask or
//            sample) gathers (weight_or_gather) and resolve_crossing
//            resolves after it. Over the gathered survivors: no pass
//            (gathered_typical).
//   mask     pass 2 writes the kept test (core::kept_weight). -> 2 passes
//            (+ 0 to 2 with top-p, + 1 to 4 with typical)
//   sample   pass 2 sums the kept weights (mass, shifted sum, count; block
//            reduction), each warp over its own contiguous share of the
//            row, and the warp whose share holds u * mass re-reads that
//            share up to the drawn token (kept_sums_and_draw)
//                                                            -> 2 passes
//            + 1 / warps of a pass (1/16 at 512 threads), also when
//            top-p's walk has summed the kept set already (an earlier
//            version skipped pass 2 there and drew tile by tile up to the
//            token; two draw bodies in one kernel made nvcc outline its
//            shuffles into calls with a stack frame, which the build
//            rejects); + one pass for the raw log-prob, only when asked for.
// A token of zero weight is never returned; when rounding makes the search
// end at or below u * mass, the last kept token of positive weight is returned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../core/row_filters.h"
#include "../frontend/row_filters.h"
#include "collectives.cuh"
#include "launch_config.h"
#include "row_kernels.cuh"
#include "top_h_kernels.cuh"

namespace logitkit::cuda {

// Rows with a top-k of at most this many tokens gather their survivors into
// shared memory (at most kGatherCapacity of them, ties included), and pass 1's
// statistics and top-p's selection run over that copy instead of over the row
// (filter_pass_one). The 128 slots left over hold the ties across the k-th
// logit: on N(0, sigma^2) bf16 rows of 128256 logits (sigma 1 to 5) the
// survivors of top_k = 896 were at most 953; a larger tie group overflows the
// gather, and the row takes pass 1 over the row after it (one pass more).
constexpr int kGatheredSurvivors = 896;
static_assert(kGatheredSurvivors + 128 <= kGatherCapacity, "room for ties at the k-th logit");
static_assert(core::kFusedTopHMaxCount <= kGatheredSurvivors, "Top-H's K candidates are gathered");

// A top-k that does not gather its survivors (more than kGatheredSurvivors,
// or Top-H not first) and whose cut needs pass 1 lets its selection stop at a
// crossing bin of at most this many tokens (RankPredicate::stops_at_crossing):
// pass 1 then gathers the bin's keys (top_k_crossing_survivor) and finds the
// k-th largest among them after the pass (resolve_top_k_crossing), instead of
// one or two more digit passes. On N(0, sigma^2) rows of 128256 fp32 logits
// the first digit's bin holding the 1000-th to 4000-th largest holds about
// 2000 to 2300 tokens at sigma = 1 and 700 to 3300 at sigma = 3, the 8000-th's
// 3300 to 3600 and 5500 to 5700, so 8192 keys let the first digit pass suffice
// for those rows. The keys (32 KiB) and the selection's scratch are the
// kernels' dynamic shared memory (TopKCrossingShared): with the static
// RowFilterStorage (about 45 KiB) they pass the 48 KiB a block gets without
// opting in (the launch opts in: DeviceContext::allow_dynamic_shared); two
// blocks take about 156 KiB of an SM's 164 KiB on sm_80.
constexpr int kTopKCrossingCapacity = 8192;

// The filter kernels' dynamic shared memory: the crossing bin's keys, in the
// atomics' order (pass 1), and the scratch of the selection among them and
// of their survivors' sums (resolve_top_k_crossing).
struct TopKCrossingShared {
  uint32_t keys[kTopKCrossingCapacity];
  KeySelectScratch select;
};

// typical's guessed histograms (after top-k's crossing is resolved, in the
// same dynamic shared memory): its first digit around an estimated center,
// built in top-p's digit passes (TypicalFirstDigitGuess) or in the pass
// that sums typical's candidates (typical_passes), then the second digit of
// the guessed crossing bin, built in typical's first digit pass
// (GuessedBinSecondDigit). Counts and fixed-point weights, as
// TopHStorage's; `built`: the first one holds a guess.
struct DistanceGuessBins {
  unsigned count[kBins];
  unsigned long long fixed_e[kBins];
  int built;
};

union FilterDynamicShared {
  TopKCrossingShared top_k_crossing;
  DistanceGuessBins guess;
};
constexpr std::size_t kTopKCrossingBytes = sizeof(FilterDynamicShared);

LK_DEVICE inline FilterDynamicShared& filter_dynamic_shared() {
  LK_DYNAMIC_SHARED(FilterDynamicShared, shared);
  return *shared;
}
LK_DEVICE inline TopKCrossingShared& top_k_crossing_shared() { return filter_dynamic_shared().top_k_crossing; }
LK_DEVICE inline DistanceGuessBins& distance_guess_bins() { return filter_dynamic_shared().guess; }

// Adds a candidate of weight e to a guessed histogram's bin.
LK_DEVICE inline void add_to_guess(DistanceGuessBins& g, int bin, float e, float fixed_one) {
  atomicAdd(&g.count[bin], 1u);
  atomicAdd(&g.fixed_e[bin], FixedPointBins::term(e, fixed_one));
}

// Adds a candidate (logit xv, z, weight e) to the guess of typical's first
// digit, keyed by its distance -|z - center| from the guessed center.
LK_DEVICE inline void add_to_distance_guess(float center, float xv, float z, float e, float fixed_one) {
  add_to_guess(distance_guess_bins(), static_cast<int>(DistanceKey{center}(xv, z) >> digit_shift(0)), e, fixed_one);
}

LK_DEVICE inline void clear_guess(DistanceGuessBins& g) {
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    g.count[b] = 0u;
    g.fixed_e[b] = 0ull;
  }
}

// Side work of top-p's digit passes on a row whose typical follows
// (`active`, block-uniform): typical's first digit (distance keys
// -|z - c'|) of the tokens top-p keeps or may keep (keys in or above the
// pass's candidate range, top-k's survivors, weight > 0), around the center
// c' = m + D / K of the kept sums estimated from the sums above the range
// (s.above) and of the range (s.refined; begin: the exact center once
// top-p's cut is known would need one more pass). typical_passes walks it to
// guess typical's crossing bin.
struct TypicalFirstDigitGuess {
  static constexpr bool kActive = true;
  bool active;
  float m, floor_z, fixed_one, limit;  // limit: top-p's mass limit
  float center = 0.0f;
  uint32_t lowest_prefix = 0;
  int prefix_shift = 32;
  LK_DEVICE void begin(const TopHStorage& s, int level, uint32_t prefix) {
    if (!active) return;
    DistanceGuessBins& g = distance_guess_bins();
    clear_guess(g);
    if (threadIdx.x == 0) g.built = 1;
    // c' from the kept sums: the tokens above the range, plus the part of the
    // range top-p still keeps (mass limit - above.e, at most the range's),
    // counted at the range's mean z - m (refined.d / refined.e).
    const float part = fminf(fmaxf(limit - s.above.e, 0.0f), s.refined.e);
    const float kept_e = s.above.e + part;
    const float kept_d = s.above.d + (part > 0.0f ? part * (s.refined.d / s.refined.e) : 0.0f);
    center = kept_e > 0.0f ? core::typical_center(m, kept_e, kept_d) : m;
    lowest_prefix = prefix;
    prefix_shift = digit_shift(level) + digit_bits(level);
  }
  LK_DEVICE bool takes(float z, uint32_t key) const {
    return active && (key >> prefix_shift) >= lowest_prefix && z >= floor_z;
  }
  LK_DEVICE void add(float xv, float z, uint32_t, float e) const {
    if (e != 0.0f) add_to_distance_guess(center, xv, z, e, fixed_one);
  }
  LK_DEVICE bool next_digit_ready(TopHStorage&, int) const { return false; }
};

// Side work of typical's first digit pass (exact center c) given a guessed
// crossing bin (guess_bin >= 0): the second digit of the candidates whose
// distance key has first digit guess_bin, exactly as digit_pass would build
// it at level 1 with that prefix (same tokens, the same fixed-point sums,
// d e left 0: typical's walk reads no d). When the walk over the exact first
// digit refines into guess_bin, next_digit_ready copies it into the
// selection's bins instead of a second digit pass.
struct GuessedBinSecondDigit {
  static constexpr bool kActive = true;
  int guess_bin;
  float floor_z, fixed_one;
  bool building = false;
  LK_DEVICE void begin(const TopHStorage&, int level, uint32_t) {
    building = guess_bin >= 0 && level == 0;
    if (building) clear_guess(distance_guess_bins());
  }
  LK_DEVICE bool takes(float z, uint32_t key) const {
    return building && static_cast<int>(key >> digit_shift(0)) == guess_bin && !(z < floor_z);
  }
  LK_DEVICE void add(float, float, uint32_t key, float e) const {
    if (e != 0.0f) {
      add_to_guess(distance_guess_bins(), static_cast<int>((key >> digit_shift(1)) & ((1u << digit_bits(1)) - 1u)), e,
                   fixed_one);
    }
  }
  // (block-uniform: s.prefix was published by the walk's barrier)
  LK_DEVICE bool next_digit_ready(TopHStorage& s, int level) const {
    if (guess_bin < 0 || level != 1 || s.prefix != static_cast<uint32_t>(guess_bin)) return false;
    const DistanceGuessBins& g = distance_guess_bins();
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
      s.bin_count[b] = g.count[b];
      s.fixed_e[b] = g.fixed_e[b];
      s.fixed_d[b] = 0ull;
    }
    return true;  // (radix_select's barrier before the walk publishes the bins)
  }
};

// top-k's crossing bin left to pass 1 (with_selected_ranks): the keys above
// it (>= above_from, all top-k survivors), their count, the bin's lowest key
// and how many of its keys were gathered (TopKCrossingShared::keys).
struct TopKCrossing {
  uint64_t above_from;
  int64_t above_count;
  uint32_t lowest_key;
  int gathered;
  bool pending;
};

struct RowFilterStorage {
  core::FilterState state_scratch[kReduceScratchSize];
  core::SoftmaxState raw_scratch[kReduceScratchSize];
  core::KeptSums sums_scratch[kReduceScratchSize];
  float mass_scratch[kReduceScratchSize];
  float share_mass[kMaxWarpsPerBlock];  // each warp's kept mass (kept_sums_and_draw)
  int64_t index_scratch[kReduceScratchSize];
  float top_k_x, floor_x;  // the selected ranks' logits (with_selected_ranks), re-read after top-p
  TopKCrossing top_k_crossing;
  TopHStorage radix;  // the radix selections' histograms and walk (top-k, top-p, typical)
  // (the gathered survivors themselves: s.radix.survivors, keys in the gather's
  // (timing's) order, then their z and weights exp(z - m), largest first)
  int gathered_count;     // survivors in the row (only the first kGatherCapacity stored; -1: not gathered yet)
  bool survivors_ranked;  // s.radix.survivors.ranked_z already holds their ranking (kth_largest_of_gathered_range)
  // Top-H first (core::uses_top_h; top_h_prefix): its last kept token (key,
  // index; core::top_h_keeps), that token's rank in index order among the
  // row's tokens of its key (-1: the whole tie group is kept), the ranked
  // candidates the chain's statistics run over, and the tokens of x_K's key in
  // the row (counted by gather_top_h_candidates, else 0).
  uint32_t top_h_last_key;
  int64_t top_h_last_index;
  int top_h_split_rank;
  int top_h_prefix_count;
  int top_h_ties_at_kth;
  // typical's or top-p's crossing bin left to the write / draw pass
  // (s.radix.crossing_pending; typical_passes, top_p_passes): which rule's, its
  // walk's limit, the bin's candidates (z >= crossing_candidate_z, weight > 0)
  // gathered so far (weight_or_gather: index, z and weight in
  // s.radix.survivors' key, ranked_z and ranked_e), the threshold of the
  // tokens below the bin (top-p: the keep floor; typical: none kept), then
  // (resolve_crossing) how many of them are kept (the first ones in the
  // rule's order, their slots in s.radix.survivors.ranked_key) and the
  // radius d* (typical) or threshold (top-p) it found.
  bool crossing_by_distance;  // typical (DistanceKey), else top-p (the logit's key)
  int typical_guess_bin;      // typical's guessed first-digit crossing bin (typical_passes; -1: none)
  float guess_center;         // c' of that guess when the candidates' sums take a pass (typical_passes)
  core::TypicalLimit typical_limit;
  float top_p_limit;
  float crossing_candidate_z;
  float crossing_below_z;
  int crossing_gathered;
  int crossing_kept;
  float crossing_cut;
};

// At most 512 threads per block, and the kernels declare at least 2 blocks
// per SM (__launch_bounds__'s second argument): at most 64 registers per
// thread, 2 blocks of 512 threads per SM. Without the second argument ptxas
// (CUDA 13) kept them to 40 registers, 3 blocks per SM, and spilled 12 to 36
// bytes once top-p's bins moved to 64-bit fixed point; with 1 block per SM,
// the block scans of the sorted survivors (first_group_reaching) took them to
// 68 (write) and 80 (sample) registers, 1 block per SM; with 2 they fit 64
// without spilling (checked by the build, which rejects spills). One block
// runs one row, so batches of fewer rows than twice the SM count (264 on an
// H100) would see no difference either way.
constexpr int kMaxFilterThreads = 512;

// The value (logit for top-p, negated distance for typical) of the lowest key
// a radix selection kept: keys >= full_from, and the whole tie group when the
// last digit resolved the cut. -inf when everything is kept (key 0) or the key
// falls in the NaN range. (The cut's fields are read one by one: a copy of the
// whole Cut went to local memory.)
LK_DEVICE inline float lowest_kept_value(const Cut& cut) {
  const uint64_t lowest_key = cut.tie_keep > 0 ? cut.tie_key : cut.full_from;
  const float value = lowest_key == 0 ? core::neg_infinity() : core::key_to_float(static_cast<uint32_t>(lowest_key));
  return value == value ? value : core::neg_infinity();
}

// top-p's threshold and kept sums for a row whose pass-1 state is st and
// whose first digit pass 1 built (`mine`: this thread's top bin; see the top;
// block-uniform: every thread has the same st). With may_gather_crossing
// (core::top_p_cut_may_wait; not after Top-H), the selection may stop at a
// crossing bin of at most kCrossingCapacity candidates
// (s.radix.crossing_pending): the threshold is then -inf, the kept sums
// unknown, and the write / draw pass gathers the bin (weight_or_gather) for
// resolve_crossing.
template <class scalar_t>
LK_DEVICE inline core::TopPCut top_p_passes(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                            const core::FilterState& st, const TopBinState& mine, bool built,
                                            bool may_gather_crossing, RowFilterStorage& s) {
  const float m = st.sm.max;
  // B*, the bin of the row max with all its tokens (a block collective: before any return).
  const TopBinState best =
      built ? block_reduce(
                  mine, [](const TopBinState& a, const TopBinState& b) { return merge_top_bins(a, b); },
                  empty_top_bin(), s.radix.top_bin_scratch)
            : empty_top_bin();
  if (threadIdx.x == 0) distance_guess_bins().built = 0;  // (published by the barriers below)
  // (without top-p, the first digit that pass 1 built for typical's guess: typical_passes)
  const bool top_p = core::uses_top_p(p, m);  // (block-uniform)
  if (!top_p && !(built && m > core::neg_infinity() && m < core::pos_infinity())) return core::no_top_p_cut(st);
  rescale_first_digit_bins<TopPPredicate::kFixedPointSums>(s.radix, FirstDigit{st.sm, mine, best}, p.inv_temperature);
  if (!top_p) return core::no_top_p_cut(st);
  const TopPPredicate pred{core::top_p_mass_limit(p.top_p, st.sm.sum_exp), may_gather_crossing};
  if (threadIdx.x == 0) {  // (published by the selection's barriers)
    s.crossing_by_distance = false;
    s.top_p_limit = pred.limit;
    s.crossing_candidate_z = p.top_k_z;
    s.crossing_below_z = core::scaled_logit(p.keep_floor, p.inv_temperature);
    s.crossing_gathered = 0;
  }
  __syncthreads();
  const TypicalFirstDigitGuess guess{p.typical_p < 1.0f, m, p.top_k_z, FixedPointBins::one(cols), pred.limit};
  radix_select<Selection::exact>(x, cols, pred, m, p.inv_temperature, p.top_k_z, s.radix, nullptr, true, LogitKey{},
                                 guess);
  // pending: no threshold yet (resolve_crossing finds it after the next pass)
  if (s.radix.crossing_pending) return core::TopPCut{core::neg_infinity(), 0.0f, 0.0f};
  // The lowest kept key as a logit is the threshold (-inf: no cut).
  const float x_cut = lowest_kept_value(s.radix.cut);
  return core::TopPCut{core::scaled_logit(x_cut, p.inv_temperature), s.radix.cut.mass, s.radix.kept_shifted};
}

// Adds a token's kept weight w = exp(d), d = z - m (0: dropped) to a
// thread's kept sums.
LK_DEVICE inline void add_kept_weight(core::KeptSums& sums, float w, float d) {
  if (w > 0.0f) {
    sums.mass += w;
    sums.shifted += d * w;
    sums.count += 1.0f;
  }
}

// Adds a token's kept weight under the cut (0: dropped, or not a Top-H
// survivor: `candidate` false) to a thread's kept sums.
LK_DEVICE inline void add_kept(core::KeptSums& sums, const core::FilterCut& cut, float xv, float inv_t,
                               bool candidate = true) {
  const float w = candidate ? core::kept_weight(cut, xv, inv_t) : 0.0f;
  add_kept_weight(sums, w, core::scaled_logit(xv, inv_t) - cut.max);
}

// The block reductions' combine of kept sums.
struct AddKeptSums {
  LK_DEVICE core::KeptSums operator()(const core::KeptSums& a, const core::KeptSums& b) const {
    return core::KeptSums{a.mass + b.mass, a.shifted + b.shifted, a.count + b.count};
  }
};

// Whether pass 1 builds the first digit of the logits' keys for typical
// (block-uniform): without top-p (whose selection builds typical's guess
// itself, top_p_passes) and after a rule that may raise typical's candidates'
// threshold above top-k's, so that their sums take a pass of their own
// (core::typical_candidates_known), which then also builds the guess of
// typical's first digit (typical_passes).
LK_DEVICE inline bool guesses_typical_in_candidates_pass(const core::FilterParams& p) {
  return p.typical_p < 1.0f && !(p.top_p < 1.0f) && !p.greedy && core::has_threshold_rule(p);
}

// The sums (relative to the row max) of pass 1's first-digit bins whose
// every logit scales to at least threshold_z (thread 0; rescaled by
// top_p_passes).
LK_DEVICE inline BinTotals first_digit_sums_from(float threshold_z, float inv_t, const TopHStorage& s) {
  BinTotals sums{0, 0.0f, 0.0f};
  for (int b = kBins - 1; b >= 0; --b) {
    const float lowest = core::key_to_float(static_cast<uint32_t>(b) << digit_shift(0));
    if (lowest != lowest) continue;  // a NaN bin (empty: the row is defined)
    if (!(core::scaled_logit(lowest, inv_t) >= threshold_z)) break;
    sums.count += s.bin_count[b];
    sums.e += bin_sum_e<TopPPredicate::kFixedPointSums>(s, b);
    sums.d += bin_sum_d<TopPPredicate::kFixedPointSums>(s, b);
  }
  return sums;
}

// typical (core::uses_typical; block-uniform) over the candidates
// z >= cut.threshold: their K and D (top-p's walk or pass 1 summed them,
// unless another rule moved the threshold: then one pass, which without
// top-p also guesses typical's first digit), the center c = m + D / K, then
// Top-H "exact"'s radix selection keyed on the negated distance -|z - c|
// (DistanceKey, TypicalPredicate): 1 to 3 digit passes, the first one
// included (pass 1 could not build it: c was not known), stopping at the
// first digit whose crossing bin holds one token, or (below the last digit)
// at most kCrossingCapacity candidates. In the first case the lowest kept key
// is -d*: cut.center and cut.radius. In the second,
// s.radix.crossing_pending: the radius stays +inf, and the write / draw pass
// decides every candidate by its distance key, gathering the crossing bin's
// (weight_or_gather), after which resolve_crossing finds d* among them.
template <class scalar_t>
LK_DEVICE inline void typical_passes(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                     const core::TopPCut& top_p, RowFilterStorage& s, core::FilterCut& cut) {
  __syncthreads();  // every thread has read top-p's cut before the selection resets it
  core::KeptSums candidates{top_p.mass, top_p.shifted, 0.0f};
  if (!core::typical_candidates_known(p, top_p, cut)) {
    // The pass summing the candidates also builds the guess of typical's first
    // digit when pass 1 built the logits' first digit (no top-p), around c'
    // from its bins wholly above the candidates' threshold.
    // (c' and the fixed-point unit are read from shared memory: few registers
    // held across the loop, kernels at the 64-register limit)
    const bool guess = guesses_typical_in_candidates_pass(p);  // block-uniform
    if (guess) {
      DistanceGuessBins& g = distance_guess_bins();
      clear_guess(g);
      if (threadIdx.x == 0) {
        const BinTotals above = first_digit_sums_from(cut.threshold, p.inv_temperature, s.radix);
        s.guess_center = above.e > 0.0f ? core::typical_center(cut.max, above.e, above.d) : cut.max;
        g.built = 1;
      }
      __syncthreads();
    }
    core::KeptSums mine{0.0f, 0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
      const float xv = load_logit(x, i);
      const float z = core::scaled_logit(xv, p.inv_temperature);
      const float w = core::kept_weight(cut, xv, p.inv_temperature);
      add_kept_weight(mine, w, z - cut.max);
      if (guess && w > 0.0f) add_to_distance_guess(s.guess_center, xv, z, w, s.radix.fixed_one);  // a candidate
    }
    candidates = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f}, s.sums_scratch);
  }
  const float center = core::typical_center(cut.max, candidates.mass, candidates.shifted);
  const TypicalPredicate pred{core::typical_limit(p, candidates.mass)};
  // The crossing bin of typical's first digit as top-p's passes
  // (TypicalFirstDigitGuess) or the candidates' pass above guessed it: the
  // first bin of that histogram, nearest first, at which the exact limit is
  // reached (-1: no guess).
  if (threadIdx.x == 0) {
    const DistanceGuessBins& g = distance_guess_bins();
    int guess_bin = -1;
    if (g.built) {
      const float fixed_one = FixedPointBins::one(cols);
      BinTotals with{0, 0.0f, 0.0f};
      for (int b = kBins - 1; b >= 0 && guess_bin < 0; --b) {
        with.count += g.count[b];
        with.e += FixedPointBins::value(g.fixed_e[b], fixed_one);
        if (g.count[b] > 0 && pred.exceeds(with)) guess_bin = b;
      }
    }
    s.typical_guess_bin = guess_bin;
  }
  __syncthreads();
  const GuessedBinSecondDigit second_digit{s.typical_guess_bin, cut.threshold, FixedPointBins::one(cols)};
  if (threadIdx.x == 0) {  // (published by the selection's barriers)
    s.crossing_by_distance = true;
    s.typical_limit = pred.limit;
    s.crossing_candidate_z = cut.threshold;
    s.crossing_below_z = core::pos_infinity();
    s.crossing_gathered = 0;
  }
  radix_select<Selection::exact>(x, cols, pred, cut.max, p.inv_temperature, cut.threshold, s.radix, nullptr, false,
                                 DistanceKey{center}, second_digit);
  cut.center = center;
  // the lowest kept key is -d* (-inf: no bound); pending: no bound yet
  cut.radius = s.radix.crossing_pending ? core::pos_infinity() : -lowest_kept_value(s.radix.cut);
}

// A token's kept weight in the write / draw pass (i: its index, xv: its
// logit). Without s.radix.crossing_pending, kept_weight under the cut. With
// it, a token is placed by its key as the selection left it (typical: the
// distance key k = key(-|z - c|), the cut's radius then +inf; top-p: the
// logit's key, the cut's threshold then the other rules' alone): above the
// crossing bin, kept_weight under the cut; in it, a candidate
// (z >= s.crossing_candidate_z: typical's candidates, top-k's survivors) of
// weight > 0 weighs 0 for now and is gathered (index, z, w) for
// resolve_crossing; below it, or not a candidate, kept iff
// z >= s.crossing_below_z (typical: never; top-p: where the keep floor
// reaches it, since its z lies below top-p's threshold t_p, see
// core::top_p_cut_may_wait). The selection counted at least the bin's
// candidates (digit_pass: z >= its floor, exp(z - m) > 0; pass 1: the top-k
// survivors), at most kCrossingCapacity.
LK_DEVICE inline float weight_or_gather(const core::FilterCut& cut, float xv, int64_t i, float inv_t, bool pending,
                                        RowFilterStorage& s) {
  if (!pending) return core::kept_weight(cut, xv, inv_t);
  const float z = core::scaled_logit(xv, inv_t);
  const uint32_t key = s.crossing_by_distance ? DistanceKey{cut.center}(xv, z) : core::orderable_key(xv);
  if (key >= s.radix.cut.full_from) return core::kept_weight(cut, xv, inv_t);
  const float w = core::exp_of(z - cut.max);
  if (key < s.radix.cut.tie_key || !(z >= s.crossing_candidate_z)) {  // (tie_key: the bin's lowest key)
    return z >= s.crossing_below_z ? w : 0.0f;
  }
  if (w > 0.0f) {
    const int slot = atomicAdd(&s.crossing_gathered, 1);
    if (slot < kCrossingCapacity) {
      s.radix.survivors.key[slot] = static_cast<uint32_t>(i);  // (rows are shorter than 2^31)
      s.radix.survivors.ranked_z[slot] = z;
      s.radix.survivors.ranked_e[slot] = w;
    }
  }
  return 0.0f;
}

// The cut of a rule that keeps a prefix of n slots in its order (a block
// collective): sorts the slots 0 .. n-1 into `order` (before(a, b): slot a
// comes first; block_bitonic_sort), then keeps the groups of equal slots
// (same_group) whose predecessors' weights, after `carry` (the mass of what
// comes before every slot), have not reached the rule's limit
// (reached(mass_before, position); first_group_reaching). Returns the number
// kept: order[0, kept).
template <class Before, class SameGroup, class Weight, class Reached>
LK_DEVICE inline int sorted_prefix_cut(int n, uint32_t* order, Before before, SameGroup same_group, Weight weight,
                                       float carry, Reached reached, RowFilterStorage& s) {
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) order[a] = a;
  block_bitonic_sort(n, order, before);
  return first_group_reaching(
      n, carry, [&](int r) { return weight(order[r]); },
      [&](int r) { return r == 0 || !same_group(order[r - 1], order[r]); }, reached, s.mass_scratch, s.index_scratch);
}

// typical's cut over n candidates in slots 0 .. n-1 (a block collective):
// sorts the slots closest to c first (the larger distance key
// key_of(slot) = key(-|z - c|) first, equal keys by tie_before) into
// `order`; then, as TypicalPredicate's walk keeps them, a candidate is kept
// iff the candidates strictly closer to c (the closer slots and `closer`, the
// mass and count of candidates closer than every slot) have not reached the
// limit (core::typical_reached), so the crossing candidate and its ties are
// kept (first_group_reaching). The kept slots are order[0, count); the radius
// d* is the largest kept distance, the last kept one's (-inf if none).
struct TypicalKept {
  int count;
  float radius;
};

template <class KeyOf, class TieBefore>
LK_DEVICE inline TypicalKept typical_cut_over_slots(int n, float center, const float* z, const float* weight,
                                                    KeyOf key_of, TieBefore tie_before, const core::KeptSums& closer,
                                                    const core::TypicalLimit& limit, uint32_t* order,
                                                    RowFilterStorage& s) {
  const int kept = sorted_prefix_cut(
      n, order,
      [&](uint32_t a, uint32_t b) {
        const uint32_t key_a = key_of(a), key_b = key_of(b);
        return key_a > key_b || (key_a == key_b && tie_before(a, b));
      },
      [&](uint32_t a, uint32_t b) { return key_of(a) == key_of(b); }, [&](uint32_t a) { return weight[a]; },
      closer.mass,
      [&](float closer_mass, int r) {
        return core::typical_reached(closer_mass, closer.count + static_cast<float>(r), limit);
      },
      s);
  return TypicalKept{kept, kept > 0 ? core::typical_distance(z[order[kept - 1]], center) : core::neg_infinity()};
}

// After the pass that gathered the crossing bin (a block collective;
// s.radix.crossing_pending): the rule's cut among its n candidates, which
// sets crossing_kept (the kept ones' slots come first in
// s.radix.survivors.ranked_key) and the cut the draw tests (returned).
// - typical: typical_cut_over_slots, the distance keys computed from z in
//   every compare (all four survivor arrays are in use), ties by token index
//   (the order, not the gather's timing, sets the sums), the candidates above
//   the bin (s.radix.above) closer than all of them; the radius d*. The first
//   candidate is always kept: the walk found the totals above the bin short
//   of the limit.
// - top-p: the slots sorted by z, largest first, ties by token index; top-p's
//   walk goes on over them from the mass above the bin (first_group_reaching:
//   the crossing token and its ties are kept, as TopPPredicate keeps them),
//   giving top-p's threshold t_p, the last kept z; the final threshold is
//   max(t0, min(f, t_p)) (core::top_p_cut_may_wait; t0: the cut's threshold
//   without top-p, f: the keep floor), which keeps a prefix of that order.
LK_DEVICE inline core::FilterCut resolve_crossing(core::FilterCut cut, RowFilterStorage& s) {
  __syncthreads();  // the gather is complete
  const int gathered = s.crossing_gathered;
  const int n = gathered < kCrossingCapacity ? gathered : kCrossingCapacity;
  auto& bin = s.radix.survivors;  // key: the token index, ranked_z: z, ranked_e: the weight
  if (s.crossing_by_distance) {   // block-uniform
    const float center = cut.center;
    const core::KeptSums closer{s.radix.above.e, 0.0f, static_cast<float>(s.radix.above.count)};
    const TypicalKept kept = typical_cut_over_slots(
        n, center, bin.ranked_z, bin.ranked_e,
        [&](uint32_t a) { return core::orderable_key(-core::typical_distance(bin.ranked_z[a], center)); },
        [&](uint32_t a, uint32_t b) { return bin.key[a] < bin.key[b]; }, closer, s.typical_limit, bin.ranked_key, s);
    if (threadIdx.x == 0) {
      s.crossing_kept = kept.count;
      s.crossing_cut = kept.radius;
    }
  } else {
    uint32_t* order = bin.ranked_key;
    const float limit = s.top_p_limit;
    const int top_p_kept = sorted_prefix_cut(
        n, order,
        [&](uint32_t a, uint32_t b) {  // larger z first, ties by token index
          return bin.ranked_z[a] > bin.ranked_z[b] || (bin.ranked_z[a] == bin.ranked_z[b] && bin.key[a] < bin.key[b]);
        },
        [&](uint32_t a, uint32_t b) { return bin.ranked_z[a] == bin.ranked_z[b]; },
        [&](uint32_t a) { return bin.ranked_e[a]; }, s.radix.above.e,
        [&](float mass_before, int) { return core::top_p_reached(mass_before, limit); }, s);
    // (top_p_kept is never 0: the walk found the mass above the bin short of the limit)
    const float top_p_z = top_p_kept > 0 ? bin.ranked_z[order[top_p_kept - 1]] : cut.max;
    const float floor_z = s.crossing_below_z;
    const float threshold = core::max_of(cut.threshold, floor_z < top_p_z ? floor_z : top_p_z);
    int64_t mine = 0;  // the kept candidates: z >= threshold, a prefix of the order
    for (int r = static_cast<int>(threadIdx.x); r < n; r += static_cast<int>(blockDim.x))
      mine += bin.ranked_z[order[r]] >= threshold ? 1 : 0;
    const int64_t kept = block_reduce(mine, [](int64_t a, int64_t b) { return a + b; }, int64_t{0}, s.index_scratch);
    if (threadIdx.x == 0) {
      s.crossing_kept = static_cast<int>(kept);
      s.crossing_cut = threshold;
    }
  }
  __syncthreads();
  if (s.crossing_by_distance) {
    cut.radius = s.crossing_cut;
  } else {
    cut.threshold = s.crossing_cut;
  }
  return cut;
}

// The k-th largest logit x of the row (k < cols; a block collective): Top-H's
// radix selection over the logits' orderable keys, counting (Selection::rank)
// with RankPredicate{k - 1}: it fails at the first bin where the count from
// the top reaches k and stops there once that bin holds one key value, the
// k-th largest token's (ties: the same value as torch.topk's k-th). 1 to 3
// digit passes (bf16 / fp16: 1 or 2), the first included; that one also
// leaves the row max in s.radix.row_max_x. With `above` (k <= kGatheredSurvivors;
// top_k_with_survivors), the selection stops early at a bin whose tokens and
// those above it are at most kGatherCapacity (cut.tie_total 0: no value
// returned), and its last digit pass gathers the keys above its candidate
// range into `above`. With may_stop_at_crossing (inv_t: the row's 1/T), it may
// stop at a crossing bin of at most kTopKCrossingCapacity tokens
// (RankPredicate::stops_at_crossing; s.radix.crossing_pending, no value
// returned), which pass 1 resolves (with_selected_ranks).
template <class scalar_t>
LK_DEVICE inline float kth_largest_logit(const scalar_t* x, int64_t cols, int64_t k, RowFilterStorage& s,
                                         uint32_t* above = nullptr, bool may_stop_at_crossing = false,
                                         float inv_t = 1.0f) {
  __syncthreads();  // every thread has read the previous selection's cut
  const int64_t crossing_capacity = may_stop_at_crossing ? kTopKCrossingCapacity : 0;
  const RankPredicate pred{{k - 1}, above != nullptr ? kGatherCapacity : 0, crossing_capacity, inv_t};
  radix_select<Selection::rank>(x, cols, pred, 0.0f, 1.0f, core::neg_infinity(), s.radix, above, false);
  return core::key_to_float(s.radix.cut.tie_key);
}

// Whether a row may gather its top-k survivors (block-uniform): top-k keeps
// at most kGatheredSurvivors tokens (before ties) and the cut needs their
// sums. Rows with a NaN, +inf or all -inf max take pass 1 (gathers_survivors).
LK_DEVICE inline bool may_gather_survivors(const core::RankCounts& ranks, const core::FilterParams& p) {
  return ranks.top_k > 0 && ranks.top_k <= kGatheredSurvivors && core::needs_row_sums(p);
}

// Whether top-k's selection may stop at a crossing bin that pass 1 resolves
// (block-uniform; kTopKCrossingCapacity): a top-k that does not gather its
// survivors, Top-H not first, a cut that needs pass 1 (core::needs_row_sums),
// and no keep floor (its logit would wait for the k-th as well).
LK_DEVICE inline bool top_k_may_stop_at_crossing(const core::RankCounts& ranks, const core::FilterParams& p,
                                                 bool top_h) {
  return !top_h && ranks.top_k > 0 && ranks.floor == 0 && !may_gather_survivors(ranks, p) && core::needs_row_sums(p);
}

// Right after top-k's selection (a block collective; with
// top_k_may_stop_at_crossing): whether it stopped at a crossing bin, which is
// then kept for pass 1 in s.top_k_crossing (the radix storage's flag is reset
// for the selections that follow).
LK_DEVICE inline void keep_top_k_crossing(RowFilterStorage& s) {
  if (threadIdx.x == 0) {
    TopKCrossing& c = s.top_k_crossing;
    const Cut& cut = s.radix.cut;
    c.pending = s.radix.crossing_pending;
    c.above_from = cut.full_from;
    c.above_count = cut.selected;
    c.lowest_key = cut.tie_key;
    c.gathered = 0;
    s.radix.crossing_pending = false;
  }
  __syncthreads();
}

// Pass 1 over a row whose top-k selection stopped at a crossing bin: a
// token's z when it lies above the bin (a top-k survivor whatever the k-th
// largest is), else -inf; the bin's keys are gathered for
// resolve_top_k_crossing, which joins its survivors after the pass.
LK_DEVICE inline float top_k_crossing_survivor(float xv, float inv_t, TopKCrossing& c) {
  const uint32_t key = core::orderable_key(xv);
  if (key >= c.above_from) return core::scaled_logit(xv, inv_t);
  if (key >= c.lowest_key) {
    const int slot = atomicAdd(&c.gathered, 1);
    if (slot < kTopKCrossingCapacity) top_k_crossing_shared().keys[slot] = key;
  }
  return core::neg_infinity();
}

// One pass (a block collective): the orderable keys of the tokens x with
// keep(x) into s.radix.survivors.key, in the atomics' (timing's) order.
// Returns how many the row holds (every thread); only the first
// kGatherCapacity are stored. Resets survivors_ranked.
template <class scalar_t, class Keep>
LK_DEVICE inline int gather_keys(const scalar_t* x, int64_t cols, RowFilterStorage& s, Keep keep) {
  __syncthreads();  // every thread has read gathered_count (filter_pass_one)
  if (threadIdx.x == 0) {
    s.gathered_count = 0;
    s.survivors_ranked = false;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float xv = load_logit(x, i);
    if (keep(xv)) {
      const int slot = atomicAdd(&s.gathered_count, 1);
      if (slot < kGatherCapacity) s.radix.survivors.key[slot] = core::orderable_key(xv);
    }
  }
  __syncthreads();
  return s.gathered_count;
}

// Right after top-k's selection (a block collective): when its last digit
// resolved the k-th largest key x_k, the survivors' keys are known without a
// gather pass: the keys above the last candidate range (gathered by that
// pass), the range's keys above x_k and x_k's tie group (append_last_digit_keys).
// They are top-k's survivors z >= z_k unless a key below x_k scales to the
// same z (z = x * (1/T) rounds distinct x to one float: T < 1, adjacent
// floats), whose tokens then survive too: such rows (and selections resolved
// at an earlier digit, or more than kGatherCapacity survivors) are left to
// the gather pass (gathered_count = -1). Top-H's candidates (top_h: x >= x_K,
// ranked by x) need neither check: x_K's tie group is stored up to the
// capacity, its size counted in s.top_h_ties_at_kth (as gather_top_h_candidates).
LK_DEVICE inline void keep_last_digit_survivors(float inv_t, bool top_h, RowFilterStorage& s) {
  if (threadIdx.x == 0) {
    const Cut& cut = s.radix.cut;
    const uint32_t key = cut.tie_key;
    const bool resolved_last = cut.done == kDigitCount && cut.tie_total > 0;
    const bool fits = cut.selected + cut.tie_total <= kGatherCapacity;
    const float z_k = core::scaled_logit(core::key_to_float(key), inv_t);
    const bool none_below = !key_below_reaches(key, z_k, inv_t);
    s.survivors_ranked = false;
    s.gathered_count = -1;
    if (resolved_last && (top_h || (fits && none_below))) {
      const int64_t room = kGatherCapacity - cut.selected;  // (> 0: fewer than K keys lie above x_K)
      const int64_t ties = cut.tie_total < room ? cut.tie_total : room;
      s.gathered_count = static_cast<int>(append_last_digit_keys(s.radix, ties, s.radix.survivors.key));
      if (top_h) s.top_h_ties_at_kth = static_cast<int>(cut.tie_total);
    }
  }
  __syncthreads();
}

// Sorts the n gathered keys, largest first (block_bitonic_sort), into
// s.radix.survivors.ranked_key, and as z = x * (1/T) into
// ranked_z (monotone in x: the z are sorted too), and stores the x of rank `select_rank` (if any) in
// s.top_k_x. The gather's slots follow the atomics' timing; what is summed
// below runs over this order, which depends on the values alone (equal keys
// are equal values), so the results are the same run to run
// (docs/determinism.md).
LK_DEVICE inline void rank_gathered(int n, float inv_t, RowFilterStorage& s, int64_t select_rank = -1) {
  auto& bin = s.radix.survivors;
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) bin.ranked_key[a] = bin.key[a];
  block_bitonic_sort(n, bin.ranked_key, LargerKeyFirst{});
  for (int rank = static_cast<int>(threadIdx.x); rank < n; rank += static_cast<int>(blockDim.x)) {
    const float x = core::key_to_float(bin.ranked_key[rank]);
    bin.ranked_z[rank] = core::scaled_logit(x, inv_t);
    if (rank == select_rank) s.top_k_x = x;
  }
  __syncthreads();
}

// After top-k's selection stopped early (cut.tie_total 0; a block
// collective): one pass gathers the keys >= the bin's lowest key (at most
// kGatherCapacity: the walk counted them) into s.radix.survivors.key, and the k-th
// largest of them is x_k (the key of rank k - 1 in rank_gathered's sort, which
// filter_pass_one then uses as it is). The gathered keys are then top-k's
// survivors and the range's keys below x_k (filter_pass_one keeps the prefix
// z >= z_k of their ranking), unless the key just below the range scales to
// z_k (see keep_last_digit_survivors; not for Top-H's candidates, top_h):
// gathered_count = -1, the gather pass.
template <class scalar_t>
LK_DEVICE inline float kth_largest_of_gathered_range(const scalar_t* x, int64_t cols, int64_t k, float inv_t,
                                                     bool top_h, RowFilterStorage& s) {
  const uint32_t from = static_cast<uint32_t>(s.radix.cut.full_from);  // (< 2^32: a bin's lowest key)
  const int n = gather_keys(x, cols, s, [&](float xv) { return core::orderable_key(xv) >= from; });
  rank_gathered(n, inv_t, s, k - 1);  // (ranked once: filter_pass_one keeps this ranking)
  const float top_k_x = s.top_k_x;
  const float z_k = core::scaled_logit(top_k_x, inv_t);
  if (threadIdx.x == 0) {
    const bool below_survives = !top_h && key_below_reaches(from, z_k, inv_t);
    s.survivors_ranked = !below_survives;
    if (below_survives) s.gathered_count = -1;
  }
  __syncthreads();
  return top_k_x;
}

// top-k's k-th largest logit for a row that may gather its survivors
// (may_gather_survivors; a block collective): the selection with early stop,
// leaving the survivors' keys in s.radix.survivors.key (gathered_count of them; -1:
// the gather pass collects them).
template <class scalar_t>
LK_DEVICE inline float top_k_with_survivors(const scalar_t* x, int64_t cols, int64_t k, float inv_t, bool top_h,
                                            RowFilterStorage& s) {
  const float top_k_x = kth_largest_logit(x, cols, k, s, s.radix.survivors.key);
  if (s.radix.cut.tie_total == 0) return kth_largest_of_gathered_range(x, cols, k, inv_t, top_h, s);  // block-uniform
  keep_last_digit_survivors(inv_t, top_h, s);
  return top_k_x;
}

// top-k's and the keep floor's logits (core::rank_counts; block-uniform),
// selected in the kernel: no torch.topk and no host read of the largest k.
// Also left in shared memory for filter_pass_one to read back after top-p.
template <class scalar_t>
LK_DEVICE inline core::FilterParams with_selected_ranks(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                                        RowFilterStorage& s) {
  const core::RankCounts ranks = core::rank_counts(p, cols);
  const bool top_h = core::uses_top_h(p, cols);  // (block-uniform)
  float top_k_x = core::neg_infinity(), floor_x = core::pos_infinity();
  if (top_h) {
    // Top-H first: its K candidates (x >= x_K, the K-th largest); top-k and
    // the floor then come from their ranking (top_h_prefix).
    if (threadIdx.x == 0) s.top_h_ties_at_kth = 0;
    top_k_x = top_k_with_survivors(x, cols, static_cast<int64_t>(p.top_h_count), p.inv_temperature, true, s);
  } else if (may_gather_survivors(ranks, p)) {
    top_k_x = top_k_with_survivors(x, cols, ranks.top_k, p.inv_temperature, false, s);
  } else if (top_k_may_stop_at_crossing(ranks, p, top_h)) {
    // (a placeholder when the selection stopped at a crossing bin: pass 1 resolves it)
    top_k_x = kth_largest_logit(x, cols, ranks.top_k, s, nullptr, /*may_stop_at_crossing=*/true, p.inv_temperature);
    keep_top_k_crossing(s);
  } else if (ranks.top_k > 0) {
    top_k_x = kth_largest_logit(x, cols, ranks.top_k, s);
  }
  if (ranks.floor > 0 && !top_h)
    floor_x = ranks.floor == ranks.top_k ? top_k_x : kth_largest_logit(x, cols, ranks.floor, s);
  if (threadIdx.x == 0) {  // (read after pass 1's barriers; a Top-H row reads x_K at once)
    s.top_k_x = top_k_x;
    s.floor_x = floor_x;
  }
  if (top_h) __syncthreads();
  return core::with_rank_cuts(p, top_k_x, floor_x);
}

// Whether a row gathers its top-k survivors (block-uniform):
// may_gather_survivors and the row max is finite (NaN, +inf and all -inf rows
// take pass 1).
LK_DEVICE inline bool gathers_survivors(const core::RankCounts& ranks, const core::FilterParams& p, float row_max_x) {
  return may_gather_survivors(ranks, p) && row_max_x > core::neg_infinity() && row_max_x < core::pos_infinity();
}

// One pass: the top-k survivors' keys (z >= z_k) into s.radix.survivors.key.
// Returns how many the row holds (every thread); above kGatherCapacity (a tie
// group at the k-th largest logit), only that many were stored.
template <class scalar_t>
LK_DEVICE inline int gather_top_k_survivors(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                            RowFilterStorage& s) {
  return gather_keys(x, cols, s, [&](float xv) { return core::scaled_logit(xv, p.inv_temperature) >= p.top_k_z; });
}

// One pass for a Top-H row (core::uses_top_h) whose candidates no selection
// shortcut gathered: the keys above x_K (fewer than K) into
// s.radix.survivors.key, then x_K's key once per token of its tie group, up to
// kGatherCapacity keys in all, the group's size in the row in
// s.top_h_ties_at_kth (so that a group larger than the capacity, such as a
// row of equal logits, still gives Top-H its K candidates). Returns the keys
// stored.
template <class scalar_t>
LK_DEVICE inline int gather_top_h_candidates(const scalar_t* x, int64_t cols, float kth_x, RowFilterStorage& s) {
  const uint32_t kth = core::orderable_key(kth_x);
  const int above = gather_keys(x, cols, s, [&](float xv) {
    const uint32_t key = core::orderable_key(xv);
    if (key == kth) atomicAdd(&s.top_h_ties_at_kth, 1);
    return key > kth;
  });
  const int room = kGatherCapacity - above, ties = s.top_h_ties_at_kth < room ? s.top_h_ties_at_kth : room;
  for (int a = static_cast<int>(threadIdx.x); a < ties; a += static_cast<int>(blockDim.x))
    s.radix.survivors.key[above + a] = kth;
  __syncthreads();
  return above + ties;
}

// The index of the token of rank `rank` (0: the first) in index order among
// the row's tokens of orderable key `key` (a block collective; tile by tile
// with an ordered block-wide count, stopping at that token's tile).
template <class scalar_t>
LK_DEVICE inline int64_t index_in_tie_group(const scalar_t* x, int64_t cols, uint32_t key, int64_t rank,
                                            RowFilterStorage& s) {
  int64_t running = 0;
  for (int64_t base = 0; base < cols && running <= rank; base += blockDim.x) {  // (running: block-uniform)
    const int64_t i = base + threadIdx.x;
    const bool tie = i < cols && core::orderable_key(load_logit(x, i)) == key;
    if (ordered_rank(tie, running, s.radix.warp_counts) == rank && tie) s.index_scratch[0] = i;
  }
  __syncthreads();
  const int64_t index = s.index_scratch[0];
  __syncthreads();  // index_scratch may be reused right away
  return index;
}

// Top-H "hf" as the chain's first rule (core::uses_top_h; a block collective)
// over the n ranked candidates (keys >= x_K; their first K are Top-H's K
// largest logits in rank order): core::capped_keep_count (top_h_mask's scan)
// keeps the first `kept` of them. Its last kept token's key and index go to
// s.top_h_last_key / top_h_last_index (core::top_h_keeps): when its key's tie
// group reaches past the kept prefix, the index comes from one more pass
// (index_in_tie_group; a partial pass, rare: ties at Top-H's cut). The chain
// then runs on that prefix, as on the unfused route's masked row: top-k's k-th
// largest and the keep floor are ranks in it (their logits into s.top_k_x and
// s.floor_x, read back by filter_pass_one). Returns the prefix the chain's
// statistics run over: Top-H's kept tokens with z >= top-k's z_k.
template <class scalar_t>
LK_DEVICE inline int top_h_prefix(const scalar_t* x, int64_t cols, const core::FilterParams& p, int n,
                                  RowFilterStorage& s) {
  const core::RankCounts ranks = core::rank_counts(p, cols);  // the chain's top-k and floor
  const float* z = s.radix.survivors.ranked_z;
  const uint32_t* key = s.radix.survivors.ranked_key;
  __syncthreads();  // every thread is past filter_pass_one's reads of s.top_k_x, which thread 0 rewrites
  if (threadIdx.x == 0) {
    const int count = static_cast<int>(p.top_h_count);  // K <= n
    const int kept = static_cast<int>(
        core::capped_keep_count([&](int64_t i) { return z[i]; }, count, core::TopHRule::hf, 0.0f, p.top_h_alpha));
    const uint32_t last_key = key[kept - 1];
    int first = kept - 1, end = kept;  // the last kept key's tokens in the ranking: [first, end)
    while (first > 0 && key[first - 1] == last_key) --first;
    while (end < n && key[end] == last_key) ++end;
    const int counted = last_key == core::orderable_key(s.top_k_x) ? s.top_h_ties_at_kth : 0;
    const int ties = end - first > counted ? end - first : counted;
    s.top_h_last_key = last_key;
    s.top_h_split_rank = kept - first < ties ? kept - first - 1 : -1;
    int prefix = kept;
    if (ranks.top_k > 0 && ranks.top_k < kept) {  // top-k on Top-H's survivors: z >= z_k (ties kept)
      prefix = static_cast<int>(ranks.top_k);
      while (prefix < kept && z[prefix] >= z[ranks.top_k - 1]) ++prefix;
    }
    s.top_k_x = core::key_to_float(key[prefix - 1]);
    s.floor_x = ranks.floor == 0        ? core::pos_infinity()
                : ranks.floor <= prefix ? core::key_to_float(key[ranks.floor - 1])
                                        : core::neg_infinity();  // fewer survivors than the floor: all kept
    s.top_h_prefix_count = prefix;
  }
  __syncthreads();
  const int split_rank = s.top_h_split_rank;  // block-uniform
  const int prefix = s.top_h_prefix_count;
  const int64_t last_index = split_rank < 0 ? INT64_MAX : index_in_tie_group(x, cols, s.top_h_last_key, split_rank, s);
  if (threadIdx.x == 0) s.top_h_last_index = last_index;
  __syncthreads();
  return prefix;
}

// Whether Top-H (first in the chain; top_h_prefix) keeps token i of logit xv.
LK_DEVICE inline bool top_h_keeps(const RowFilterStorage& s, float xv, int64_t i) {
  return core::top_h_keeps(core::orderable_key(xv), i, s.top_h_last_key, s.top_h_last_index);
}

// The block's FilterState from every thread's (pass 1, or the gathered copy):
// one reduction, the same result in every thread.
LK_DEVICE inline core::FilterState block_filter_state(const core::FilterState& mine, RowFilterStorage& s) {
  return block_reduce(
      mine, [](const core::FilterState& a, const core::FilterState& b) { return core::merge(a, b); },
      core::empty_filter_state(), s.state_scratch);
}

// Pass 1's statistics over the n ranked survivors (the row's other tokens
// count as -inf there: they add nothing).
LK_DEVICE inline core::FilterState gathered_state(int n, RowFilterStorage& s) {
  core::FilterState st = core::empty_filter_state();
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x))
    core::accumulate(st, s.radix.survivors.ranked_z[a]);
  return block_filter_state(st, s);
}

// top-p over the n ranked survivors of max m, limit = top_p * their mass: a
// token is kept iff the mass of the tokens ranked strictly before it is below
// the limit (core::top_p_reached), and a token's ties are ranked neither
// before nor after it, so that mass is the sum of e over the strictly larger
// z, a prefix of the ranking: the crossing token and its ties are kept, as
// TopPPredicate's walk keeps them (first_group_reaching: a block scan).
// Threshold -inf when every survivor is kept.
LK_DEVICE inline core::TopPCut gathered_top_p(int n, float m, float limit, RowFilterStorage& s) {
  const float* z = s.radix.survivors.ranked_z;
  float* e = s.radix.survivors.ranked_e;
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) e[a] = core::exp_of(z[a] - m);
  __syncthreads();
  const int kept_count = first_group_reaching(
      n, 0.0f, [&](int r) { return e[r]; }, [&](int r) { return r == 0 || z[r - 1] > z[r]; },
      [&](float mass_before, int) { return core::top_p_reached(mass_before, limit); }, s.mass_scratch, s.index_scratch);
  core::KeptSums mine{0.0f, 0.0f, 0.0f};
  for (int a = static_cast<int>(threadIdx.x); a < kept_count; a += static_cast<int>(blockDim.x)) {
    mine.mass += e[a];
    mine.shifted += (z[a] - m) * e[a];
    mine.count += 1.0f;
  }
  const core::KeptSums kept = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f}, s.sums_scratch);
  // The kept tokens are a prefix of the ranking: its last one is the threshold.
  return core::TopPCut{kept_count >= n ? core::neg_infinity() : z[kept_count > 0 ? kept_count - 1 : 0], kept.mass,
                       kept.shifted};
}

// typical over the n ranked survivors (instead of typical_passes: no pass
// over the row): the candidates z >= cut.threshold are a prefix of the
// ranking; their K, D (from top-p's or pass 1's sums when the threshold is
// theirs, else summed here), the center c = m + D / K, then typical's cut over
// them (typical_cut_over_slots): their distance keys stored in
// s.radix.survivors.key (free after rank_gathered), ties by rank, their ranks
// sorted into s.radix.survivors.ranked_key (free after top_h_prefix).
LK_DEVICE inline void gathered_typical(int n, const core::FilterParams& p, const core::TopPCut& top_p,
                                       RowFilterStorage& s, core::FilterCut& cut) {
  auto& bin = s.radix.survivors;
  // (-inf survivors, gathered when top-k's or the floor's k-th logit is -inf,
  // are never candidates: their weight is 0, and (z - m) e would be NaN.)
  int candidates = 0;  // (the same in every thread)
  while (candidates < n && bin.ranked_z[candidates] >= cut.threshold && bin.ranked_z[candidates] > core::neg_infinity())
    ++candidates;
  for (int a = static_cast<int>(threadIdx.x); a < candidates; a += static_cast<int>(blockDim.x))
    bin.ranked_e[a] = core::exp_of(bin.ranked_z[a] - cut.max);
  __syncthreads();
  core::KeptSums sums{top_p.mass, top_p.shifted, 0.0f};
  if (!core::typical_candidates_known(p, top_p, cut)) {
    core::KeptSums mine{0.0f, 0.0f, 0.0f};
    for (int a = static_cast<int>(threadIdx.x); a < candidates; a += static_cast<int>(blockDim.x)) {
      mine.mass += bin.ranked_e[a];
      mine.shifted += (bin.ranked_z[a] - cut.max) * bin.ranked_e[a];
    }
    sums = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f}, s.sums_scratch);
  }
  const float center = core::typical_center(cut.max, sums.mass, sums.shifted);
  for (int a = static_cast<int>(threadIdx.x); a < candidates; a += static_cast<int>(blockDim.x))
    bin.key[a] = core::orderable_key(-core::typical_distance(bin.ranked_z[a], center));
  const TypicalKept kept = typical_cut_over_slots(
      candidates, center, bin.ranked_z, bin.ranked_e, [&](uint32_t a) { return bin.key[a]; },
      [](uint32_t a, uint32_t b) { return a < b; }, core::KeptSums{0.0f, 0.0f, 0.0f}, core::typical_limit(p, sums.mass),
      bin.ranked_key, s);
  cut.center = center;
  cut.radius = kept.radius;
}

// A sum over the top-k survivors among the crossing bin's n gathered keys
// (z >= z_k) of term(z), each term in [-1, 1], in 64-bit fixed point
// (FixedPointBins at `fixed_one`): the same bits whatever slots the gather's
// atomics gave the keys. A block collective.
template <class Term>
LK_DEVICE inline float crossing_survivors_sum(int n, const uint32_t* keys, float inv_t, float z_k, float fixed_one,
                                              int64_t* scratch, Term term) {
  int64_t mine = 0;
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) {
    const float z = core::scaled_logit(core::key_to_float(keys[a]), inv_t);
    if (z >= z_k) mine += static_cast<int64_t>(FixedPointBins::term(term(z), fixed_one));
  }
  const int64_t sum = block_reduce(mine, [](int64_t a, int64_t b) { return a + b; }, int64_t{0}, scratch);
  return FixedPointBins::value(static_cast<unsigned long long>(sum), fixed_one);
}

// The statistics (core::FilterState) of the top-k survivors among the
// crossing bin's n gathered keys, z >= z_k, whose largest z is r: with the
// weights e = exp(z - r) <= 1, the count, sum e, sum (z - r) e and sum e^2
// are fixed-point sums of terms in [-1, 1] (|d e| <= 1/e), and so are the
// mean's sum (z - r) / w and the squared deviations ((z - mean) / w)^2, with
// w = r - z_k the survivors' spread (every z lies in [z_k, r], and so does
// their mean). A block collective.
LK_DEVICE inline core::FilterState crossing_survivors_state(int n, const uint32_t* keys, float inv_t, float z_k,
                                                            float r, int64_t* scratch) {
  const float one = FixedPointBins::one(n);
  const auto sum = [&](auto term) { return crossing_survivors_sum(n, keys, inv_t, z_k, one, scratch, term); };
  core::FilterState st;
  st.count = sum([](float) { return 1.0f; });
  st.sm.max = r;
  st.sm.sum_exp = sum([r](float z) { return core::exp_of(z - r); });
  st.sm.sum_shifted = sum([r](float z) { return (z - r) * core::exp_of(z - r); });
  st.sum_exp2 = sum([r](float z) {
    const float e = core::exp_of(z - r);
    return e * e;
  });
  const float spread = r - z_k;
  st.mean = r;
  st.m2 = 0.0f;
  if (spread > 0.0f) {  // block-uniform
    st.mean = r + spread * (sum([r, spread](float z) { return (z - r) / spread; }) / st.count);
    const float mean = st.mean;
    st.m2 = spread * spread * sum([mean, spread](float z) {
              const float deviation = (z - mean) / spread;
              return deviation * deviation;
            });
  }
  return st;
}

// After pass 1 over a row whose top-k selection stopped at a crossing bin (a
// block collective): the key of rank k - 1 - (the tokens above the bin) among
// the bin's n gathered keys (block_kth_largest_key) is the k-th largest logit
// x_k. The bin's survivors, z >= z_k (x_k, its ties, the keys above it, and
// keys below it that scale to z_k), join pass 1's state st (their sums in
// fixed point: the same bits run to run, crossing_survivors_state) and, when
// pass 1 built top-p's first digit, thread 0's top bin (the bin lies in one
// first-digit bin). Returns p with top-k's cut; x_k also goes to s.top_k_x.
LK_DEVICE inline core::FilterParams resolve_top_k_crossing(core::FilterParams p, int64_t k, bool first_digit,
                                                           core::FilterState& st, TopBinState& mine,
                                                           RowFilterStorage& s) {
  TopKCrossing& c = s.top_k_crossing;
  const int n = c.gathered < kTopKCrossingCapacity ? c.gathered : kTopKCrossingCapacity;  // (= the walk's count)
  TopKCrossingShared& shared = top_k_crossing_shared();
  const int64_t rank = k - 1 - c.above_count;  // (in [0, n): the walk's bin holds the k-th largest)
  uint32_t largest_key;
  const uint32_t top_k_key =
      block_kth_largest_key(n, shared.keys, static_cast<int>(rank < n ? rank : n - 1), shared.select, &largest_key);
  const float top_k_x = core::key_to_float(top_k_key);
  p = core::with_rank_cuts(p, top_k_x, p.keep_floor);
  const float r = core::scaled_logit(core::key_to_float(largest_key), p.inv_temperature);
  const core::FilterState bin =
      crossing_survivors_state(n, shared.keys, p.inv_temperature, p.top_k_z, r, shared.select.reduce_scratch);
  st = core::merge(st, bin);
  if (threadIdx.x == 0) {
    if (first_digit && bin.count > 0.0f) {
      const TopBinState survivors{static_cast<int>(c.lowest_key >> digit_shift(0)), static_cast<unsigned>(bin.count),
                                  bin.sm};
      add_first_digit_bin<TopPPredicate::kFixedPointSums>(s.radix, mine, survivors, p.inv_temperature);
    }
    s.top_k_x = top_k_x;
  }
  __syncthreads();
  return p;
}

// Pass 1 (and top-p's and typical's passes): the row's cut (the same in every thread).
template <class scalar_t>
LK_DEVICE inline core::FilterCut filter_pass_one(const scalar_t* x, int64_t cols, const float* param_row,
                                                 const core::FilterParams& decoded, RowFilterStorage& s) {
  // typical's or top-p's crossing left to pass 2 (typical_passes' or
  // top_p_passes' selection sets it; every other selection resets it).
  // Published by the barriers of every path below.
  if (threadIdx.x == 0) s.radix.crossing_pending = false;
  const core::RankCounts ranks = core::rank_counts(decoded, cols);
  const bool top_h = core::uses_top_h(decoded, cols);  // block-uniform
  const bool max_only = !top_h && !core::needs_row_sums(decoded) && (ranks.top_k > 0 || ranks.floor > 0);
  core::FilterParams p = with_selected_ranks(x, cols, decoded, s);
  if (max_only) {
    // No pass 1: the cut needs only the max z (temperature, top-k, min-p, the
    // floor), the scaled row max, which the rank selection's first pass found.
    core::FilterState st = core::empty_filter_state();
    st.sm.max = core::scaled_logit(s.radix.row_max_x, p.inv_temperature);
    return core::filter_cut(st, p, core::no_top_p_cut(st));
  }
  // A short top-k: its survivors (from the selection's last digit, or
  // gathered in one pass), the statistics and top-p over them (no pass over
  // the row for either).
  int gathered = -1;
  const float row_max_x = s.radix.row_max_x;
  const bool finite_max = row_max_x > core::neg_infinity() && row_max_x < core::pos_infinity();
  if (top_h ? finite_max : gathers_survivors(ranks, p, row_max_x)) {
    gathered = s.gathered_count;  // (keep_last_digit_survivors)
    if (gathered < 0) {
      gathered = top_h ? gather_top_h_candidates(x, cols, s.top_k_x, s) : gather_top_k_survivors(x, cols, p, s);
    }
  }
  core::FilterState st;
  core::TopPCut top_p;
  const bool over_gathered = gathered >= 0 && gathered <= kGatherCapacity;  // block-uniform
  if (over_gathered) {
    if (!s.survivors_ranked) rank_gathered(gathered, p.inv_temperature, s);  // block-uniform
    if (top_h) {
      gathered = top_h_prefix(x, cols, p, gathered, s);
    } else {
      // top-k's survivors are the prefix z >= z_k (all of them but after an early-stopped selection)
      while (gathered > 0 && !(s.radix.survivors.ranked_z[gathered - 1] >= p.top_k_z)) --gathered;
    }
    st = gathered_state(gathered, s);
    top_p = core::uses_top_p(p, st.sm.max)
                ? gathered_top_p(gathered, st.sm.max, core::top_p_mass_limit(p.top_p, st.sm.sum_exp), s)
                : core::no_top_p_cut(st);
  } else {
    // pass 1 builds the first digit for top-p's selection, or for typical's guess (block-uniform)
    const bool first_digit = (p.top_p < 1.0f && !p.greedy) || guesses_typical_in_candidates_pass(p);
    // (block-uniform; keep_top_k_crossing's barrier published the flag)
    const bool top_k_pending = top_k_may_stop_at_crossing(ranks, p, top_h) && s.top_k_crossing.pending;
    if (first_digit) reset_histogram<Selection::exact>(s.radix, cols);
    __syncthreads();
    st = core::empty_filter_state();
    TopBinState mine = empty_top_bin();
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
      const float xv = load_logit(x, i);
      const float z = top_k_pending ? top_k_crossing_survivor(xv, p.inv_temperature, s.top_k_crossing)
                                    : core::top_k_survivor(core::scaled_logit(xv, p.inv_temperature), p);
      core::accumulate(st, z);
      if (first_digit && z > core::neg_infinity()) {  // a survivor (NaN / +inf: the row is undefined anyway)
        const int bin = static_cast<int>(core::orderable_key(xv) >> digit_shift(0));
        add_first_digit_token<TopPPredicate::kFixedPointSums>(s.radix, mine, bin, z, p.inv_temperature);
      }
    }
    st = block_filter_state(st, s);
    if (top_k_pending) p = resolve_top_k_crossing(p, ranks.top_k, first_digit, st, mine, s);
    top_p = top_p_passes(x, cols, p, st, mine, first_digit, !top_h && core::top_p_cut_may_wait(p), s);
  }
  // The rules' parameters decoded again from the table (and the selected
  // ranks' logits read back): kept live across top-p's passes, two of them
  // spilled to local memory (sm_90).
  const core::FilterParams params = core::with_rank_cuts(core::decode_filter_params(param_row), s.top_k_x, s.floor_x);
  core::FilterCut cut = core::filter_cut(st, params, top_p);
  if (core::uses_typical(params, cut)) {  // block-uniform
    if (over_gathered) {
      gathered_typical(gathered, params, top_p, s, cut);
    } else {
      typical_passes(x, cols, params, top_p, s, cut);
    }
  }
  return cut;
}

// The raw distribution's log sum exp(x - max x) at temperature 1 (its own
// pass, only for the raw log-prob: kept out of pass 1 so that its state is
// not live, and spilled, across the draw).
template <class scalar_t>
LK_DEVICE inline core::SoftmaxState raw_state(const scalar_t* x, int64_t cols, RowFilterStorage& s) {
  core::SoftmaxState raw = core::empty_state();
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float xv = load_logit(x, i);
    core::accumulate(raw, &xv, 1);
  }
  return block_reduce(
      raw, [](const core::SoftmaxState& a, const core::SoftmaxState& b) { return core::merge(a, b); },
      core::empty_state(), s.raw_scratch);
}

// filter_mask (out_t = bool: the keep mask) and filter_logits (out_t =
// scalar_t: the logit where kept, filter_value elsewhere).
template <class scalar_t, class out_t>
__global__ void __launch_bounds__(kMaxFilterThreads, 2)
    filter_write_kernel(RowsView<scalar_t> rows, int64_t cols, const float* params, float filter_value, out_t* output) {
  const scalar_t* x = rows.row(blockIdx.x);
  out_t* out = output + static_cast<int64_t>(blockIdx.x) * cols;
  __shared__ RowFilterStorage s;
  const float* param_row = params + static_cast<int64_t>(blockIdx.x) * core::kFilterParamCount;
  const core::FilterParams p = core::decode_filter_params(param_row);
  const core::FilterCut cut = filter_pass_one(x, cols, param_row, p, s);
  const bool top_h = core::uses_top_h(p, cols);   // (block-uniform)
  const bool pending = s.radix.crossing_pending;  // (block-uniform)
  auto write = [&](int64_t i, bool keep) {
    if constexpr (std::is_same_v<out_t, bool>) {
      out[i] = keep;
    } else {
      out[i] = keep ? x[i] : static_cast<out_t>(filter_value);
    }
  };
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    bool keep;
    if (!cut.defined || cut.max == core::neg_infinity()) {
      keep = cut.defined && i == 0;  // NaN / +inf: nothing; all -inf: token 0 only
    } else {
      const float xv = load_logit(x, i);
      keep = weight_or_gather(cut, xv, i, p.inv_temperature, pending, s) > 0.0f && (!top_h || top_h_keeps(s, xv, i));
    }
    write(i, keep);  // (the crossing bin's gathered candidates: rewritten below)
  }
  if (pending) {
    resolve_crossing(cut, s);
    const int n = s.crossing_gathered < kCrossingCapacity ? s.crossing_gathered : kCrossingCapacity;
    for (int r = static_cast<int>(threadIdx.x); r < n; r += static_cast<int>(blockDim.x)) {
      write(s.radix.survivors.key[s.radix.survivors.ranked_key[r]], r < s.crossing_kept);
    }
  }
}

// Pass 2 of sampling with the draw's search folded in: every warp sums the
// kept weights of its own contiguous share of the row (warp_share); the block
// reduction gives the kept sums (every thread gets them), the warps' masses
// locate the share where the running mass first exceeds u * K, and only
// that warp re-reads its share to find the token. When rounding leaves u * K
// at or above the shares' total, the last share of positive mass is searched
// (its last kept token of positive weight). top_h: Top-H ran first (its
// survivors only: top_h_keeps).
template <class scalar_t>
LK_DEVICE inline int64_t kept_sums_and_draw(const scalar_t* x, int64_t cols, core::FilterCut cut, float inv_t, float u,
                                            bool top_h, RowFilterStorage& s, core::KeptSums& sums) {
  const WarpShare share = warp_share(cols);
  const bool pending = s.radix.crossing_pending;  // (block-uniform)
  core::KeptSums mine{0.0f, 0.0f, 0.0f};
  for (int64_t i = share.begin + lane_rank(); i < share.end; i += lanes_in_warp()) {
    const float xv = load_logit(x, i);
    const float w = !top_h || top_h_keeps(s, xv, i) ? weight_or_gather(cut, xv, i, inv_t, pending, s) : 0.0f;
    add_kept_weight(mine, w, core::scaled_logit(xv, inv_t) - cut.max);
  }
  const float share_mass = warp_reduce(mine.mass, [](float a, float b) { return a + b; });
  if (lane_rank() == 0) s.share_mass[warp_rank()] = share_mass;
  sums = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f},
                      s.sums_scratch);  // its barriers publish share_mass too
  if (pending) {
    // The crossing bin's kept candidates join the sums and their warps'
    // shares, and the resolved cut (typical's radius d*, top-p's threshold)
    // the draw's test. Each warp adds the
    // kept candidates of its own share (its lanes over them in sorted order,
    // then a warp reduction), the block all of them (a block reduction):
    // fixed orders, so the sums do not depend on the gather's timing.
    cut = resolve_crossing(cut, s);
    const auto& bin = s.radix.survivors;
    const int kept = s.crossing_kept;
    float own_share = 0.0f;
    for (int r = lane_rank(); r < kept; r += lanes_in_warp()) {
      const int a = static_cast<int>(bin.ranked_key[r]);
      const int64_t index = bin.key[a];
      if (share.begin <= index && index < share.end) own_share += bin.ranked_e[a];
    }
    own_share = warp_reduce(own_share, [](float a, float b) { return a + b; });
    if (lane_rank() == 0) s.share_mass[warp_rank()] += own_share;  // (only this thread writes it)
    core::KeptSums crossing_mine{0.0f, 0.0f, 0.0f};
    for (int r = static_cast<int>(threadIdx.x); r < kept; r += static_cast<int>(blockDim.x)) {
      const int a = static_cast<int>(bin.ranked_key[r]);
      add_kept_weight(crossing_mine, bin.ranked_e[a], bin.ranked_z[a] - cut.max);
    }
    // (its barriers publish share_mass)
    sums = AddKeptSums{}(sums,
                         block_reduce(crossing_mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f}, s.sums_scratch));
  }
  const float target = u * sums.mass;
  int crossing = -1;
  float before = 0.0f, before_crossing = 0.0f;
  for (int w = 0; w < warps_per_block(); ++w) {  // the same in every thread
    const float mass = s.share_mass[w];
    if (mass > 0.0f) {
      crossing = w;
      before_crossing = before;
      if (before + mass > target) break;
    }
    before += mass;
  }
  // Every warp runs the search (a warp collective), on an empty share but the crossing one's.
  const WarpShare search = warp_rank() == crossing ? share : WarpShare{0, 0};
  auto weight = [&](int64_t i) {
    const float xv = load_logit(x, i);
    return !top_h || top_h_keeps(s, xv, i) ? core::kept_weight(cut, xv, inv_t) : 0.0f;
  };
  const int64_t found = warp_share_inverse_cdf_draw(search, before_crossing, target, weight);
  if (warp_rank() == crossing && lane_rank() == 0) s.index_scratch[0] = found;
  __syncthreads();
  const int64_t token = crossing < 0 ? -1 : s.index_scratch[0];
  __syncthreads();  // index_scratch may be reused right away
  return token;
}

// kRaw: also the raw log-prob (raw_log_prob = true).
template <bool kRaw, class scalar_t>
__global__ void __launch_bounds__(kMaxFilterThreads, 2)
    filter_sample_kernel(RowsView<scalar_t> rows, int64_t cols, const float* params, const float* uniform,
                         int64_t* tokens, float* stats) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = rows.row(row);
  __shared__ RowFilterStorage s;
  const float* param_row = params + row * core::kFilterParamCount;
  const core::FilterParams p = core::decode_filter_params(param_row);
  const core::FilterCut cut = filter_pass_one(x, cols, param_row, p, s);
  float* st = stats + row * kSampleStatCount;
  const float nan = core::quiet_nan();
  if (!cut.defined || cut.max == core::neg_infinity()) {
    if (threadIdx.x == 0) {  // NaN / +inf: no token; all -inf: token 0 alone
      tokens[row] = cut.defined ? 0 : -1;
      st[kLogProb] = cut.defined ? 0.0f : nan;
      st[kRawLogProb] = nan;
      st[kEntropy] = cut.defined ? 0.0f : nan;
      st[kKeptCount] = cut.defined ? 1.0f : 0.0f;
    }
    return;
  }
  core::KeptSums sums{0.0f, 0.0f, 0.0f};
  const int64_t token =
      kept_sums_and_draw(x, cols, cut, p.inv_temperature, uniform[row], core::uses_top_h(p, cols), s, sums);
  if (threadIdx.x == 0) {
    const float xv = load_logit(x, token);
    const float log_mass = core::log_of(sums.mass);
    tokens[row] = token;
    st[kLogProb] = (core::scaled_logit(xv, p.inv_temperature) - cut.max) - log_mass;
    st[kRawLogProb] = nan;  // kRaw: written below
    st[kEntropy] = log_mass - sums.shifted / sums.mass;
    st[kKeptCount] = sums.count;
  }
  // The raw log-prob last, so that only the token is live across its pass.
  if constexpr (kRaw) {
    const core::SoftmaxState raw = raw_state(x, cols, s);
    if (threadIdx.x == 0) st[kRawLogProb] = (load_logit(x, token) - raw.max) - core::log_of(raw.sum_exp);
  }
}

// One thread per (seed, offset) pair.
__global__ void philox_uniform_kernel(const int64_t* seed, const int64_t* offset, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = core::philox_uniform(seed[i], offset[i]);
}

}  // namespace logitkit::cuda
