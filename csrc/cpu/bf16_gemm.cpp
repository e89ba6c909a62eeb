// The bf16 GEMM of bf16_gemm.h. Compiled once with the build's baseline
// flags: only the functions marked LOGITKIT_AVX512_BF16 or LOGITKIT_AMX_BF16
// use the extensions' instructions, and they run only where
// bf16_units_available() says this process may use them (no other code of
// this file, and none of the templates it instantiates, is compiled for
// AVX-512 or AMX).
#include "bf16_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOGITKIT_HAVE_BF16_GEMM 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define LOGITKIT_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))
#define LOGITKIT_AMX_BF16 __attribute__((target("amx-tile,amx-bf16")))
#define LOGITKIT_AVX512 __attribute__((target("avx512f")))
#else
#define LOGITKIT_HAVE_BF16_GEMM 0
#endif

namespace logitkit::cpu {

#if LOGITKIT_HAVE_BF16_GEMM

namespace {

// Both micro-kernels read B panels of kMicroCols columns.
constexpr int64_t kMicroCols = 32;
// Cache blocks: row blocks of at most kMaxBlockRows rows (their A panels,
// kMaxBlockRows x kBlockPairs words, stay in L2) and B blocks of at most
// kMaxBlockCols columns (kMaxBlockCols x kBlockPairs words, in L2 too). Each
// kernel says which operand's micro-panel stays in L1 (kRowPanelsOuter).
constexpr int64_t kMaxBlockRows = 192;
constexpr int64_t kMaxBlockCols = 2048;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// A matrix seen as `lines` (the rows of A, or the columns of B) along K:
// element (line, kk) at data[line * line_stride + kk * k_stride].
struct Lines {
  const uint16_t* data;
  int64_t line_stride;
  int64_t k_stride;
  int64_t k;  // K (elements)

  // bf16 elements kk and kk + 1 of a line as one word (low half first, the
  // order vdpbf16ps and tdpbf16ps pair them in); the element past an odd K
  // is 0.
  uint32_t pair(int64_t line, int64_t kk) const {
    const uint16_t* x = data + line * line_stride + kk * k_stride;
    const uint32_t hi = kk + 1 < k ? x[k_stride] : 0u;
    return static_cast<uint32_t>(x[0]) | (hi << 16);
  }
};

// Where packed word (line, p) of a block goes (pair_stride: the packed
// pairs per line, a multiple of the layout's pair alignment).
//
// InterleavedPanels<W>: panels of W lines; in a panel, the W lines' words
// of one pair side by side: ((line / W) * pair_stride + p) * W + line % W.
template <int64_t kPanelWidth>
struct InterleavedPanels {
  static constexpr bool kTiled = false;
  static constexpr int64_t kWidth = kPanelWidth;
  static int64_t index(int64_t line, int64_t p, int64_t pair_stride) {
    return ((line / kPanelWidth) * pair_stride + p) * kPanelWidth + line % kPanelWidth;
  }
};

// TiledPanels<W, kLinesAreTileRows>: panels of W lines (a multiple of 16)
// cut into AMX tiles of 16 lines x 16 pairs (1 KiB each, contiguous), in
// the order the micro-kernel loads them: per 16 pairs, the panel's W / 16
// tiles. A tile row holds 16 words: a line's 16 pairs for A tiles
// (kLinesAreTileRows), one pair of 16 lines for B tiles.
template <int64_t kWidth, bool kLinesAreTileRows>
struct TiledPanels {
  static_assert(kWidth % 16 == 0);
  static constexpr bool kTiled = true;
  static constexpr bool kTileRowsAreLines = kLinesAreTileRows;
  static int64_t index(int64_t line, int64_t p, int64_t pair_stride) {
    const int64_t in_panel = line % kWidth, row = kLinesAreTileRows ? in_panel % 16 : p % 16,
                  col = kLinesAreTileRows ? p % 16 : in_panel % 16;
    return (line / kWidth) * kWidth * pair_stride + (p / 16) * kWidth * 16 + (in_panel / 16) * 256 + row * 16 + col;
  }
};

// Transposes a 16 x 16 block of 32-bit words held as 16 rows: after it,
// rows[c] holds what was column c. Three shuffle stages: 32-bit and 64-bit
// unpacks gather each 128-bit lane's 4 x 4 sub-block, then two 128-bit lane
// shuffles put the sub-blocks in place.
LOGITKIT_AVX512 void transpose_16x16(__m512i rows[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);      // per lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);  // a2 b2 a3 b3
  }
  // u[4i + j], 128-bit lane L: rows 4i .. 4i + 3 at column 4L + j.
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Column 4L + j is lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
  for (int j = 0; j < 4; ++j) {
    const __m512i low01 = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i high01 = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i low23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i high23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    rows[j] = _mm512_shuffle_i32x4(low01, low23, _MM_SHUFFLE(2, 0, 2, 0));
    rows[4 + j] = _mm512_shuffle_i32x4(low01, low23, _MM_SHUFFLE(3, 1, 3, 1));
    rows[8 + j] = _mm512_shuffle_i32x4(high01, high23, _MM_SHUFFLE(2, 0, 2, 0));
    rows[12 + j] = _mm512_shuffle_i32x4(high01, high23, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Loads the 16 x 16 block of words of lines [line0, line0 + 16) and k-pairs
// [pair0, pair0 + 16) of x, all inside the matrix, with K or the lines
// contiguous: v[i] holds line line0 + i's 16 pairs (kRowsAreLines) or pair
// pair0 + i of the 16 lines. Reads 16 vectors along the contiguous dimension
// (a line's 16 pairs, or one pair of 16 lines, built from two rows of bf16)
// and transposes them when the block's rows run the other way.
template <bool kRowsAreLines>
LOGITKIT_AVX512 void load_word_block(const Lines& x, int64_t line0, int64_t pair0, __m512i v[16]) {
  const bool by_line = x.k_stride == 1;
  if (by_line) {
    const uint16_t* src = x.data + line0 * x.line_stride + 2 * pair0;
    for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(src + i * x.line_stride);
  } else {
    const uint16_t* src = x.data + line0 + 2 * pair0 * x.k_stride;
    for (int i = 0; i < 16; ++i) {
      const uint16_t* low = src + 2 * i * x.k_stride;
      const __m512i low_words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low)));
      const __m512i high_words =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + x.k_stride)));
      v[i] = _mm512_or_si512(low_words, _mm512_slli_epi32(high_words, 16));
    }
  }
  if (by_line != kRowsAreLines) transpose_16x16(v);
}

// Packs one 16-line x 16-pair block (see load_word_block) into `Layout`,
// `at(line, p)` giving the packed word of block line `line` and pair `p`.
// An AMX tile (TiledPanels) is 16 contiguous rows; in InterleavedPanels<W>
// the 16 lines' words of one pair are contiguous per W lines (W = 8: two
// halves in consecutive panels).
template <class Layout, class WordAt>
LOGITKIT_AVX512 void pack_word_block(const Lines& x, int64_t line0, int64_t pair0, WordAt&& at) {
  __m512i v[16];
  if constexpr (Layout::kTiled) {
    load_word_block<Layout::kTileRowsAreLines>(x, line0, pair0, v);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(&at(0, 0) + 16 * i, v[i]);
  } else {
    static_assert(Layout::kWidth % 8 == 0);
    load_word_block<false>(x, line0, pair0, v);
    for (int p = 0; p < 16; ++p) {
      if constexpr (Layout::kWidth % 16 == 0) {
        _mm512_storeu_si512(&at(0, p), v[p]);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&at(0, p)), _mm512_castsi512_si256(v[p]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&at(8, p)), _mm512_extracti64x4_epi64(v[p], 1));
      }
    }
  }
}

// Packs lines [first, first + count) and k-pairs [pair0, pair0 + pairs) in
// `Layout`. Pairs past `pairs` (up to pair_stride) and lines past `count`
// (up to padded_count) are zeros. Whole 16 x 16 blocks of words (K or the
// lines contiguous) are packed with vector loads and an in-register
// transpose (pack_word_block: the word-by-word loop took ~17% of the bf16
// linear CE's time on an Intel Xeon with AMX). The rest runs word by word
// along whichever of K and the lines is contiguous in memory; pairs with
// both elements inside K are read without the bounds test.
template <class Layout>
void pack_panels(const Lines& x, int64_t first, int64_t count, int64_t padded_count, int64_t pair0, int64_t pairs,
                 int64_t pair_stride, uint32_t* out) {
  auto word = [&](int64_t line, int64_t p) -> uint32_t& { return out[Layout::index(line, p, pair_stride)]; };
  const int64_t whole_pairs = std::clamp<int64_t>(x.k / 2 - pair0, 0, pairs);
  // Lines [0, tiled_lines) x pairs [0, tiled_pairs): packed by whole blocks.
  int64_t tiled_lines = 0, tiled_pairs = 0;
  if (x.k_stride == 1 || x.line_stride == 1) {
    tiled_lines = count / 16 * 16;
    tiled_pairs = whole_pairs / 16 * 16;
    for (int64_t line = 0; line < tiled_lines; line += 16) {
      for (int64_t p = 0; p < tiled_pairs; p += 16) {
        pack_word_block<Layout>(x, first + line, pair0 + p,
                                [&](int64_t l, int64_t q) -> uint32_t& { return word(line + l, p + q); });
      }
    }
  }
  if (x.k_stride == 1) {
    for (int64_t line = 0; line < count; ++line) {
      const uint16_t* src = x.data + (first + line) * x.line_stride + 2 * pair0;
      for (int64_t p = line < tiled_lines ? tiled_pairs : 0; p < whole_pairs; ++p) {
        std::memcpy(&word(line, p), src + 2 * p, sizeof(uint32_t));
      }
    }
  } else {
    for (int64_t p = 0; p < whole_pairs; ++p) {
      const uint16_t* low = x.data + first * x.line_stride + 2 * (pair0 + p) * x.k_stride;
      const uint16_t* high = low + x.k_stride;
      for (int64_t line = p < tiled_pairs ? tiled_lines : 0; line < count; ++line) {
        const int64_t at = line * x.line_stride;
        word(line, p) = static_cast<uint32_t>(low[at]) | (static_cast<uint32_t>(high[at]) << 16);
      }
    }
  }
  for (int64_t line = 0; line < count; ++line) {
    for (int64_t p = whole_pairs; p < pairs; ++p) word(line, p) = x.pair(first + line, 2 * (pair0 + p));
  }
  for (int64_t line = 0; line < padded_count; ++line) {
    for (int64_t p = line < count ? pairs : 0; p < pair_stride; ++p) word(line, p) = 0u;
  }
}

// The AVX512-BF16 micro-kernel: an 8 x 32 block of C in 16 zmm
// accumulators (two 16-lane fp32 registers per row), enough independent dot
// products to hide vdpbf16ps' latency, few enough registers for the B
// operands. A panels interleave their 8 rows pair by pair. (Measured on an
// AMD EPYC with AVX512-BF16, 2 threads: 8 x 32 tiles with 128 or 256 pairs
// ran 150-280 GFLOP/s on the loss's GEMM shapes; 12 x 32, 14 x 32, 6 x 64
// and 4 x 96 tiles were slower.)
struct Avx512Bf16Kernel {
  static constexpr int64_t kMicroRows = 8;
  using APanels = InterleavedPanels<kMicroRows>;
  using BPanels = InterleavedPanels<kMicroCols>;
  static constexpr int64_t kPairAlign = 1;  // pair_stride is a multiple of this
  static constexpr int64_t kBlockPairs = 128;
  // A block's micro-tiles are visited B panel by B panel: a B panel (32
  // columns x 128 pairs, 16 KiB) stays in L1 while the block's A panels
  // (4 KiB each) stream past.
  static constexpr bool kRowPanelsOuter = false;

  struct ThreadScope {};  // no per-thread state

  // c[r][j] (+)= sum_p a-pair(r, p) . b-pair(p, j) over `pairs` k-pairs.
  LOGITKIT_AVX512_BF16 static void micro(int64_t pairs, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc,
                                         bool accumulate) {
    __m512 acc[kMicroRows][2];
#pragma GCC unroll 8
    for (int64_t r = 0; r < kMicroRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b));
      const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 16));
#pragma GCC unroll 8
      for (int64_t r = 0; r < kMicroRows; ++r) {
        const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r])));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
      }
      a += kMicroRows;
      b += kMicroCols;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kMicroRows; ++r) {
      float* row = c + r * ldc;
      if (accumulate) {
        acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_loadu_ps(row));
        acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_loadu_ps(row + 16));
      }
      _mm512_storeu_ps(row, acc[r][0]);
      _mm512_storeu_ps(row + 16, acc[r][1]);
    }
  }
};

// The AMX micro-kernel: a 32 x 32 block of C in four 16 x 16 fp32 tiles
// (tmm0-3), fed per 16 k-pairs by two A tiles (tmm4-5: 16 rows x 16 pairs)
// and two B tiles (tmm6-7: 16 pairs x 16 columns), i.e. four tdpbf16ps per
// four tile loads, all four tiles read from 4 KiB of contiguous packed
// words (TiledPanels).
struct AmxBf16Kernel {
  static constexpr int64_t kMicroRows = 32;
  using APanels = TiledPanels<kMicroRows, true>;
  using BPanels = TiledPanels<kMicroCols, false>;
  static constexpr int64_t kPairAlign = 16;  // a tile row holds 16 pairs
  // A block's micro-tiles are visited row panel by row panel: the row
  // panel's A tiles (32 rows x 256 pairs, 32 KiB) stay in L1 while the B
  // panels stream from L2, so half of the micro-kernel's tile loads hit L1.
  // (With B panels outer and 512 pairs, neither operand fit L1 and every
  // tile load came from L2: perf put the micro-kernel's stalls on its tile
  // loads, ~2.3x the samples on its tdpbf16ps. Measured on an Intel Xeon with
  // AMX-BF16, 2 threads, as ratios to torch.mm bf16 (oneDNN) on the loss's
  // GEMMs at N = D = 1024, 409 columns, best of 40 interleaved rounds, in
  // three runs: grad_h 0.47-0.77x -> 0.58-0.84x, grad_w 0.88-1.21x ->
  // 1.01-1.24x, logits 1.00-1.12x -> 1.10-1.14x; the bf16 loss, medians of
  // interleaved rounds: 1.16x -> 1.04x materialised at V = 32768, 1.11x ->
  // 1.05x at V = 128256. 128 pairs were between the two. Tiles packed
  // contiguously, in load order, ran ~1.5x faster than tiles read from
  // row-major panels with a 1-2 KiB row stride.)
  static constexpr int64_t kBlockPairs = 256;
  static constexpr bool kRowPanelsOuter = true;

  // The tile configuration (palette 1): every tile 16 rows of 64 bytes. It
  // is per thread state, loaded by each worker before its first tile
  // instruction and released after its last one.
  struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
  };
  // (A constant in memory: GCC 12's _tile_loadconfig tells the compiler it
  // reads only 8 bytes, so a configuration built on the stack just before
  // it loses its other stores.)
  static constexpr TileConfig kTileConfig = [] {
    TileConfig config{};
    config.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = 16;
    }
    return config;
  }();
  struct ThreadScope {
    LOGITKIT_AMX_BF16 ThreadScope() { _tile_loadconfig(&kTileConfig); }
    LOGITKIT_AMX_BF16 ~ThreadScope() { _tile_release(); }
    ThreadScope(const ThreadScope&) = delete;
    ThreadScope& operator=(const ThreadScope&) = delete;
  };

  LOGITKIT_AMX_BF16 static void micro(int64_t pair_stride, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc,
                                      bool accumulate) {
    const int64_t c_bytes = ldc * static_cast<int64_t>(sizeof(float));
    float* c_low = c + 16 * ldc;
    if (accumulate) {
      _tile_loadd(0, c, c_bytes);
      _tile_loadd(1, c + 16, c_bytes);
      _tile_loadd(2, c_low, c_bytes);
      _tile_loadd(3, c_low + 16, c_bytes);
    } else {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    // Per 16 pairs: A's two tiles, then B's two (TiledPanels), 1 KiB each.
    constexpr int64_t kTileWords = 256, kTileRowBytes = 64;
    const uint32_t* const a_end = a + pair_stride * kMicroRows;
    for (; a != a_end; a += 2 * kTileWords, b += 2 * kTileWords) {
      _tile_loadd(4, a, kTileRowBytes);
      _tile_loadd(5, a + kTileWords, kTileRowBytes);
      _tile_loadd(6, b, kTileRowBytes);
      _tile_loadd(7, b + kTileWords, kTileRowBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, c_bytes);
    _tile_stored(1, c + 16, c_bytes);
    _tile_stored(2, c_low, c_bytes);
    _tile_stored(3, c_low + 16, c_bytes);
  }
};

// One micro-tile of C with `rows` x `cols` live entries: in place when
// whole, through a padded scratch tile at the edges.
template <class Kernel>
void tile(int64_t pair_stride, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc, int64_t rows, int64_t cols,
          bool accumulate) {
  constexpr int64_t kRows = Kernel::kMicroRows;
  if (rows == kRows && cols == kMicroCols) {
    Kernel::micro(pair_stride, a, b, c, ldc, accumulate);
    return;
  }
  alignas(64) float scratch[kRows * kMicroCols] = {};
  if (accumulate) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(scratch + r * kMicroCols, c + r * ldc, cols * sizeof(float));
  }
  Kernel::micro(pair_stride, a, b, scratch, kMicroCols, accumulate);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, scratch + r * kMicroCols, cols * sizeof(float));
}

// The blocked driver of bf16_gemm for one micro-kernel.
template <class Kernel>
void blocked_gemm(int64_t m, int64_t n, int64_t k, Bf16MatrixView a, Bf16MatrixView b, float* c, int64_t ldc,
                  bool accumulate) {
  constexpr int64_t kRows = Kernel::kMicroRows;
  const Lines a_lines{a.data, a.row_stride, a.col_stride, k};  // A's rows
  const Lines b_lines{b.data, b.col_stride, b.row_stride, k};  // B's columns
  const int64_t total_pairs = ceil_div(k, 2);
  // Work split: row blocks (at least one per thread, each packing its own A
  // block); when there are fewer row blocks than threads, also column parts.
  // Blocks are whole micro-tiles of rows, as even as that allows: block b
  // holds micro-rows [b * R / row_blocks, (b + 1) * R / row_blocks) of the
  // R = ceil(m / kRows). (Rounding one common block height up to kRows left
  // a thread up to 40% of the rows idle at the loss's shapes, e.g. blocks
  // of 192, 192, 192 | 192, 192, 64 for m = 1024.)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t micro_rows = ceil_div(m, kRows);
  const int64_t row_blocks = std::min(micro_rows, threads * ceil_div(micro_rows, threads * (kMaxBlockRows / kRows)));
  const int64_t block_rows = ceil_div(micro_rows, row_blocks) * kRows;  // the largest block
  auto block_row0 = [&](int64_t block) { return std::min(m, block * micro_rows / row_blocks * kRows); };

  std::vector<uint32_t> b_packed;
  for (int64_t col0 = 0; col0 < n; col0 += kMaxBlockCols) {
    const int64_t block_cols = std::min(kMaxBlockCols, n - col0);
    const int64_t col_panels = ceil_div(block_cols, kMicroCols);
    const int64_t col_parts = std::min(col_panels, std::max<int64_t>(1, threads / row_blocks));
    for (int64_t pair0 = 0; pair0 < total_pairs; pair0 += Kernel::kBlockPairs) {
      const int64_t pairs = std::min(Kernel::kBlockPairs, total_pairs - pair0);
      const int64_t pair_stride = round_up(pairs, Kernel::kPairAlign);
      const bool add = accumulate || pair0 > 0;
      b_packed.resize(col_panels * pair_stride * kMicroCols);
      at::parallel_for(0, col_panels, 1, [&](int64_t first, int64_t last) {
        const int64_t count = std::min(block_cols - first * kMicroCols, (last - first) * kMicroCols);
        pack_panels<typename Kernel::BPanels>(b_lines, col0 + first * kMicroCols, count, round_up(count, kMicroCols),
                                              pair0, pairs, pair_stride,
                                              b_packed.data() + first * pair_stride * kMicroCols);
      });
      at::parallel_for(0, row_blocks * col_parts, 1, [&](int64_t first, int64_t last) {
        [[maybe_unused]] const typename Kernel::ThreadScope thread_scope;
        std::vector<uint32_t> a_packed(block_rows * pair_stride);
        int64_t packed_block = -1;
        for (int64_t task = first; task < last; ++task) {
          const int64_t block = task / col_parts, part = task % col_parts;
          const int64_t row0 = block_row0(block), rows = block_row0(block + 1) - row0;
          if (block != packed_block) {
            pack_panels<typename Kernel::APanels>(a_lines, row0, rows, round_up(rows, kRows), pair0, pairs, pair_stride,
                                                  a_packed.data());
            packed_block = block;
          }
          const int64_t panel_begin = part * col_panels / col_parts, panel_end = (part + 1) * col_panels / col_parts;
          auto micro_tile = [&](int64_t r, int64_t cp) {
            const int64_t col = cp * kMicroCols;
            tile<Kernel>(pair_stride, a_packed.data() + r * pair_stride,
                         b_packed.data() + cp * pair_stride * kMicroCols, c + (row0 + r) * ldc + col0 + col, ldc,
                         std::min(kRows, rows - r), std::min(kMicroCols, block_cols - col), add);
          };
          if constexpr (Kernel::kRowPanelsOuter) {
            for (int64_t r = 0; r < rows; r += kRows) {
              for (int64_t cp = panel_begin; cp < panel_end; ++cp) micro_tile(r, cp);
            }
          } else {
            for (int64_t cp = panel_begin; cp < panel_end; ++cp) {
              for (int64_t r = 0; r < rows; r += kRows) micro_tile(r, cp);
            }
          }
        }
      });
    }
  }
}

// AMX needs the OS's permission for the tile state (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process).
bool amx_permitted() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
#else
  return false;
#endif
}

}  // namespace

bool bf16_units_available(Bf16Units units) {
  static const bool avx512_bf16 = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return false;
    // AVX512_BF16: CPUID leaf 7, sub-leaf 1, EAX bit 5 (GCC 12's
    // __builtin_cpu_supports does not know the name).
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return ((eax >> 5) & 1u) != 0;
  }();
  static const bool amx_bf16 = [] {
    // AMX-BF16 and AMX-TILE: CPUID leaf 7, sub-leaf 0, EDX bits 22 and 24.
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return ((edx >> 22) & 1u) != 0 && ((edx >> 24) & 1u) != 0 && amx_permitted();
  }();
  if (units == Bf16Units::amx_bf16) return amx_bf16;
  if (units == Bf16Units::avx512_bf16) return avx512_bf16;
  return false;
}

void bf16_gemm(int64_t m, int64_t n, int64_t k, Bf16MatrixView a, Bf16MatrixView b, float* c, int64_t ldc,
               bool accumulate, Bf16Units units) {
  TORCH_INTERNAL_ASSERT(bf16_units_available(units), "bf16_gemm: this CPU cannot run ", bf16_units_name(units));
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.0f);
    }
    return;
  }
  if (units == Bf16Units::amx_bf16) {
    blocked_gemm<AmxBf16Kernel>(m, n, k, a, b, c, ldc, accumulate);
  } else {
    blocked_gemm<Avx512Bf16Kernel>(m, n, k, a, b, c, ldc, accumulate);
  }
}

#else  // not x86-64 with GCC/Clang: no kernel

bool bf16_units_available(Bf16Units) { return false; }

void bf16_gemm(int64_t, int64_t, int64_t, Bf16MatrixView, Bf16MatrixView, float*, int64_t, bool, Bf16Units) {
  TORCH_INTERNAL_ASSERT(false, "bf16_gemm: not built for this CPU");
}

#endif

Bf16Units bf16_gemm_best_units() {
  static const Bf16Units best = [] {
    for (Bf16Units units : {Bf16Units::amx_bf16, Bf16Units::avx512_bf16}) {
      if (bf16_units_available(units)) return units;
    }
    return Bf16Units::none;
  }();
  return best;
}

bool bf16_gemm_supported() { return bf16_gemm_best_units() != Bf16Units::none; }

const char* bf16_units_name(Bf16Units units) {
  switch (units) {
    case Bf16Units::amx_bf16: return "amx_bf16";
    case Bf16Units::avx512_bf16: return "avx512_bf16";
    default: return "none";
  }
}

}  // namespace logitkit::cpu
