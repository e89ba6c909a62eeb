// CPU kernels of filter_mask and filter_sample (the row-statistics rules of
// csrc/core/row_filters.h, docs/sampling.md). Included by top_h_cpu.cpp (the
// same per-ISA translation unit, scratch and row loading as Top-H), inside
// its anonymous namespace.
//
// One thread per row (at::parallel_for over rows); the row is loaded once in
// fp32 into the thread's scratch (s.x, padded with -inf), then
//   pass 1  tile by tile (vectorised): the tile's FilterState (max, sum exp,
//           sum shifted, sum exp^2, finite count / mean / M2 by the tile's
//           own two passes over the cached tile), merged into the row's; the
//           raw log-sum-exp at temperature 1 when asked for. Skipped where
//           the cut needs only the max z (temperature, top-k, min-p, the
//           floor: core::needs_row_sums), which loading the row found;
//   top-p   only for a row with top_p < 1: Top-H "exact"'s bucket walk
//           (top_h_cpu.cpp) with top-p's predicate: one vectorised pass
//           buckets the survivors by d = z - m with their sums (e, d e), the
//           walk finds the bucket of the crossing token, a second pass
//           (skipping vectors far below it) gathers that bucket's tokens, a
//           quickselect finds the crossing token: threshold, kept K and D;
//   cut     the threshold (core::filter_cut);
//   typical only for a row with typical_p < 1 (apply_typical): the walk of
//           top-p over buckets of the distance |z - c| instead of z - m,
//           after one pass for the candidates' sums when no earlier pass
//           summed them: the cut's center and radius;
//   pass 2  mask: z >= threshold (and |z - c| <= d*). sample: the kept weights of every tile,
//           their sums (mass, shifted sum, count), then the draw by inverse
//           CDF at u * mass: the tile where the running mass first exceeds
//           it, whose weights are recomputed to find the token (one tile).
// Special rows: NaN or +inf logits: nothing kept, token -1, statistics NaN
// (kept count 0). All -inf: token 0 kept alone (log q = 0, H = 0, count 1).

// Pass 1 over the loaded row: the extended state of the top-k survivors of z = x * inv_t.
// kMoments: also sum exp^2 and the finite count / mean / M2, which only p-less
// and top-n-sigma use (without them those stay 0).
template <bool kMoments>
core::FilterState filter_state_of_row(RowScratch& s, const core::FilterParams& p) {
  const int64_t padded = static_cast<int64_t>(s.x.size());
  const FVec vt(p.inv_temperature), vk(p.top_k_z), zero(0.0f), one(1.0f), neg_inf(kNegInf), pos_inf(kPosInf);
  core::FilterState row = core::empty_filter_state();
  for (int64_t t = 0; t < padded; t += kTile) {
    const int64_t n = std::min(kTile, padded - t);
    FVec vmax(kNegInf), vcount(0.0f), vtotal(0.0f);
    for (int64_t j = 0; j < n; j += kLanes) {
      const FVec scaled = FVec::loadu(s.x.data() + t + j) * vt;
      const FVec z = FVec::blendv(scaled, neg_inf, scaled < vk);  // core::top_k_survivor
      z.store(s.a + j);
      vmax = at::vec::maximum(vmax, z);
      if constexpr (kMoments) {
        const FVec finite = (z > neg_inf) & (z < pos_inf);
        vcount = vcount + (finite & one);
        vtotal = vtotal + FVec::blendv(zero, z, finite);
      }
    }
    const float m = reduce_max(vmax);
    if (m != m || m == kPosInf) return core::FilterState{core::SoftmaxState{m, 0.0f, 0.0f}, 0.0f, 0.0f, 0.0f, 0.0f};
    if (m == kNegInf) continue;  // only masked entries
    const float count = kMoments ? vsum(vcount) : 0.0f, mean = kMoments ? vsum(vtotal) / count : 0.0f;
    const FVec vm(m), vmean(mean);
    FVec se(0.0f), sb(0.0f), se2(0.0f), m2(0.0f);
    for (int64_t j = 0; j < n; j += kLanes) {
      const FVec z = FVec::loadu(s.a + j);
      const FVec d = z - vm, e = vexp(d);
      const FVec positive = e > zero;
      se = se + e;
      sb = sb + FVec::blendv(zero, d * e, positive);
      if constexpr (kMoments) {
        se2 = se2 + e * e;
        const FVec c = FVec::blendv(zero, z - vmean, z > neg_inf);
        m2 = m2 + c * c;
      }
    }
    const core::FilterState tile{core::SoftmaxState{m, vsum(se), vsum(sb)}, vsum(se2), count, mean, vsum(m2)};
    row = core::merge(row, tile);
  }
  return row;
}

// log sum exp(x - max_x) of the loaded row at temperature 1 (the raw distribution).
float raw_log_sum_shifted(const RowScratch& s, float max_x) {
  const int64_t padded = static_cast<int64_t>(s.x.size());
  const FVec vm(max_x);
  FVec acc(0.0f);
  for (int64_t i = 0; i < padded; i += kLanes) acc = acc + vexp(FVec::loadu(s.x.data() + i) - vm);
  return std::log(vsum(acc));
}

// The least d with vexp(d) > 0. vexp is 0 below a cutoff and positive above
// it (at::vec's AVX-512 exp_u20: about -86.98, where its 2^(n-1) factor
// underflows, short of ln FLT_MIN; std::exp: the end of the denormals), so a
// token's weight exp(z - m) is positive exactly when z - m reaches this: the
// mask passes test that instead of computing the exp. Found once per process
// (per CPU kernel copy), by bisection on vexp itself.
inline float positive_exp_floor() {
  static const float floor = [] {
    auto positive = [](float d) {
      alignas(64) float lanes[kLanes];
      vexp(FVec(d)).store(lanes);
      return lanes[0] > 0.0f;
    };
    float zero_at = -1000.0f, positive_at = 0.0f;
    for (;;) {
      const float mid = zero_at + (positive_at - zero_at) * 0.5f;
      if (mid == zero_at || mid == positive_at) return positive_at;
      (positive(mid) ? positive_at : zero_at) = mid;
    }
  }();
  return floor;
}

// core::kept_weight's test, kLanes tokens at a time: z >= threshold, a
// positive weight e = exp(z - m) and, where typical ran (kTypical), its
// interval |z - center| <= radius.
template <bool kTypical>
struct KeptLanes {
  FVec threshold, center, radius, shift_floor;
  explicit KeptLanes(const core::FilterCut& cut)
      : threshold(cut.threshold), center(cut.center), radius(cut.radius), shift_floor(positive_exp_floor()) {}
  FVec operator()(const FVec& z, const FVec& e) const { return interval(z) & (e > FVec(0.0f)); }
  // The same test from d = z - m, without the exp (positive_exp_floor).
  FVec by_shift(const FVec& z, const FVec& d) const { return interval(z) & (d >= shift_floor); }

 private:
  FVec interval(const FVec& z) const {
    const FVec keep = z >= threshold;
    if constexpr (kTypical) return keep & ((z - center).abs() <= radius);
    return keep;
  }
};

// visit(kept) with the keep test the cut needs: without typical's interval
// where typical is off (radius +inf), so that the other rules' passes do not
// pay its two vector operations per kLanes tokens.
template <class Visit>
decltype(auto) with_kept_lanes(const core::FilterCut& cut, Visit&& visit) {
  if (cut.radius == kPosInf) return visit(KeptLanes<false>(cut));
  return visit(KeptLanes<true>(cut));
}

// The kept weights of the tile [t, t + n) into w; adds the tile's sums to `sums`
// and returns the tile's mass.
float filter_tile_weights(const RowScratch& s, int64_t t, int64_t n, const core::FilterCut& cut, float inv_t, float* w,
                          core::KeptSums* sums) {
  return with_kept_lanes(cut, [&](const auto& kept) {
    const FVec vt(inv_t), vm(cut.max), zero(0.0f), one(1.0f);
    FVec mass(0.0f), shifted(0.0f), count(0.0f);
    for (int64_t j = 0; j < n; j += kLanes) {
      const FVec z = FVec::loadu(s.x.data() + t + j) * vt;
      const FVec d = z - vm;
      const FVec all = vexp(d);
      const FVec keep = kept(z, all);
      const FVec e = FVec::blendv(zero, all, keep);
      e.store(w + j);
      mass = mass + e;
      if (sums != nullptr) {
        shifted = shifted + FVec::blendv(zero, d * e, keep);
        count = count + (keep & one);
      }
    }
    const float tile_mass = vsum(mass);
    if (sums != nullptr) {
      sums->mass += tile_mass;
      sums->shifted += vsum(shifted);
      sums->count += vsum(count);
    }
    return tile_mass;
  });
}

// Pass 2 of filter_sample: the kept sums, then the token at u (see the top).
int64_t filter_draw(RowScratch& s, const core::FilterCut& cut, float inv_t, float u, core::KeptSums& sums) {
  const int64_t padded = static_cast<int64_t>(s.x.size());
  const int64_t tiles = (padded + kTile - 1) / kTile;
  s.tile_mass.resize(tiles);
  for (int64_t t = 0; t < tiles; ++t)
    s.tile_mass[t] = filter_tile_weights(s, t * kTile, std::min(kTile, padded - t * kTile), cut, inv_t, s.a, &sums);
  return draw_from_tiles(s, u * sums.mass,
                         [&](int64_t begin, int64_t n) { filter_tile_weights(s, begin, n, cut, inv_t, s.a, nullptr); });
}

// top-p over the top-k survivors of a defined, non-greedy row of max z m
// (core::top_p_reached): the crossing token is the first of the rank order
// whose prefix mass reaches top_p * s; it and every token of at least its z
// are kept. The walk's predicate "fits" is the negation (the prefix through
// a token is still short of the limit, so the next token is kept too).
core::TopPCut top_p_cut(RowScratch& s, int64_t cols, const core::FilterParams& p, float m) {
  const float inv_t = p.inv_temperature;
  const Sums all = fill_buckets(s, inv_t, m, p.top_k_z);
  const double limit = core::top_p_mass_limit(p.top_p, all.e);
  auto fits = [limit](const Sums& prefix) { return !core::top_p_reached(prefix.e, limit); };
  const CutBucket cut = find_cut_bucket(s, fits);
  gather_cut_bucket(s, cols, cut.bucket, inv_t, m);
  const int64_t fit = keep_in_bucket(s.tokens, cut.above, fits, inv_t, m);
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  // The crossing token is the bucket's token of rank `fit`; when rounding
  // lets the whole bucket fit (the bucket sums and the quickselect's exp
  // differ in the last bits), the bucket is kept whole.
  const float cut_x =
      fit < n ? s.tokens[fit].x
              : std::min_element(
                    s.tokens.begin(), s.tokens.end(), [](const Token& a, const Token& b) { return a.x < b.x; })
                    ->x;
  Sums kept = cut.above;  // the buckets before the cut bucket, then its tokens of x >= cut_x
  for (const Token& t : s.tokens) {
    if (t.x < cut_x) continue;
    const float d = t.x * inv_t - m;
    const float e = std::exp(d);
    kept += Sums{e, static_cast<double>(d) * e};
  }
  return core::TopPCut{core::scaled_logit(cut_x, inv_t), static_cast<float>(kept.e), static_cast<float>(kept.d)};
}

// typical (core::uses_typical) over the candidates z >= cut.threshold of a
// row: their K and D (top-p's walk or pass 1 summed them, unless another
// rule moved the threshold: then one vectorised pass), the center
// c = m + D / K, then the walk of top_p_cut over buckets of the distance
// |z - c| (kBucketsPerNat per nat, nearest first) with typical's predicate,
// the cut bucket's tokens gathered (a scan of the stored buckets) and the
// quickselect by distance: d*, the distance of the first token that does not
// fit (kept, as its ties are), or the bucket's largest when all of it fits.
void apply_typical(RowScratch& s, int64_t cols, const core::FilterParams& p, const core::TopPCut& top_p,
                   core::FilterCut& cut) {
  const float inv_t = p.inv_temperature, m = cut.max;
  core::KeptSums candidates{top_p.mass, top_p.shifted, 0.0f};
  if (!core::typical_candidates_known(p, top_p, cut)) {
    candidates = core::KeptSums{0.0f, 0.0f, 0.0f};
    const int64_t padded = static_cast<int64_t>(s.x.size());
    for (int64_t t = 0; t < padded; t += kTile)
      filter_tile_weights(s, t, std::min(kTile, padded - t), cut, inv_t, s.a, &candidates);
  }
  const float center = core::typical_center(m, candidates.mass, candidates.shifted);
  auto distance = [inv_t, center](float x) { return core::typical_distance(core::scaled_logit(x, inv_t), center); };
  auto bucket_of = [center](float z) {
    return std::min(kBuckets - 1, static_cast<int>(core::typical_distance(z, center) * kBucketsPerNat));
  };
  const Sums all = fill_buckets_by(s, inv_t, m, cut.threshold, bucket_of);
  const core::TypicalLimit limit = core::typical_limit(p, static_cast<float>(all.e));
  auto fits = [limit](const Sums& prefix) { return !core::typical_reached(prefix.e, prefix.count, limit); };
  const CutBucket walk = find_cut_bucket(s, fits);
  s.tokens.clear();
  for (int64_t i = 0; i < cols && walk.bucket >= 0; ++i) {
    if (s.bucket[i] == walk.bucket) s.tokens.push_back(Token{s.x[i], i});
  }
  auto nearer = [&distance](const Token& a, const Token& b) {
    const float da = distance(a.x), db = distance(b.x);
    return da < db || (da == db && a.index < b.index);
  };
  const int64_t fit = keep_in_bucket(s.tokens, walk.above, fits, inv_t, m, nearer);
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  float radius = kPosInf;  // (no candidate bucket: cannot happen, the row max is a candidate)
  if (fit < n) {
    radius = distance(s.tokens[fit].x);
  } else if (n > 0) {
    radius = distance(std::max_element(s.tokens.begin(), s.tokens.end(), nearer)->x);
  }
  cut.center = center;
  cut.radius = radius;
}

// The k-th largest logits of the loaded row that top-k and the keep floor
// need (core::rank_counts; count 0: none, -inf / +inf returned): the larger
// count's best tokens (select_best_tokens, top_h_cpu.cpp: one vectorised
// threshold-filter pass), then nth_element puts the smaller count's k-th
// (rank order: larger x, then lower index) in place among them.
struct RankCutLogits {
  float top_k_x;
  float floor_x;
};

RankCutLogits rank_cut_logits(RowScratch& s, int64_t cols, const core::RankCounts& ranks) {
  const int64_t k = std::max(ranks.top_k, ranks.floor);
  select_best_tokens(s, cols, k);
  // Fewer than k tokens only when the row holds NaN (never >= a threshold):
  // such a row keeps nothing whatever these logits are.
  if (static_cast<int64_t>(s.tokens.size()) < k) return RankCutLogits{kNegInf, kPosInf};
  const float kth_x = s.tokens[k - 1].x;  // the larger count's
  const int64_t other = std::min(ranks.top_k, ranks.floor);
  float other_x = kth_x;
  if (other > 0 && other < k) {
    std::nth_element(s.tokens.begin(), s.tokens.begin() + (other - 1), s.tokens.begin() + k, ranks_before);
    other_x = s.tokens[other - 1].x;
  }
  const bool top_k_larger = ranks.top_k == k;
  return RankCutLogits{ranks.top_k == 0 ? kNegInf : (top_k_larger ? kth_x : other_x),
                       ranks.floor == 0 ? kPosInf : (top_k_larger ? other_x : kth_x)};
}

// Top-H "hf" as the chain's first rule (core::uses_top_h): its kept set
// (capped_keep, top_h_mask's own selection and scan), and the loaded row's
// other tokens set to -inf, so that the rules after it see its survivors
// renormalised, as on the unfused route. top-k's and the floor's logits are
// then ranks among its kept tokens, which capped_keep sorted (-inf past
// them, as on the masked row): no selection pass.
RankCutLogits keep_top_h_survivors(RowScratch& s, int64_t cols, const core::FilterParams& p) {
  TopHParams top_h;
  top_h.rule = core::TopHRule::hf;
  top_h.alpha = p.top_h_alpha;
  top_h.inv_temperature = p.inv_temperature;
  top_h.k = static_cast<int64_t>(p.top_h_count);
  const int64_t kept = capped_keep(s, cols, top_h, 0.0f);
  // Kept: x > last.x, and the last kept token's ties up to its index (two
  // index ranges, so that each loop is a plain compare-and-select).
  const Token last = s.tokens[kept - 1];
  const int64_t ties_kept_until = std::min(cols, last.index + 1);
  float* x = s.x.data();
  for (int64_t i = 0; i < ties_kept_until; ++i) x[i] = x[i] >= last.x ? x[i] : kNegInf;
  for (int64_t i = ties_kept_until; i < cols; ++i) x[i] = x[i] > last.x ? x[i] : kNegInf;
  const core::RankCounts ranks = core::rank_counts(p, cols);
  auto logit_of_rank = [&](int64_t rank, float off) {
    return rank == 0 ? off : (rank <= kept ? s.tokens[rank - 1].x : kNegInf);
  };
  return RankCutLogits{logit_of_rank(ranks.top_k, kNegInf), logit_of_rank(ranks.floor, kPosInf)};
}

// Runs finish(row, scratch, params, cut, max_x, raw_log_sum) for every row, in
// parallel. raw_log_sum: with `raw`, raw_log_sum_shifted of the row as loaded
// (before Top-H drops tokens from the scratch copy); NaN without.
template <class scalar_t, class Finish>
void for_each_filter_row(const Rows& r, const float* params, Finish finish, bool raw = false) {
  const scalar_t* data = r.tensor.data_ptr<scalar_t>();
  at::parallel_for(0, r.rows, 1, [&](int64_t first, int64_t last) {
    auto s = std::make_unique<RowScratch>();
    s->x.resize(round_up_to_lanes(r.cols));
    for (int64_t row = first; row < last; ++row) {
      core::FilterParams p = core::decode_filter_params(params + row * core::kFilterParamCount);
      const float max_x = load_row(data + row * r.row_stride, r.cols, *s);
      const bool defined = max_x > kNegInf && max_x < kPosInf;
      const float raw_log_sum =
          raw && defined ? raw_log_sum_shifted(*s, max_x) : std::numeric_limits<float>::quiet_NaN();
      // (Top-H keeps the row max; a row without a distribution skips it.)
      if (core::uses_top_h(p, r.cols) && defined) {
        const RankCutLogits cuts = keep_top_h_survivors(*s, r.cols, p);
        p = core::with_rank_cuts(p, cuts.top_k_x, cuts.floor_x);
      } else if (const core::RankCounts ranks = core::rank_counts(p, r.cols); ranks.top_k > 0 || ranks.floor > 0) {
        const RankCutLogits cuts = rank_cut_logits(*s, r.cols, ranks);
        p = core::with_rank_cuts(p, cuts.top_k_x, cuts.floor_x);
      }
      const bool moments = p.p_less != 0.0f || p.top_n_sigma < kPosInf;
      core::FilterState st = core::empty_filter_state();
      if (!core::needs_row_sums(p)) {  // no pass 1: the cut needs only the max z
        st.sm.max = core::scaled_logit(max_x, p.inv_temperature);
      } else {
        st = moments ? filter_state_of_row<true>(*s, p) : filter_state_of_row<false>(*s, p);
      }
      const core::TopPCut top_p =
          core::uses_top_p(p, st.sm.max) ? top_p_cut(*s, r.cols, p, st.sm.max) : core::no_top_p_cut(st);
      core::FilterCut cut = core::filter_cut(st, p, top_p);
      if (core::uses_typical(p, cut)) apply_typical(*s, r.cols, p, top_p, cut);
      finish(row, *s, p, cut, max_x, raw_log_sum);
    }
  });
}

// What pass 2 of filter_mask / filter_logits writes for a token: the keep
// mask (out_t = bool), or the logit where kept and filter_value elsewhere
// (out_t = the input dtype; x came from it, so the conversion back is exact).
template <class out_t>
struct FilterOutput {
  out_t* out;
  float filter_value;
  out_t kept(float x) const {
    if constexpr (std::is_same_v<out_t, bool>) {
      return true;
    } else {
      return static_cast<out_t>(x);
    }
  }
  out_t dropped() const {
    if constexpr (std::is_same_v<out_t, bool>) {
      return false;
    } else {
      return static_cast<out_t>(filter_value);
    }
  }
};

// filter_mask and filter_logits: pass 2 tests z >= threshold and
// exp(z - m) > 0 (as z - m >= positive_exp_floor(): the same decision as
// sampling's kept weights, without the exp), kLanes tokens at a time; float32
// output is blended and stored as vectors.
template <class scalar_t, class out_t>
void filter_write_rows(const Rows& r, const float* params, FilterOutput<out_t> o) {
  const int64_t cols = r.cols;
  for_each_filter_row<scalar_t>(
      r, params,
      [&](int64_t row, const RowScratch& s, const core::FilterParams& p, const core::FilterCut& cut, float, float) {
        out_t* dst = o.out + row * cols;
        if (!cut.defined) return std::fill(dst, dst + cols, o.dropped());
        if (cut.max == kNegInf) {  // all -inf: token 0 only
          std::fill(dst, dst + cols, o.dropped());
          dst[0] = o.kept(s.x[0]);
          return;
        }
        with_kept_lanes(cut, [&](const auto& kept) {
          const FVec vt(p.inv_temperature), vm(cut.max), one(1.0f);
          const FVec dropped(o.filter_value);
          alignas(64) float lanes[kLanes];
          for (int64_t i = 0; i < cols; i += kLanes) {
            const FVec x = FVec::loadu(s.x.data() + i);
            const FVec z = x * vt;
            const FVec keep = kept.by_shift(z, z - vm);
            const int64_t n = std::min(kLanes, cols - i);
            if constexpr (std::is_same_v<out_t, float>) {
              FVec::blendv(dropped, x, keep).store(dst + i, static_cast<int>(n));
            } else {
              (keep & one).store(lanes);
              for (int64_t j = 0; j < n; ++j) dst[i + j] = lanes[j] != 0.0f ? o.kept(s.x[i + j]) : o.dropped();
            }
          }
        });
      });
}

template <class scalar_t>
void filter_mask_rows(const Rows& r, const float* params, bool* out) {
  filter_write_rows<scalar_t, bool>(r, params, FilterOutput<bool>{out, 0.0f});
}

template <class scalar_t>
void filter_logits_rows(const Rows& r, const float* params, float filter_value, scalar_t* out) {
  filter_write_rows<scalar_t, scalar_t>(r, params, FilterOutput<scalar_t>{out, filter_value});
}

// Writes a row's token and statistics (SampleStat columns).
inline void write_draw(int64_t token, float log_q, float raw, float entropy, float count, int64_t* tokens, float* stats,
                       int64_t row) {
  tokens[row] = token;
  float* st = stats + row * kSampleStatCount;
  st[kLogProb] = log_q;
  st[kRawLogProb] = raw;
  st[kEntropy] = entropy;
  st[kKeptCount] = count;
}

template <class scalar_t>
void filter_sample_rows(const Rows& r, const float* params, const float* uniform, bool raw_log_prob, int64_t* tokens,
                        float* stats) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  for_each_filter_row<scalar_t>(
      r, params,
      [&](int64_t row, RowScratch& s, const core::FilterParams& p, const core::FilterCut& cut, float max_x,
          float raw_log_sum) {
        if (!cut.defined) return write_draw(-1, kNaN, kNaN, kNaN, 0.0f, tokens, stats, row);
        if (cut.max == kNegInf) return write_draw(0, 0.0f, kNaN, 0.0f, 1.0f, tokens, stats, row);
        core::KeptSums sums{0.0f, 0.0f, 0.0f};
        const int64_t token = filter_draw(s, cut, p.inv_temperature, uniform[row], sums);
        const float x = s.x[token];
        const float log_mass = std::log(sums.mass);
        const float log_q = (core::scaled_logit(x, p.inv_temperature) - cut.max) - log_mass;
        const float raw = raw_log_prob ? (x - max_x) - raw_log_sum : kNaN;
        write_draw(token, log_q, raw, log_mass - sums.shifted / sums.mass, sums.count, tokens, stats, row);
      },
      raw_log_prob);
}
