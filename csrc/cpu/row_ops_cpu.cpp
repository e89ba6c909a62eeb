// CPU kernels of the row ops, vectorised with ATen's at::vec and parallel
// over rows (and over slices of a row when there are fewer rows than
// threads). Compiled once per CPU capability (see kernel_tables.h).
//
// Data flow per row: the row is walked in tiles of kTile elements that are
// converted to the arithmetic type acc_t (float32; float64 for float64
// inputs) and scaled by 1/T into a stack buffer, so bf16/fp16 inputs never
// get a full-size fp32 copy. Pass 1 reduces each tile to its own state (for
// the softmax ops the mergeable state of csrc/core/softmax_state.h relative
// to the tile's max: one tile max, one exp per element) and merges the
// tiles' states along a fixed tree (merge_tree.h); pass 2 re-reads the row,
// which is still in the core's cache because both passes of a row run back
// to back on one thread.
//
// Determinism (docs/determinism.md): a row's result depends on the row
// alone. Tiles start at fixed offsets of the row, every per-element output
// is a function of its element and the row's merged state, and the merge
// tree depends on the tile count only; a row split over threads hands the
// aligned blocks of that tree from thread to thread. So results are the
// same bits whatever the thread count and the rows around the row.
//
// The ops' states, merges, row constants and per-row results are the scalar
// policies of csrc/core/row_ops.h; this file adds their vector tile bodies.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
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
#include "merge_tree.h"
#include "tuning.h"
#include "vec_tiles.h"

#ifndef CPU_CAPABILITY
#error "row_ops_cpu.cpp must be compiled with CPU_CAPABILITY set (see CMakeLists.txt)"
#endif

namespace logitkit::cpu::CPU_CAPABILITY {
namespace {

template <class acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// A tile of src[0..n) * scale in acc_t, with the max of its first n values.
template <class acc_t>
struct Tile {
  const acc_t* values;  // padded with `pad` to a multiple of the lanes
  acc_t max;
};

// src itself when it already is a tile of acc_t (scale 1, no padding
// needed), else a converted copy in `buffer`. The max is computed for a
// direct tile only when `with_max` (a converted copy gets it for free).
template <class scalar_t, class acc_t>
Tile<acc_t> tile_of(const scalar_t* src, int64_t n, acc_t scale, acc_t pad, acc_t* buffer, bool with_max) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (scale == acc_t(1) && n % kLanesOf<acc_t> == 0) return Tile<acc_t>{src, with_max ? tile_max(src, n) : acc_t(0)};
  }
  const acc_t m = load_tile(src, n, scale, pad, buffer);
  return Tile<acc_t>{buffer, m};
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
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm512_stream_pd(dst, v);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
    }
#else
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(dst, v);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(dst, v);
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
template <class scalar_t, class acc_t>
void store_tile(const acc_t* src, int64_t n, acc_t scale, scalar_t* dst, bool streaming) {
  using V = Vec<acc_t>;
  int64_t i = 0;
  const V s(scale);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + V::size() <= n; i += V::size()) store_output(V::loadu(src + i) * s, dst + i, streaming);
  } else {
    using BVec = at::vec::Vectorized<scalar_t>;
    for (; i + BVec::size() <= n; i += BVec::size()) {
      store_output(at::vec::convert_from_float<scalar_t>(V::loadu(src + i) * s, V::loadu(src + i + V::size()) * s),
                   dst + i, streaming);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * scale);
}

// ---------------------------------------------------------------------------
// Tile reductions and maps. `n` is a multiple of the lanes (tiles are padded).
// ---------------------------------------------------------------------------

// The softmax state of one tile of scaled logits z, relative to the tile's
// own max: (m_t, sum exp(z - m_t), and with kShifted sum (z - m_t) exp(z - m_t),
// which only entropy needs). With `exps` non-null, exp(z_i - m_t) is stored
// there (softmax reuses it), all 0 for a fully masked tile.
template <bool kShifted, class acc_t>
core::BasicSoftmaxState<acc_t> tile_softmax_state(const Tile<acc_t>& tile, int64_t n, acc_t* exps) {
  using V = Vec<acc_t>;
  const acc_t m = tile.max;
  if (std::isnan(m)) return core::nan_state<acc_t>();  // at::vec::maximum propagates NaN
  if (m == kInf<acc_t>) return core::BasicSoftmaxState<acc_t>{m, acc_t(0), acc_t(0)};  // undefined row
  if (m == -kInf<acc_t>) {
    if (exps != nullptr) std::fill(exps, exps + n, acc_t(0));
    return core::empty_state<acc_t>();  // fully masked tile
  }
  const V vm(m);
  const V lowest(std::numeric_limits<acc_t>::lowest());
  V vs(acc_t(0)), vb(acc_t(0));
  for (int64_t i = 0; i < n; i += V::size()) {
    const V d = V::loadu(tile.values + i) - vm;
    const V e = vexp(d);
    vs = vs + e;
    if (exps != nullptr) e.store(exps + i);
    // Clamping -inf to the lowest finite value keeps d * exp(d) at 0, not NaN.
    if constexpr (kShifted) vb = at::vec::fmadd(at::vec::maximum(d, lowest), e, vb);
  }
  return core::BasicSoftmaxState<acc_t>{m, vsum(vs), kShifted ? vsum(vb) : acc_t(0)};
}

// The vector tile bodies of core::SoftmaxReduction: kShifted also keeps
// sum_shifted (for entropy; the other ops skip it).
template <bool kShifted>
struct SoftmaxTiles {
  static constexpr bool kScaleA = true;    // a holds logits: scale by 1/T on load
  static constexpr bool kNeedsMax = true;  // each tile's state needs its max
  template <class acc_t>
  static constexpr acc_t kPadA = -kInf<acc_t>;
  template <class acc_t>
  static core::BasicSoftmaxState<acc_t> tile_state(const Tile<acc_t>& a, const Tile<acc_t>&, int64_t n) {
    return tile_softmax_state<kShifted>(a, n, static_cast<acc_t*>(nullptr));
  }
};

// The vector tile bodies of core::SumReduction<kDot>.
template <bool kDot>
struct SumTiles {
  static constexpr bool kScaleA = false;
  static constexpr bool kNeedsMax = false;
  template <class acc_t>
  static constexpr acc_t kPadA = acc_t(0);
  template <class acc_t>
  static core::RowSum<acc_t> tile_state(const Tile<acc_t>& ta, const Tile<acc_t>& tb, int64_t n) {
    using V = Vec<acc_t>;
    V acc(acc_t(0));
    for (int64_t i = 0; i < n; i += V::size()) {
      const V a = V::loadu(ta.values + i);
      acc = kDot ? at::vec::fmadd(a, V::loadu(tb.values + i), acc) : acc + a;
    }
    return core::RowSum<acc_t>{vsum(acc)};
  }
};

// ---------------------------------------------------------------------------
// Map ops: a core policy (state, merge, row constants) + Tiles (the vector
// reduction) + map (the vector output over a tile). undefined(c): the row's
// outputs are all NaN (its distribution is undefined: NaN or +inf logits).
// log p_i = (z_i - m) - log s, see core::Normaliser.
// ---------------------------------------------------------------------------

template <class acc_t>
inline Vec<acc_t> log_probs(const core::BasicNormaliser<acc_t>& c, const Vec<acc_t>& z) {
  return (z - Vec<acc_t>(c.max)) - Vec<acc_t>(c.log_sum);
}

// A single-input map whose output is map_one(c, z) per vector: map() over a
// tile follows from it.
template <class Derived>
struct VectorMap {
  template <class Constants, class acc_t>
  static void map(const Constants& c, const acc_t* z, const acc_t*, acc_t* out, int64_t n) {
    for (int64_t i = 0; i < n; i += kLanesOf<acc_t>) Derived::map_one(c, Vec<acc_t>::loadu(z + i)).store(out + i);
  }
};

template <class acc_t>
struct SoftmaxOp : core::SoftmaxMap<acc_t>, VectorMap<SoftmaxOp<acc_t>> {
  using Tiles = SoftmaxTiles<false>;
  using RowConstants = typename core::SoftmaxMap<acc_t>::RowConstants;
  static bool undefined(const RowConstants& c) { return c.undefined(); }
  static Vec<acc_t> map_one(const RowConstants& c, const Vec<acc_t>& z) { return vexp(log_probs(c, z)); }
};

template <class acc_t>
struct LogSoftmaxOp : core::LogSoftmaxMap<acc_t>, VectorMap<LogSoftmaxOp<acc_t>> {
  using Tiles = SoftmaxTiles<false>;
  using RowConstants = typename core::LogSoftmaxMap<acc_t>::RowConstants;
  static bool undefined(const RowConstants& c) { return c.undefined(); }
  static Vec<acc_t> map_one(const RowConstants& c, const Vec<acc_t>& z) { return log_probs(c, z); }
};

// (g p) / T
template <class acc_t>
struct LogsumexpGradOp : core::LogsumexpGradMap<acc_t> {
  using Tiles = SoftmaxTiles<false>;
  using RowConstants = typename core::LogsumexpGradMap<acc_t>::RowConstants;
  static bool undefined(const RowConstants& c) { return c.normaliser.undefined() || std::isnan(c.grad); }
  void map(const RowConstants& c, const acc_t* z, const acc_t*, acc_t* out, int64_t n) const {
    using V = Vec<acc_t>;
    const V g(c.grad), inv_t(this->inv_temperature);
    for (int64_t i = 0; i < n; i += V::size()) {
      (g * vexp(log_probs(c.normaliser, V::loadu(z + i))) * inv_t).store(out + i);
    }
  }
};

// -(g p (log p + H)) / T, 0 where p = 0
template <class acc_t>
struct EntropyGradOp : core::EntropyGradMap<acc_t> {
  using Tiles = SoftmaxTiles<true>;
  using RowConstants = typename core::EntropyGradMap<acc_t>::RowConstants;
  static bool undefined(const RowConstants& c) {
    return c.normaliser.undefined() || std::isnan(c.entropy) || std::isnan(c.grad);
  }
  void map(const RowConstants& c, const acc_t* z, const acc_t*, acc_t* out, int64_t n) const {
    using V = Vec<acc_t>;
    const V h(c.entropy), neg_g(-c.grad), inv_t(this->inv_temperature);
    const V lowest(std::numeric_limits<acc_t>::lowest());
    for (int64_t i = 0; i < n; i += V::size()) {
      // Clamp -inf to the lowest finite value so that p * log p is 0, not NaN.
      const V log_p = at::vec::maximum(log_probs(c.normaliser, V::loadu(z + i)), lowest);
      const V p = vexp(log_p);
      (neg_g * p * (log_p + h) * inv_t).store(out + i);
    }
  }
};

// a = dy, b = y: y (dy - sum dy*y) / T
template <class acc_t>
struct SoftmaxGradOp : core::SoftmaxGradMap<acc_t> {
  using Tiles = SumTiles<true>;
  using RowConstants = typename core::SoftmaxGradMap<acc_t>::RowConstants;
  static bool undefined(const RowConstants&) { return false; }
  void map(const RowConstants& c, const acc_t* dy, const acc_t* y, acc_t* out, int64_t n) const {
    using V = Vec<acc_t>;
    const V dot(c.dot), inv_t(this->inv_temperature);
    for (int64_t i = 0; i < n; i += V::size()) (inv_t * V::loadu(y + i) * (V::loadu(dy + i) - dot)).store(out + i);
  }
};

// a = dy, b = y = log p: (dy - exp(y) sum dy) / T
template <class acc_t>
struct LogSoftmaxGradOp : core::LogSoftmaxGradMap<acc_t> {
  using Tiles = SumTiles<false>;
  using RowConstants = typename core::LogSoftmaxGradMap<acc_t>::RowConstants;
  static bool undefined(const RowConstants&) { return false; }
  void map(const RowConstants& c, const acc_t* dy, const acc_t* y, acc_t* out, int64_t n) const {
    using V = Vec<acc_t>;
    const V sum(c.sum), inv_t(this->inv_temperature);
    for (int64_t i = 0; i < n; i += V::size())
      (inv_t * (V::loadu(dy + i) - vexp(V::loadu(y + i)) * sum)).store(out + i);
  }
};

// The softmax state of z = a / T alone (for the per-row results).
template <bool kShifted, class acc_t>
struct SoftmaxStateOp : core::SoftmaxReduction<acc_t> {
  using Tiles = SoftmaxTiles<kShifted>;
};

// ---------------------------------------------------------------------------
// Work plan and the fixed merge tree
// ---------------------------------------------------------------------------

inline int64_t tiles_of(int64_t cols) { return (cols + kTile - 1) / kTile; }

// How a (rows, cols) problem is cut into parallel work: each row into
// `slices` slices of consecutive tiles (one when there are at least as many
// rows as threads). The cut changes which thread does what, never a result.
struct Plan {
  int64_t slices;
  int64_t tiles;  // per row
  // Tiles [first_tile, end_tile) of slice k.
  int64_t first_tile(int64_t k) const { return tiles * k / slices; }
  int64_t end_tile(int64_t k) const { return tiles * (k + 1) / slices; }
};

Plan plan_slices(int64_t rows, int64_t cols) {
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = tiles_of(cols);
  int64_t slices = 1;
  if (rows < threads) {
    slices = std::min((threads + rows - 1) / rows, std::max<int64_t>(1, cols / kMinSliceElements));
  }
  return Plan{std::min(slices, tiles), tiles};
}

// The merge of two states of an op's reduction (what MergeTree calls).
template <class Op>
struct MergeWith {
  const Op& op;
  typename Op::State operator()(const typename Op::State& a, const typename Op::State& b) const {
    return op.merge(a, b);
  }
};

template <class Op>
MergeWith<Op> merge_with(const Op& op) {
  return MergeWith<Op>{op};
}

template <class Op>
using TreeOf = MergeTree<typename Op::State>;

template <class scalar_t>
const scalar_t* row_of(const Rows* r, int64_t row) {
  return r != nullptr ? r->tensor.data_ptr<scalar_t>() + row * r->row_stride : nullptr;
}

// Reduces tiles [first, end) of row `row` of a (and b) into the blocks of the
// row's merge tree.
template <class Op, class scalar_t>
TreeOf<Op> reduce_tiles(const Op& op, const Rows& a, const Rows* b, int64_t row, int64_t first, int64_t end) {
  using Tiles = typename Op::Tiles;
  using acc_t = compute_t<scalar_t>;
  alignas(64) acc_t ta[kTile];
  alignas(64) acc_t tb[kTile];
  const scalar_t* pa = row_of<scalar_t>(&a, row);
  const scalar_t* pb = row_of<scalar_t>(b, row);
  const acc_t scale = Tiles::kScaleA ? op.inv_temperature : acc_t(1);
  TreeOf<Op> tree;
  for (int64_t t = first; t < end; ++t) {
    const int64_t begin = t * kTile;
    const int64_t n = std::min(kTile, a.cols - begin);
    const Tile<acc_t> va = tile_of(pa + begin, n, scale, Tiles::template kPadA<acc_t>, ta, Tiles::kNeedsMax);
    const Tile<acc_t> vb = pb != nullptr ? tile_of(pb + begin, n, acc_t(1), acc_t(0), tb, false) : Tile<acc_t>{};
    tree.add(merge_with(op), Tiles::tile_state(va, vb, round_up_to_lanes<acc_t>(n)), t, 1);
  }
  return tree;
}

// The trees of every (row, slice) in parallel: trees[row * slices + slice].
template <class scalar_t, class Op>
std::vector<TreeOf<Op>> slice_trees(const Op& op, const Rows& a, const Rows* b, const Plan& plan) {
  std::vector<TreeOf<Op>> trees(a.rows * plan.slices);
  at::parallel_for(0, a.rows * plan.slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const int64_t k = w % plan.slices;
      trees[w] = reduce_tiles<Op, scalar_t>(op, a, b, w / plan.slices, plan.first_tile(k), plan.end_tile(k));
    }
  });
  return trees;
}

// The merged state of every row from its slices' trees.
template <class Op>
std::vector<typename Op::State> row_states(const Op& op, const std::vector<TreeOf<Op>>& trees, int64_t rows,
                                           int64_t slices) {
  std::vector<typename Op::State> states(rows);
  for (int64_t r = 0; r < rows; ++r) {
    TreeOf<Op> tree;
    for (int64_t k = 0; k < slices; ++k) tree.add_all(merge_with(op), trees[r * slices + k]);
    states[r] = tree.result(merge_with(op), op.identity());
  }
  return states;
}

// ---------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------

// Single-input maps run straight from the input to the output, one vector at
// a time (no tile round trips); returns where the tile path takes over (the
// tail).
template <class Op, class scalar_t>
int64_t map_vectors(const Op& op, const typename Op::RowConstants& c, const scalar_t* pa, scalar_t* po, int64_t begin,
                    int64_t end, bool streaming) {
  using acc_t = compute_t<scalar_t>;
  using V = Vec<acc_t>;
  const V scale(op.inv_temperature);
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + V::size() <= end; i += V::size())
      store_output(Op::map_one(c, V::loadu(pa + i) * scale), po + i, streaming);
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
  using acc_t = compute_t<scalar_t>;
  alignas(64) acc_t ta[kTile];
  alignas(64) acc_t tb[kTile];
  alignas(64) acc_t to[kTile];
  const scalar_t* pa = row_of<scalar_t>(args.a, row);
  const scalar_t* pb = row_of<scalar_t>(args.b, row);
  scalar_t* po = args.out + row * args.a->cols;
  if (Op::undefined(c)) {
    std::fill(po + begin, po + end, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  const bool streaming = streaming_row<scalar_t>(args.a->cols);
  int64_t first_tile = begin;
  if constexpr (requires(const Vec<acc_t>& v) { Op::map_one(c, v); }) {
    first_tile = map_vectors(op, c, pa, po, begin, end, streaming);
  }
  const acc_t scale = Tiles::kScaleA ? op.inv_temperature : acc_t(1);
  for (int64_t t = first_tile; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    const acc_t* va = tile_of(pa + t, n, scale, Tiles::template kPadA<acc_t>, ta, false).values;
    const acc_t* vb = pb != nullptr ? tile_of(pb + t, n, acc_t(1), acc_t(0), tb, false).values : nullptr;
    op.map(c, va, vb, to, round_up_to_lanes<acc_t>(n));
    store_tile(to, n, acc_t(1), po + t, streaming);
  }
  fence_streaming_stores();
}

template <class Op, class scalar_t>
typename Op::RowConstants row_constants(const Op& op, const typename Op::State& state, const MapArgs<scalar_t>& args,
                                        int64_t row) {
  using acc_t = compute_t<scalar_t>;
  const acc_t g = args.row_grad != nullptr ? static_cast<acc_t>(args.row_grad[row]) : acc_t(0);
  return op.row_constants(state, g);
}

// Softmax with one exp per element, for rows up to kMaxCachedRow: pass 1
// keeps exp(z - m_t) of every tile in a buffer (m_t: the tile's max);
// pass 2 only rescales, p = exp(z - m_t) * exp((m_t - m) - log s), instead
// of re-reading the input and taking a second exp. A row split over threads
// keeps its exps in a shared buffer; a whole row in a per-thread one.
template <class scalar_t>
class OneExpSoftmax {
 public:
  using acc_t = compute_t<scalar_t>;
  using Op = SoftmaxStateOp<false, acc_t>;

  explicit OneExpSoftmax(const MapArgs<scalar_t>& args) : args_(args), op_{{args.inv_temperature}} {}

  // Pass 1 over tiles [first, end) of `row`, into exps / tile_max (indexed
  // by tile): the blocks of the row's merge tree.
  TreeOf<Op> reduce(int64_t row, int64_t first, int64_t end, acc_t* exps, acc_t* tile_max) const {
    alignas(64) acc_t z[kTile];
    const Rows& a = *args_.a;
    const scalar_t* x = row_of<scalar_t>(&a, row);
    TreeOf<Op> tree;
    for (int64_t t = first; t < end; ++t) {
      const int64_t n = std::min(kTile, a.cols - t * kTile);
      const Tile<acc_t> zt = tile_of(x + t * kTile, n, args_.inv_temperature, -kInf<acc_t>, z, true);
      const auto state = tile_softmax_state<false>(zt, round_up_to_lanes<acc_t>(n), exps + t * kTile);
      tile_max[t] = zt.max;
      tree.add(merge_with(op_), state, t, 1);
    }
    return tree;
  }

  // Pass 2 over tiles [first, end) of `row`, from the row's merged state.
  void write(int64_t row, const core::BasicSoftmaxState<acc_t>& state, int64_t first, int64_t end, const acc_t* exps,
             const acc_t* tile_max) const {
    const int64_t cols = args_.a->cols;
    scalar_t* out = args_.out + row * cols;
    const core::BasicNormaliser<acc_t> c = core::normaliser(state);
    const int64_t begin = first * kTile, stop = std::min(cols, end * kTile);
    if (c.undefined()) {
      std::fill(out + begin, out + stop, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
      return;
    }
    const bool streaming = streaming_row<scalar_t>(cols);
    for (int64_t t = first; t < end; ++t) {
      const int64_t n = std::min(kTile, cols - t * kTile);
      const acc_t factor = tile_max[t] == -kInf<acc_t> ? acc_t(0) : std::exp((tile_max[t] - c.max) - c.log_sum);
      store_tile(exps + t * kTile, n, factor, out + t * kTile, streaming);
    }
    fence_streaming_stores();
  }

  const Op& op() const { return op_; }

 private:
  const MapArgs<scalar_t>& args_;
  Op op_;
};

template <class scalar_t>
void softmax_one_exp(const MapArgs<scalar_t>& args, const Plan& plan) {
  using acc_t = compute_t<scalar_t>;
  const OneExpSoftmax<scalar_t> softmax(args);
  const Rows& a = *args.a;
  const int64_t tiles = plan.tiles;
  if (plan.slices == 1) {
    at::parallel_for(0, a.rows, 1, [&](int64_t first, int64_t last) {
      thread_local std::vector<acc_t> exps, tile_max;
      exps.resize(tiles * kTile);
      tile_max.resize(tiles);
      for (int64_t r = first; r < last; ++r) {
        const auto tree = softmax.reduce(r, 0, tiles, exps.data(), tile_max.data());
        const auto state = tree.result(merge_with(softmax.op()), softmax.op().identity());
        softmax.write(r, state, 0, tiles, exps.data(), tile_max.data());
      }
    });
    return;
  }
  std::vector<acc_t> exps(a.rows * tiles * kTile), tile_max(a.rows * tiles);
  std::vector<TreeOf<typename OneExpSoftmax<scalar_t>::Op>> trees(a.rows * plan.slices);
  const auto work = [&](int64_t w) { return std::pair{w / plan.slices, w % plan.slices}; };
  at::parallel_for(0, a.rows * plan.slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const auto [r, k] = work(w);
      trees[w] = softmax.reduce(r, plan.first_tile(k), plan.end_tile(k), exps.data() + r * tiles * kTile,
                                tile_max.data() + r * tiles);
    }
  });
  const auto states = row_states(softmax.op(), trees, a.rows, plan.slices);
  at::parallel_for(0, a.rows * plan.slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const auto [r, k] = work(w);
      softmax.write(r, states[r], plan.first_tile(k), plan.end_tile(k), exps.data() + r * tiles * kTile,
                    tile_max.data() + r * tiles);
    }
  });
}

template <class Op, class scalar_t>
void run_map(const Op& op, const MapArgs<scalar_t>& args) {
  const Rows& a = *args.a;
  const Plan plan = plan_slices(a.rows, a.cols);
  if constexpr (std::is_same_v<Op, SoftmaxOp<compute_t<scalar_t>>>) {
    if (a.cols <= kMaxCachedRow) return softmax_one_exp(args, plan);
  }
  if (plan.slices == 1) {
    // Both passes of a row back to back on one thread: pass 2 reads from cache.
    at::parallel_for(0, a.rows, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const auto state =
            reduce_tiles<Op, scalar_t>(op, a, args.b, r, 0, plan.tiles).result(merge_with(op), op.identity());
        map_range(op, row_constants(op, state, args, r), args, r, 0, a.cols);
      }
    });
    return;
  }
  const auto states = row_states(op, slice_trees<scalar_t>(op, a, args.b, plan), a.rows, plan.slices);
  at::parallel_for(0, a.rows * plan.slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const int64_t r = w / plan.slices, k = w % plan.slices;
      const int64_t begin = plan.first_tile(k) * kTile, end = std::min(a.cols, plan.end_tile(k) * kTile);
      map_range(op, row_constants(op, states[r], args, r), args, r, begin, end);
    }
  });
}

template <class Op>
Op with_temperature(decltype(Op::inv_temperature) inv_temperature) {
  Op op{};
  op.inv_temperature = inv_temperature;
  return op;
}

template <class scalar_t>
void map(MapKind kind, const MapArgs<scalar_t>& args) {
  using acc_t = compute_t<scalar_t>;
  const acc_t inv_t = args.inv_temperature;
  switch (kind) {
    case MapKind::softmax: return run_map(with_temperature<SoftmaxOp<acc_t>>(inv_t), args);
    case MapKind::log_softmax: return run_map(with_temperature<LogSoftmaxOp<acc_t>>(inv_t), args);
    case MapKind::logsumexp_grad: return run_map(with_temperature<LogsumexpGradOp<acc_t>>(inv_t), args);
    case MapKind::entropy_grad: return run_map(with_temperature<EntropyGradOp<acc_t>>(inv_t), args);
    case MapKind::softmax_grad: return run_map(with_temperature<SoftmaxGradOp<acc_t>>(inv_t), args);
    case MapKind::log_softmax_grad: return run_map(with_temperature<LogSoftmaxGradOp<acc_t>>(inv_t), args);
  }
}

// Per-row results: the rows' softmax states (kShifted: with sum_shifted,
// which only entropy and stats need), then result.finalize per row.
template <bool kShifted, class Result, class scalar_t>
void finalize_rows(const Result& result, const ResultArgs<scalar_t>& args) {
  const Rows& a = *args.a;
  const Plan plan = plan_slices(a.rows, a.cols);
  const SoftmaxStateOp<kShifted, compute_t<scalar_t>> op{{args.inv_temperature}};
  const auto states = row_states(op, slice_trees<scalar_t>(op, a, nullptr, plan), a.rows, plan.slices);
  for (int64_t r = 0; r < a.rows; ++r) result.finalize(states[r], r);
}

template <class scalar_t>
void reduce(ResultKind kind, const ResultArgs<scalar_t>& args) {
  using acc_t = compute_t<scalar_t>;
  const acc_t inv_t = args.inv_temperature;
  switch (kind) {
    case ResultKind::logsumexp:
      return finalize_rows<false>(core::LogsumexpResult<scalar_t, acc_t>{{inv_t}, static_cast<scalar_t*>(args.out)},
                                  args);
    case ResultKind::entropy:
      return finalize_rows<true>(core::EntropyResult<acc_t>{{inv_t}, static_cast<acc_t*>(args.out)}, args);
    case ResultKind::stats:
      return finalize_rows<true>(core::StatsResult<acc_t>{{inv_t}, static_cast<acc_t*>(args.out)}, args);
  }
}

template <class scalar_t>
constexpr RowOpsKernels<scalar_t> kernels() {
  return RowOpsKernels<scalar_t>{&map<scalar_t>, &reduce<scalar_t>};
}

}  // namespace

// constinit: a table built at load time would run this file's instructions
// (AVX-512 in that copy) on CPUs that lack them.
constinit const RowOpsTables row_ops_kernels{
    PerDtype<RowOpsKernels>::build([]<class scalar_t>() { return kernels<scalar_t>(); }), kernels<double>()};

}  // namespace logitkit::cpu::CPU_CAPABILITY
