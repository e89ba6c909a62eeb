// CPU kernels of the row ops, vectorised with ATen's at::vec and parallel
// over rows (and over slices of a row when there are fewer rows than
// threads). Compiled once per CPU capability (see kernel_tables.h).
//
// Data flow per row: the row is walked in tiles of kTile elements that are
// converted to fp32 (and scaled by 1/T) into a stack buffer, so bf16/fp16
// inputs never get a full-size fp32 copy. Pass 1 folds each tile into the
// mergeable state of csrc/core/softmax_state.h (one tile max, one rescale,
// one exp per element); pass 2 re-reads the row, which is still in the
// core's cache because both passes of a row run back to back on one thread.
//
// The ops' states, merges, row constants and per-row results are the scalar
// policies of csrc/core/row_ops.h; this file adds their vector tile bodies.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../core/row_ops.h"
#include "../core/softmax_state.h"
#include "kernel_tables.h"
#include "tuning.h"
#include "vec_tiles.h"

#ifndef CPU_CAPABILITY
#error "row_ops_cpu.cpp must be compiled with CPU_CAPABILITY set (see CMakeLists.txt)"
#endif

namespace logitkit::cpu::CPU_CAPABILITY {
namespace {

// A tile of src[0..n) * scale in fp32, with the max of its first n values.
struct Tile {
  const float* values;  // padded with `pad` to a multiple of kLanes
  float max;
};

// src itself when it already is an fp32 tile (scale 1, no padding needed),
// else a converted copy in `buffer`. The max is computed for a direct tile
// only when `with_max` (a converted copy gets it for free).
template <class scalar_t>
Tile tile_of(const scalar_t* src, int64_t n, float scale, float pad, float* buffer, bool with_max) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (scale == 1.0f && n % kLanes == 0) return Tile{src, with_max ? tile_max(src, n) : 0.0f};
  }
  const float m = load_tile(src, n, scale, pad, buffer);
  return Tile{buffer, m};
}

// Stores one vector of outputs. With `streaming` (long rows, not read again
// soon) an aligned vector goes out with a non-temporal store, which skips the
// read-for-ownership of the cache line: a third of the memory traffic of a
// softmax. Streaming stores are ordered by fence_streaming_stores().
template <class scalar_t>
inline void store_output(const at::vec::Vectorized<scalar_t>& v, scalar_t* dst, bool streaming) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (streaming && reinterpret_cast<uintptr_t>(dst) % sizeof(v) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(dst, v);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
    }
#else
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(dst, v);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
    }
#endif
    return;
  }
#endif
  (void)streaming;
  v.store(dst);
}

inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Whether output rows of `cols` elements go out with streaming stores.
template <class scalar_t>
bool streaming_row(int64_t cols) {
  return cols * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamingRowBytes;
}

// dst[0..n) = src[0..n) * scale, converted to scalar_t.
template <class scalar_t>
void store_tile(const float* src, int64_t n, float scale, scalar_t* dst, bool streaming) {
  int64_t i = 0;
  const FVec s(scale);
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + kLanes <= n; i += kLanes) store_output(FVec::loadu(src + i) * s, dst + i, streaming);
  } else {
    using BVec = at::vec::Vectorized<scalar_t>;
    for (; i + BVec::size() <= n; i += BVec::size()) {
      store_output(at::vec::convert_from_float<scalar_t>(FVec::loadu(src + i) * s, FVec::loadu(src + i + kLanes) * s),
                   dst + i, streaming);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * scale);
}

// ---------------------------------------------------------------------------
// Tile reductions and maps. `n` is a multiple of kLanes (tiles are padded).
// ---------------------------------------------------------------------------

// Folds a tile of scaled logits z into the softmax state and returns the max
// m the tile's exponentials are taken against (the running max). With
// kShifted the state's sum_shifted (needed by entropy) is kept too; with
// `exps` non-null, exp(z_i - m) is stored there (softmax reuses it).
// Returns -inf for a fully masked tile, NaN if the row became undefined.
template <bool kShifted>
float accumulate_softmax_state(core::SoftmaxState& state, const Tile& tile, int64_t n, float* exps) {
  const float* z = tile.values;
  const float max_of_tile = tile.max;
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (std::isnan(max_of_tile)) {  // at::vec::maximum propagates NaN: the row is NaN
    state.sum_exp = kNaN;
    return kNaN;
  }
  if (max_of_tile == std::numeric_limits<float>::infinity()) {
    state.max = max_of_tile;  // the row is undefined (see softmax_state.h); its outputs are NaN
    return kNaN;
  }
  if (max_of_tile == kNegInf || state.max == std::numeric_limits<float>::infinity()) {
    if (exps != nullptr) std::fill(exps, exps + n, 0.0f);
    return kNegInf;  // fully masked tile
  }
  const float m = std::max(state.max, max_of_tile);
  const float f = core::rescale_factor(state.max, m);
  const FVec vm(m);
  const FVec lowest(std::numeric_limits<float>::lowest());
  FVec vs(0.0f), vb(0.0f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const FVec d = FVec::loadu(z + i) - vm;
    const FVec e = vexp(d);
    vs = vs + e;
    if (exps != nullptr) e.store(exps + i);
    // Clamping -inf to the lowest finite value keeps d * exp(d) at 0, not NaN.
    if constexpr (kShifted) vb = at::vec::fmadd(at::vec::maximum(d, lowest), e, vb);
  }
  if constexpr (kShifted) state.sum_shifted = core::rescaled_shifted(state, m, f) + vsum(vb);
  state.sum_exp = state.sum_exp * f + vsum(vs);
  state.max = m;
  return m;
}

// The vector tile bodies of core::SoftmaxReduction: kShifted also keeps
// sum_shifted (for entropy; the other ops skip it).
template <bool kShifted>
struct SoftmaxTiles {
  static constexpr bool kScaleA = true;  // a holds logits: scale by 1/T on load
  static constexpr float kPadA = kNegInf;
  static constexpr bool kNeedsMax = true;  // accumulate needs each tile's max
  static void accumulate(core::SoftmaxState& s, const Tile& a, const Tile&, int64_t n) {
    accumulate_softmax_state<kShifted>(s, a, n, nullptr);
  }
};

// The vector tile bodies of core::SumReduction<kDot>.
template <bool kDot>
struct SumTiles {
  static constexpr bool kScaleA = false;
  static constexpr float kPadA = 0.0f;
  static constexpr bool kNeedsMax = false;
  static void accumulate(core::RowSum& s, const Tile& ta, const Tile& tb, int64_t n) {
    const float* a = ta.values;
    const float* b = tb.values;
    FVec acc(0.0f);
    for (int64_t i = 0; i < n; i += kLanes) {
      acc = kDot ? at::vec::fmadd(FVec::loadu(a + i), FVec::loadu(b + i), acc) : acc + FVec::loadu(a + i);
    }
    s.value += vsum(acc);
  }
};

// ---------------------------------------------------------------------------
// Map ops: a core policy (state, merge, row constants) + Tiles (the vector
// reduction) + map (the vector output over a tile). undefined(c): the row's
// outputs are all NaN (its distribution is undefined: NaN or +inf logits).
// log p_i = (z_i - m) - log s, see core::Normaliser.
// ---------------------------------------------------------------------------

inline FVec log_probs(const core::Normaliser& c, const FVec& z) { return (z - FVec(c.max)) - FVec(c.log_sum); }

// A single-input map whose output is map_one(c, z) per vector: map() over a
// tile follows from it.
template <class Derived>
struct VectorMap {
  template <class Constants>
  static void map(const Constants& c, const float* z, const float*, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i += kLanes) Derived::map_one(c, FVec::loadu(z + i)).store(out + i);
  }
};

struct SoftmaxOp : core::SoftmaxMap, VectorMap<SoftmaxOp> {
  using Tiles = SoftmaxTiles<false>;
  static bool undefined(const RowConstants& c) { return c.undefined(); }
  static FVec map_one(const RowConstants& c, const FVec& z) { return vexp(log_probs(c, z)); }
};

struct LogSoftmaxOp : core::LogSoftmaxMap, VectorMap<LogSoftmaxOp> {
  using Tiles = SoftmaxTiles<false>;
  static bool undefined(const RowConstants& c) { return c.undefined(); }
  static FVec map_one(const RowConstants& c, const FVec& z) { return log_probs(c, z); }
};

// g p / T
struct LogsumexpGradOp : core::LogsumexpGradMap {
  using Tiles = SoftmaxTiles<false>;
  static bool undefined(const RowConstants& c) { return c.normaliser.undefined() || std::isnan(c.scale); }
  static void map(const RowConstants& c, const float* z, const float*, float* out, int64_t n) {
    const FVec scale(c.scale);
    for (int64_t i = 0; i < n; i += kLanes) (scale * vexp(log_probs(c.normaliser, FVec::loadu(z + i)))).store(out + i);
  }
};

// -(g/T) p (log p + H), 0 where p = 0
struct EntropyGradOp : core::EntropyGradMap {
  using Tiles = SoftmaxTiles<true>;
  static bool undefined(const RowConstants& c) {
    return c.normaliser.undefined() || std::isnan(c.entropy) || std::isnan(c.scale);
  }
  static void map(const RowConstants& c, const float* z, const float*, float* out, int64_t n) {
    const FVec h(c.entropy), neg_scale(-c.scale);
    const FVec lowest(std::numeric_limits<float>::lowest());
    for (int64_t i = 0; i < n; i += kLanes) {
      // Clamp -inf to the lowest float so that p * log p is 0, not NaN.
      const FVec log_p = at::vec::maximum(log_probs(c.normaliser, FVec::loadu(z + i)), lowest);
      const FVec p = vexp(log_p);
      (neg_scale * p * (log_p + h)).store(out + i);
    }
  }
};

// a = dy, b = y: y (dy - sum dy*y) / T
struct SoftmaxGradOp : core::SoftmaxGradMap {
  using Tiles = SumTiles<true>;
  static bool undefined(const RowConstants&) { return false; }
  void map(const RowConstants& c, const float* dy, const float* y, float* out, int64_t n) const {
    const FVec dot(c.dot), inv_t(inv_temperature);
    for (int64_t i = 0; i < n; i += kLanes) (inv_t * FVec::loadu(y + i) * (FVec::loadu(dy + i) - dot)).store(out + i);
  }
};

// a = dy, b = y = log p: (dy - exp(y) sum dy) / T
struct LogSoftmaxGradOp : core::LogSoftmaxGradMap {
  using Tiles = SumTiles<false>;
  static bool undefined(const RowConstants&) { return false; }
  void map(const RowConstants& c, const float* dy, const float* y, float* out, int64_t n) const {
    const FVec sum(c.sum), inv_t(inv_temperature);
    for (int64_t i = 0; i < n; i += kLanes) {
      (inv_t * (FVec::loadu(dy + i) - vexp(FVec::loadu(y + i)) * sum)).store(out + i);
    }
  }
};

// The softmax state of z = a / T alone (for the per-row results).
template <bool kShifted>
struct SoftmaxStateOp : core::SoftmaxReduction {
  using Tiles = SoftmaxTiles<kShifted>;
};

// ---------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------

// How a (rows, cols) problem is cut into parallel work: each row into
// `slices` slices of `slice` elements.
struct Plan {
  int64_t slices;
  int64_t slice;
  int64_t begin(int64_t w) const { return (w % slices) * slice; }  // of work item w = row * slices + k
  int64_t end(int64_t w, int64_t cols) const { return std::min(cols, begin(w) + slice); }
};

Plan plan_slices(int64_t rows, int64_t cols) {
  const int64_t threads = at::get_num_threads();
  int64_t slices = 1;
  if (rows < threads) {
    slices = std::min((threads + rows - 1) / rows, std::max<int64_t>(1, cols / kMinSliceElements));
  }
  int64_t slice = (cols + slices - 1) / slices;
  slice = (slice + kTile - 1) / kTile * kTile;  // slices start on tile boundaries
  return Plan{(cols + slice - 1) / slice, slice};
}

template <class scalar_t>
const scalar_t* row_of(const Rows* r, int64_t row) {
  return r != nullptr ? r->tensor.data_ptr<scalar_t>() + row * r->row_stride : nullptr;
}

// Reduces elements [begin, end) of row `row` of a (and b) into a state.
template <class Op, class scalar_t>
typename Op::State reduce_range(const Op& op, const Rows& a, const Rows* b, int64_t row, int64_t begin, int64_t end) {
  using Tiles = typename Op::Tiles;
  alignas(64) float ta[kTile];
  alignas(64) float tb[kTile];
  const scalar_t* pa = row_of<scalar_t>(&a, row);
  const scalar_t* pb = row_of<scalar_t>(b, row);
  typename Op::State state = op.identity();
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    const Tile va = tile_of(pa + t, n, Tiles::kScaleA ? op.inv_temperature : 1.0f, Tiles::kPadA, ta, Tiles::kNeedsMax);
    const Tile vb = pb != nullptr ? tile_of(pb + t, n, 1.0f, 0.0f, tb, false) : Tile{nullptr, 0.0f};
    Tiles::accumulate(state, va, vb, round_up_to_lanes(n));
  }
  return state;
}

// Single-input maps run straight from the input to the output, one vector at
// a time (no fp32 tile round trips); returns where the tile path takes over
// (the tail).
template <class Op, class scalar_t>
int64_t map_vectors(const Op& op, const typename Op::RowConstants& c, const scalar_t* pa, scalar_t* po, int64_t begin,
                    int64_t end, bool streaming) {
  const FVec scale(op.inv_temperature);
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + kLanes <= end; i += kLanes) store_output(Op::map_one(c, FVec::loadu(pa + i) * scale), po + i, streaming);
  } else {
    using BVec = at::vec::Vectorized<scalar_t>;
    for (; i + BVec::size() <= end; i += BVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(BVec::loadu(pa + i));
      store_output(at::vec::convert_from_float<scalar_t>(Op::map_one(c, lo * scale), Op::map_one(c, hi * scale)),
                   po + i, streaming);
    }
  }
  return i;
}

// Writes out[row, begin:end) = op.map(constants, a, b).
template <class Op, class scalar_t>
void map_range(const Op& op, const typename Op::RowConstants& c, const MapArgs<scalar_t>& args, int64_t row,
               int64_t begin, int64_t end) {
  using Tiles = typename Op::Tiles;
  alignas(64) float ta[kTile];
  alignas(64) float tb[kTile];
  alignas(64) float to[kTile];
  const scalar_t* pa = row_of<scalar_t>(args.a, row);
  const scalar_t* pb = row_of<scalar_t>(args.b, row);
  scalar_t* po = args.out + row * args.a->cols;
  if (Op::undefined(c)) {
    std::fill(po + begin, po + end, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  const bool streaming = streaming_row<scalar_t>(args.a->cols);
  int64_t first_tile = begin;
  if constexpr (requires(const FVec& v) { Op::map_one(c, v); }) {
    first_tile = map_vectors(op, c, pa, po, begin, end, streaming);
  }
  for (int64_t t = first_tile; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    const float* va = tile_of(pa + t, n, Tiles::kScaleA ? op.inv_temperature : 1.0f, Tiles::kPadA, ta, false).values;
    const float* vb = pb != nullptr ? tile_of(pb + t, n, 1.0f, 0.0f, tb, false).values : nullptr;
    op.map(c, va, vb, to, round_up_to_lanes(n));
    store_tile(to, n, 1.0f, po + t, streaming);
  }
  fence_streaming_stores();
}

template <class Op, class scalar_t>
typename Op::RowConstants row_constants(const Op& op, const typename Op::State& state, const MapArgs<scalar_t>& args,
                                        int64_t row) {
  const float g = args.row_grad != nullptr ? static_cast<float>(args.row_grad[row]) : 0.0f;
  return op.row_constants(state, g);
}

// Softmax of whole rows with one exp per element: pass 1 keeps exp(z - m_t)
// of every tile in a per-thread fp32 row buffer (m_t: the running max when
// tile t was read); pass 2 only rescales, p = exp(z - m_t) * exp(m_t - m - log s),
// instead of re-reading the input and taking a second exp.
template <class scalar_t>
void softmax_rows_one_exp(const MapArgs<scalar_t>& args, int64_t first, int64_t last) {
  const Rows& a = *args.a;
  const int64_t tiles = (a.cols + kTile - 1) / kTile;
  thread_local std::vector<float> exps;
  thread_local std::vector<float> reference_max;  // m_t of each tile
  exps.resize(tiles * kTile);
  reference_max.resize(tiles);
  alignas(64) float z[kTile];
  const bool streaming = streaming_row<scalar_t>(a.cols);
  for (int64_t r = first; r < last; ++r) {
    const scalar_t* x = row_of<scalar_t>(&a, r);
    scalar_t* out = args.out + r * a.cols;
    core::SoftmaxState state = core::empty_state();
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = std::min(kTile, a.cols - t * kTile);
      const Tile zt = tile_of(x + t * kTile, n, args.inv_temperature, kNegInf, z, true);
      reference_max[t] = accumulate_softmax_state<false>(state, zt, round_up_to_lanes(n), exps.data() + t * kTile);
    }
    const core::Normaliser c = core::normaliser(state);
    if (c.undefined()) {
      std::fill(out, out + a.cols, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = std::min(kTile, a.cols - t * kTile);
      const float factor = reference_max[t] == kNegInf ? 0.0f : std::exp((reference_max[t] - c.max) - c.log_sum);
      store_tile(exps.data() + t * kTile, n, factor, out + t * kTile, streaming);
    }
  }
  fence_streaming_stores();
}

// The per-(row, slice) states of a row op in parallel: partial[w] for work
// item w = row * plan.slices + slice.
template <class scalar_t, class Op>
std::vector<typename Op::State> slice_states(const Op& op, const Rows& a, const Rows* b, const Plan& plan) {
  std::vector<typename Op::State> partial(a.rows * plan.slices);
  at::parallel_for(0, a.rows * plan.slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      partial[w] = reduce_range<Op, scalar_t>(op, a, b, w / plan.slices, plan.begin(w), plan.end(w, a.cols));
    }
  });
  return partial;
}

// The merged state of row r from its slices' states (in slice order).
template <class Op>
typename Op::State merge_slices(const Op& op, const std::vector<typename Op::State>& partial, int64_t r,
                                int64_t slices) {
  typename Op::State state = op.identity();
  for (int64_t k = 0; k < slices; ++k) state = op.merge(state, partial[r * slices + k]);
  return state;
}

template <class Op, class scalar_t>
void run_map(const Op& op, const MapArgs<scalar_t>& args) {
  const Rows& a = *args.a;
  const Plan plan = plan_slices(a.rows, a.cols);
  if constexpr (std::is_same_v<Op, SoftmaxOp>) {
    if (plan.slices == 1 && a.cols <= kMaxCachedRow) {
      at::parallel_for(0, a.rows, 1, [&](int64_t first, int64_t last) { softmax_rows_one_exp(args, first, last); });
      return;
    }
  }
  if (plan.slices == 1) {
    // Both passes of a row back to back on one thread: pass 2 reads from cache.
    at::parallel_for(0, a.rows, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const auto state = reduce_range<Op, scalar_t>(op, a, args.b, r, 0, a.cols);
        map_range(op, row_constants(op, state, args, r), args, r, 0, a.cols);
      }
    });
    return;
  }
  const auto partial = slice_states<scalar_t>(op, a, args.b, plan);
  at::parallel_for(0, a.rows * plan.slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const int64_t r = w / plan.slices;
      const auto state = merge_slices(op, partial, r, plan.slices);
      map_range(op, row_constants(op, state, args, r), args, r, plan.begin(w), plan.end(w, a.cols));
    }
  });
}

template <class Op>
Op with_temperature(float inv_temperature) {
  Op op{};
  op.inv_temperature = inv_temperature;
  return op;
}

template <class scalar_t>
void map(MapKind kind, const MapArgs<scalar_t>& args) {
  const float inv_t = args.inv_temperature;
  switch (kind) {
    case MapKind::softmax: return run_map(with_temperature<SoftmaxOp>(inv_t), args);
    case MapKind::log_softmax: return run_map(with_temperature<LogSoftmaxOp>(inv_t), args);
    case MapKind::logsumexp_grad: return run_map(with_temperature<LogsumexpGradOp>(inv_t), args);
    case MapKind::entropy_grad: return run_map(with_temperature<EntropyGradOp>(inv_t), args);
    case MapKind::softmax_grad: return run_map(with_temperature<SoftmaxGradOp>(inv_t), args);
    case MapKind::log_softmax_grad: return run_map(with_temperature<LogSoftmaxGradOp>(inv_t), args);
  }
}

// Per-row results: the rows' softmax states (kShifted: with sum_shifted,
// which only entropy and stats need), then result.finalize per row.
template <bool kShifted, class Result, class scalar_t>
void finalize_rows(const Result& result, const ResultArgs<scalar_t>& args) {
  const Rows& a = *args.a;
  const Plan plan = plan_slices(a.rows, a.cols);
  const SoftmaxStateOp<kShifted> op{{args.inv_temperature}};
  const auto partial = slice_states<scalar_t>(op, a, nullptr, plan);
  for (int64_t r = 0; r < a.rows; ++r) result.finalize(merge_slices(op, partial, r, plan.slices), r);
}

template <class scalar_t>
void reduce(ResultKind kind, const ResultArgs<scalar_t>& args) {
  const float inv_t = args.inv_temperature;
  switch (kind) {
    case ResultKind::logsumexp:
      return finalize_rows<false>(core::LogsumexpResult<scalar_t>{{inv_t}, static_cast<scalar_t*>(args.out)}, args);
    case ResultKind::entropy:
      return finalize_rows<true>(core::EntropyResult{{inv_t}, static_cast<float*>(args.out)}, args);
    case ResultKind::stats: return finalize_rows<true>(core::StatsResult{{inv_t}, static_cast<float*>(args.out)}, args);
  }
}

}  // namespace

const PerDtype<RowOpsKernels> row_ops_kernels = PerDtype<RowOpsKernels>::build(
    []<class scalar_t>() { return RowOpsKernels<scalar_t>{&map<scalar_t>, &reduce<scalar_t>}; });

}  // namespace logitkit::cpu::CPU_CAPABILITY
