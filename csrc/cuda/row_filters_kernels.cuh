// CUDA kernels of filter_mask and filter_sample (the row-statistics rules of
// csrc/core/row_filters.h, docs/sampling.md), also built for the host through
// the SIMT emulator. Host launch and registration: top_h.cu.
//
// One block per row, one parameterised body for every rule (the rules differ
// only in core::filter_cut's threshold). Passes over the row:
//   ranks    only for top-k / min_tokens_to_keep > 1: the k-th largest
//            logit (kth_largest_logit: 1 to 3 digit passes, bf16 / fp16 1
//            or 2), whose first pass also finds the row max. When the cut
//            needs nothing more (temperature, top-k, min-p, the floor:
//            core::needs_row_sums), pass 1 is skipped.
//   gather   instead of pass 1 and top-p's passes, for a top-k of at most
//            kGatheredSurvivors tokens whose cut needs sums: one pass
//            copies the survivors' z to shared memory, a rank sort orders
//            them, and the statistics and top-p run over that copy
//            (gathered_state, gathered_top_p).
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
//            walk over the first digit, then 0 to 2 digit passes, stopping
//            at the first digit whose failing bin holds one token. It gives
//            top-p's threshold and the kept K, D that epsilon / eta
//            (core::filter_cut) use.
//   typical  only for a row with typical_p < 1 (typical_passes): the
//            radix selection again, keyed on -|z - c| (1 to 3 digit passes,
//            the first included), after one pass for the candidates' sums
//            when no earlier pass summed them: the cut's center and radius.
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

#include <cstdint>
#include <type_traits>

#include "../core/row_filters.h"
#include "../frontend/row_filters.h"
#include "collectives.cuh"
#include "launch_config.h"
#include "row_kernels.cuh"
#include "top_h_kernels.cuh"

namespace logitkit::cuda {

// Rows whose top-k keeps at most this many tokens (ties included) gather
// their survivors into shared memory, and pass 1's statistics and top-p's
// selection run over that copy instead of over the row (filter_pass_one).
constexpr int kGatheredSurvivors = 256;

struct RowFilterStorage {
  core::FilterState state_scratch[kReduceScratchSize];
  core::SoftmaxState raw_scratch[kReduceScratchSize];
  core::KeptSums sums_scratch[kReduceScratchSize];
  float mass_scratch[kReduceScratchSize];
  float share_mass[kMaxWarpsPerBlock];  // each warp's kept mass (kept_sums_and_draw)
  int64_t index_scratch[kReduceScratchSize];
  float top_k_x, floor_x;                // the selected ranks' logits (with_selected_ranks), re-read after top-p
  TopHStorage radix;                     // the radix selections' histograms and walk (top-k, top-p, typical)
  float gathered_z[kGatheredSurvivors];  // the top-k survivors' z, in the gather's (timing's) order
  float ranked_z[kGatheredSurvivors];    // the same, largest first
  float ranked_e[kGatheredSurvivors];    // and their weights exp(z - m)
  int gathered_count;                    // survivors in the row (only the first kGatheredSurvivors stored)
};

template <class scalar_t>
LK_DEVICE inline float filter_logit(const scalar_t* row, int64_t i) {
  return static_cast<float>(row[i]);
}

// At most 512 threads per block: 128 registers per thread, so that the
// FilterState reductions do not spill (1024 threads cap them at 64). The
// kernels also declare at least 1 block per SM (__launch_bounds__'s second
// argument): without it ptxas (CUDA 13) kept them to 40 registers, 3 blocks
// of 512 threads per SM, and spilled 12 to 36 bytes once top-p's bins moved
// to 64-bit fixed point; they take 48 (2 blocks of 512 per SM). One block
// runs one row, so batches of fewer rows than twice the SM count (264 on an
// H100) see no difference.
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
// block-uniform: every thread has the same st).
template <class scalar_t>
LK_DEVICE inline core::TopPCut top_p_passes(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                            const core::FilterState& st, const TopBinState& mine, RowFilterStorage& s) {
  const float m = st.sm.max;
  const bool built = p.top_p < 1.0f && !p.greedy;  // pass 1 built the first digit
  // B*, the bin of the row max with all its tokens (a block collective: before any return).
  const TopBinState best =
      built ? block_reduce(
                  mine, [](const TopBinState& a, const TopBinState& b) { return merge_top_bins(a, b); },
                  empty_top_bin(), s.radix.top_bin_scratch)
            : empty_top_bin();
  if (!core::uses_top_p(p, m)) return core::no_top_p_cut(st);
  rescale_first_digit_bins<TopPPredicate::kFixedPointSums>(s.radix, FirstDigit{st.sm, mine, best}, p.inv_temperature);
  __syncthreads();
  const TopPPredicate pred{core::top_p_mass_limit(p.top_p, st.sm.sum_exp)};
  radix_select<Selection::exact>(x, cols, pred, m, p.inv_temperature, p.top_k_z, s.radix, nullptr);
  // The lowest kept key as a logit is the threshold (-inf: no cut).
  const float x_cut = lowest_kept_value(s.radix.cut);
  return core::TopPCut{core::scaled_logit(x_cut, p.inv_temperature), s.radix.cut.mass, s.radix.kept_shifted};
}

// Adds a token's kept weight w = exp(z - m) (0: dropped) to a thread's kept sums.
LK_DEVICE inline void add_kept(core::KeptSums& sums, const core::FilterCut& cut, float xv, float inv_t) {
  const float w = core::kept_weight(cut, xv, inv_t);
  if (w > 0.0f) {
    sums.mass += w;
    sums.shifted += (core::scaled_logit(xv, inv_t) - cut.max) * w;
    sums.count += 1.0f;
  }
}

// The block reductions' combine of kept sums.
struct AddKeptSums {
  LK_DEVICE core::KeptSums operator()(const core::KeptSums& a, const core::KeptSums& b) const {
    return core::KeptSums{a.mass + b.mass, a.shifted + b.shifted, a.count + b.count};
  }
};

// typical (core::uses_typical; block-uniform) over the candidates
// z >= cut.threshold: their K and D (top-p's walk or pass 1 summed them,
// unless another rule moved the threshold: then one pass), the center
// c = m + D / K, then Top-H "exact"'s radix selection keyed on the negated
// distance -|z - c| (DistanceKey, TypicalPredicate): 1 to 3 digit passes, the
// first one included (pass 1 could not build it: c was not known), stopping
// at the first digit whose crossing bin holds one token. The lowest kept key
// is -d*: cut.center and cut.radius.
template <class scalar_t>
LK_DEVICE inline void typical_passes(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                     const core::TopPCut& top_p, RowFilterStorage& s, core::FilterCut& cut) {
  __syncthreads();  // every thread has read top-p's cut before the selection resets it
  core::KeptSums candidates{top_p.mass, top_p.shifted, 0.0f};
  if (!core::typical_candidates_known(p, top_p, cut)) {
    core::KeptSums mine{0.0f, 0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) add_kept(mine, cut, filter_logit(x, i), p.inv_temperature);
    candidates = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f}, s.sums_scratch);
  }
  const float center = core::typical_center(cut.max, candidates.mass, candidates.shifted);
  const TypicalPredicate pred{core::typical_limit(p, candidates.mass)};
  radix_select<Selection::exact>(x, cols, pred, cut.max, p.inv_temperature, cut.threshold, s.radix, nullptr, false,
                                 DistanceKey{center});
  cut.center = center;
  cut.radius = -lowest_kept_value(s.radix.cut);  // the lowest kept key is -d* (-inf: no bound)
}

// The k-th largest logit x of the row (k < cols; a block collective): Top-H's
// radix selection over the logits' orderable keys, counting (Selection::rank)
// with RankPredicate{k - 1}: it fails at the first bin where the count from
// the top reaches k and stops there once that bin holds one key value, the
// k-th largest token's (ties: the same value as torch.topk's k-th). 1 to 3
// digit passes (bf16 / fp16: 1 or 2), the first included; that one also
// leaves the row max in s.radix.row_max_x.
template <class scalar_t>
LK_DEVICE inline float kth_largest_logit(const scalar_t* x, int64_t cols, int64_t k, RowFilterStorage& s) {
  __syncthreads();  // every thread has read the previous selection's cut
  constexpr int kSingleValueLevel = sizeof(scalar_t) == 2 ? 1 : kDigitCount - 1;
  radix_select<Selection::rank>(x, cols, RankPredicate{{k - 1}, kSingleValueLevel}, 0.0f, 1.0f, core::neg_infinity(),
                                s.radix, nullptr, false);
  return core::key_to_float(s.radix.cut.tie_key);
}

// top-k's and the keep floor's logits (core::rank_counts; block-uniform),
// selected in the kernel: no torch.topk and no host read of the largest k.
// Also left in shared memory for filter_pass_one to read back after top-p.
template <class scalar_t>
LK_DEVICE inline core::FilterParams with_selected_ranks(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                                        RowFilterStorage& s) {
  const core::RankCounts ranks = core::rank_counts(p, cols);
  float top_k_x = core::neg_infinity(), floor_x = core::pos_infinity();
  if (ranks.top_k > 0) top_k_x = kth_largest_logit(x, cols, ranks.top_k, s);
  if (ranks.floor > 0) floor_x = ranks.floor == ranks.top_k ? top_k_x : kth_largest_logit(x, cols, ranks.floor, s);
  if (threadIdx.x == 0) {  // (read after pass 1's barriers)
    s.top_k_x = top_k_x;
    s.floor_x = floor_x;
  }
  return core::with_rank_cuts(p, top_k_x, floor_x);
}

// Whether a row gathers its top-k survivors (block-uniform): top-k keeps at
// most kGatheredSurvivors tokens (before ties), the cut needs their sums, and
// the row max is finite (NaN, +inf and all -inf rows take pass 1).
LK_DEVICE inline bool gathers_survivors(const core::RankCounts& ranks, const core::FilterParams& p, float row_max_x) {
  return ranks.top_k > 0 && ranks.top_k <= kGatheredSurvivors && core::needs_row_sums(p) &&
         row_max_x > core::neg_infinity() && row_max_x < core::pos_infinity();
}

// One pass: the top-k survivors' z (z >= z_k) into s.gathered_z. Returns how
// many the row holds (every thread); above kGatheredSurvivors (a tie group at
// the k-th largest logit), only that many were stored.
template <class scalar_t>
LK_DEVICE inline int gather_top_k_survivors(const scalar_t* x, int64_t cols, const core::FilterParams& p,
                                            RowFilterStorage& s) {
  if (threadIdx.x == 0) s.gathered_count = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float z = core::scaled_logit(filter_logit(x, i), p.inv_temperature);
    if (z >= p.top_k_z) {
      const int slot = atomicAdd(&s.gathered_count, 1);
      if (slot < kGatheredSurvivors) s.gathered_z[slot] = z;
    }
  }
  __syncthreads();
  return s.gathered_count;
}

// Sorts the n gathered z into s.ranked_z, largest first (rank sort: n^2 /
// threads compares). The gather's slots follow the atomics' timing; what is
// summed below runs over this order, which depends on the values alone, so
// the results are the same run to run (docs/determinism.md).
LK_DEVICE inline void rank_gathered(int n, RowFilterStorage& s) {
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) {
    const float z = s.gathered_z[a];
    int rank = 0;
    for (int b = 0; b < n; ++b) rank += s.gathered_z[b] > z || (s.gathered_z[b] == z && b < a);
    s.ranked_z[rank] = z;
  }
  __syncthreads();
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
    core::accumulate(st, s.ranked_z[a]);
  return block_filter_state(st, s);
}

// top-p over the n ranked survivors of max m, limit = top_p * their mass: a
// token is kept iff the mass of the tokens ranked strictly before it is below
// the limit (core::top_p_reached), and a token's ties are ranked neither
// before nor after it, so that mass is the sum of e over the strictly larger
// z, a prefix of the ranking: the crossing token and its ties are kept, as
// TopPPredicate's walk keeps them. At most n^2 / 2 / threads additions.
// Threshold -inf when every survivor is kept.
LK_DEVICE inline core::TopPCut gathered_top_p(int n, float m, float limit, RowFilterStorage& s) {
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x))
    s.ranked_e[a] = core::exp_of(s.ranked_z[a] - m);
  __syncthreads();
  core::KeptSums mine{0.0f, 0.0f, 0.0f};
  for (int a = static_cast<int>(threadIdx.x); a < n; a += static_cast<int>(blockDim.x)) {
    const float z = s.ranked_z[a];
    float mass_before = 0.0f;
    for (int b = 0; b < a && s.ranked_z[b] > z; ++b) mass_before += s.ranked_e[b];
    if (!core::top_p_reached(mass_before, limit)) {
      const float e = s.ranked_e[a];
      mine.mass += e;
      mine.shifted += (z - m) * e;
      mine.count += 1.0f;
    }
  }
  const core::KeptSums kept = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f}, s.sums_scratch);
  // The kept tokens are a prefix of the ranking: its last one is the threshold.
  const int count = static_cast<int>(kept.count);
  return core::TopPCut{count >= n ? core::neg_infinity() : s.ranked_z[count > 0 ? count - 1 : 0], kept.mass,
                       kept.shifted};
}

// Pass 1 (and top-p's and typical's passes): the row's cut (the same in every thread).
template <class scalar_t>
LK_DEVICE inline core::FilterCut filter_pass_one(const scalar_t* x, int64_t cols, const float* param_row,
                                                 const core::FilterParams& decoded, RowFilterStorage& s) {
  const core::RankCounts ranks = core::rank_counts(decoded, cols);
  const bool max_only = !core::needs_row_sums(decoded) && (ranks.top_k > 0 || ranks.floor > 0);  // block-uniform
  const core::FilterParams p = with_selected_ranks(x, cols, decoded, s);
  if (max_only) {
    // No pass 1: the cut needs only the max z (temperature, top-k, min-p, the
    // floor), the scaled row max, which the rank selection's first pass found.
    core::FilterState st = core::empty_filter_state();
    st.sm.max = core::scaled_logit(s.radix.row_max_x, p.inv_temperature);
    return core::filter_cut(st, p, core::no_top_p_cut(st));
  }
  // A short top-k: its survivors gathered in one pass, the statistics and
  // top-p over them (no pass over the row for either).
  const int gathered = gathers_survivors(ranks, p, s.radix.row_max_x) ? gather_top_k_survivors(x, cols, p, s) : -1;
  core::FilterState st;
  core::TopPCut top_p;
  if (gathered >= 0 && gathered <= kGatheredSurvivors) {
    rank_gathered(gathered, s);
    st = gathered_state(gathered, s);
    top_p = core::uses_top_p(p, st.sm.max)
                ? gathered_top_p(gathered, st.sm.max, core::top_p_mass_limit(p.top_p, st.sm.sum_exp), s)
                : core::no_top_p_cut(st);
  } else {
    const bool first_digit = p.top_p < 1.0f && !p.greedy;  // block-uniform
    if (first_digit) clear_bins<Selection::exact>(s.radix, cols);
    __syncthreads();
    st = core::empty_filter_state();
    TopBinState mine = empty_top_bin();
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
      const float xv = filter_logit(x, i);
      const float z = core::top_k_survivor(core::scaled_logit(xv, p.inv_temperature), p);
      core::accumulate(st, z);
      if (first_digit && z > core::neg_infinity()) {  // a survivor (NaN / +inf: the row is undefined anyway)
        const int bin = static_cast<int>(core::orderable_key(xv) >> digit_shift(0));
        add_first_digit_token<TopPPredicate::kFixedPointSums>(s.radix, mine, bin, z, p.inv_temperature);
      }
    }
    st = block_filter_state(st, s);
    top_p = top_p_passes(x, cols, p, st, mine, s);
  }
  // The rules' parameters decoded again from the table (and the selected
  // ranks' logits read back): kept live across top-p's passes, two of them
  // spilled to local memory (sm_90).
  const core::FilterParams params = core::with_rank_cuts(core::decode_filter_params(param_row), s.top_k_x, s.floor_x);
  core::FilterCut cut = core::filter_cut(st, params, top_p);
  if (core::uses_typical(params, cut)) typical_passes(x, cols, params, top_p, s, cut);  // block-uniform
  return cut;
}

// The raw distribution's log sum exp(x - max x) at temperature 1 (its own
// pass, only for the raw log-prob: kept out of pass 1 so that its state is
// not live, and spilled, across the draw).
template <class scalar_t>
LK_DEVICE inline core::SoftmaxState raw_state(const scalar_t* x, int64_t cols, RowFilterStorage& s) {
  core::SoftmaxState raw = core::empty_state();
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float xv = filter_logit(x, i);
    core::accumulate(raw, &xv, 1);
  }
  return block_reduce(
      raw, [](const core::SoftmaxState& a, const core::SoftmaxState& b) { return core::merge(a, b); },
      core::empty_state(), s.raw_scratch);
}

// filter_mask (out_t = bool: the keep mask) and filter_logits (out_t =
// scalar_t: the logit where kept, filter_value elsewhere).
template <class scalar_t, class out_t>
__global__ void __launch_bounds__(kMaxFilterThreads, 1)
    filter_write_kernel(RowsView<scalar_t> rows, int64_t cols, const float* params, float filter_value, out_t* output) {
  const scalar_t* x = rows.row(blockIdx.x);
  out_t* out = output + static_cast<int64_t>(blockIdx.x) * cols;
  __shared__ RowFilterStorage s;
  const float* param_row = params + static_cast<int64_t>(blockIdx.x) * core::kFilterParamCount;
  const core::FilterParams p = core::decode_filter_params(param_row);
  const core::FilterCut cut = filter_pass_one(x, cols, param_row, p, s);
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    bool keep;
    if (!cut.defined || cut.max == core::neg_infinity()) {
      keep = cut.defined && i == 0;  // NaN / +inf: nothing; all -inf: token 0 only
    } else {
      keep = core::kept_weight(cut, filter_logit(x, i), p.inv_temperature) > 0.0f;
    }
    if constexpr (std::is_same_v<out_t, bool>) {
      out[i] = keep;
    } else {
      out[i] = keep ? x[i] : static_cast<out_t>(filter_value);
    }
  }
}

// Pass 2 of sampling with the draw's search folded in: every warp sums the
// kept weights of its own contiguous share of the row (warp_share); the block
// reduction gives the kept sums (every thread gets them), the warps' masses
// locate the share where the running mass first exceeds u * K, and only
// that warp re-reads its share to find the token. When rounding leaves u * K
// at or above the shares' total, the last share of positive mass is searched
// (its last kept token of positive weight).
template <class scalar_t>
LK_DEVICE inline int64_t kept_sums_and_draw(const scalar_t* x, int64_t cols, const core::FilterCut& cut, float inv_t,
                                            float u, RowFilterStorage& s, core::KeptSums& sums) {
  const WarpShare share = warp_share(cols);
  core::KeptSums mine{0.0f, 0.0f, 0.0f};
  for (int64_t i = share.begin + lane_rank(); i < share.end; i += lanes_in_warp())
    add_kept(mine, cut, filter_logit(x, i), inv_t);
  const float share_mass = warp_reduce(mine.mass, [](float a, float b) { return a + b; });
  if (lane_rank() == 0) s.share_mass[warp_rank()] = share_mass;
  sums = block_reduce(mine, AddKeptSums{}, core::KeptSums{0.0f, 0.0f, 0.0f},
                      s.sums_scratch);  // its barriers publish share_mass too
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
  auto weight = [&](int64_t i) { return core::kept_weight(cut, filter_logit(x, i), inv_t); };
  const int64_t found = warp_share_inverse_cdf_draw(search, before_crossing, target, weight);
  if (warp_rank() == crossing && lane_rank() == 0) s.index_scratch[0] = found;
  __syncthreads();
  const int64_t token = crossing < 0 ? -1 : s.index_scratch[0];
  __syncthreads();  // index_scratch may be reused right away
  return token;
}

// kRaw: also the raw log-prob (raw_log_prob = true).
template <bool kRaw, class scalar_t>
__global__ void __launch_bounds__(kMaxFilterThreads, 1)
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
  const int64_t token = kept_sums_and_draw(x, cols, cut, p.inv_temperature, uniform[row], s, sums);
  if (threadIdx.x == 0) {
    const float xv = filter_logit(x, token);
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
    if (threadIdx.x == 0) st[kRawLogProb] = (filter_logit(x, token) - raw.max) - core::log_of(raw.sum_exp);
  }
}

// One thread per (seed, offset) pair.
__global__ void philox_uniform_kernel(const int64_t* seed, const int64_t* offset, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = core::philox_uniform(seed[i], offset[i]);
}

}  // namespace logitkit::cuda
