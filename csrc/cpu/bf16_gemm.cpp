// The AVX512-BF16 GEMM of bf16_gemm.h. Compiled once with the build's
// baseline flags: only the functions marked LOGITKIT_AVX512_BF16 use the
// extension's instructions, and they run only where bf16_gemm_supported()
// says the CPU has them (no other code of this file, and none of the
// templates it instantiates, is compiled for AVX-512).
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
#define LOGITKIT_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))
#else
#define LOGITKIT_HAVE_BF16_GEMM 0
#endif

namespace logitkit::cpu {

#if LOGITKIT_HAVE_BF16_GEMM

namespace {

// Micro-tile: kMicroRows rows of C x kMicroCols columns (two 16-lane fp32
// registers per row): 16 accumulators, enough independent dot products to
// hide vdpbf16ps' latency, and few enough registers for the B operands.
constexpr int64_t kMicroRows = 8;
constexpr int64_t kMicroCols = 32;
// Cache blocks: kBlockPairs k-pairs (256 bf16 of K) per block, so that a B
// panel (kBlockPairs x kMicroCols words, 16 KiB) stays in L1 while the A
// panels of a row block (at most kMaxBlockRows rows, 96 KiB: L2) stream past
// it; B blocks of at most kMaxBlockCols columns. (Measured on an AMD EPYC
// with AVX512-BF16, 2 threads: 8 x 32 tiles with 128 or 256 pairs ran
// 150-280 GFLOP/s on the loss's GEMM shapes; 12 x 32, 14 x 32, 6 x 64 and
// 4 x 96 tiles were slower.)
constexpr int64_t kBlockPairs = 128;
constexpr int64_t kMaxBlockRows = 192;
constexpr int64_t kMaxBlockCols = 2048;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A matrix seen as `lines` (the rows of A, or the columns of B) along K:
// element (line, kk) at data[line * line_stride + kk * k_stride].
struct Lines {
  const uint16_t* data;
  int64_t line_stride;
  int64_t k_stride;
  int64_t k;  // K (elements)

  // bf16 elements kk and kk + 1 of a line as one word (low half first, the
  // order vdpbf16ps pairs them in); the element past an odd K is 0.
  uint32_t pair(int64_t line, int64_t kk) const {
    const uint16_t* x = data + line * line_stride + kk * k_stride;
    const uint32_t hi = kk + 1 < k ? x[k_stride] : 0u;
    return static_cast<uint32_t>(x[0]) | (hi << 16);
  }
};

// Packs lines [first, first + count) and k-pairs [pair0, pair0 + pairs) into
// panels of `width` lines: word (panel, p, w) at ((panel * pairs) + p) *
// width + w, lines past the end as zeros. The loop runs along whichever of K
// and the lines is contiguous in memory.
void pack_panels(const Lines& x, int64_t first, int64_t count, int64_t pair0, int64_t pairs, int64_t width,
                 uint32_t* out) {
  const int64_t panels = ceil_div(count, width);
  for (int64_t panel = 0; panel < panels; ++panel) {
    uint32_t* dst = out + panel * pairs * width;
    const int64_t live = std::min(width, count - panel * width);
    const int64_t line0 = first + panel * width;
    if (x.k_stride == 1) {
      for (int64_t w = 0; w < live; ++w) {
        for (int64_t p = 0; p < pairs; ++p) dst[p * width + w] = x.pair(line0 + w, 2 * (pair0 + p));
      }
    } else {
      for (int64_t p = 0; p < pairs; ++p) {
        for (int64_t w = 0; w < live; ++w) dst[p * width + w] = x.pair(line0 + w, 2 * (pair0 + p));
      }
    }
    for (int64_t w = live; w < width; ++w) {
      for (int64_t p = 0; p < pairs; ++p) dst[p * width + w] = 0u;
    }
  }
}

// c[r][j] (+)= sum_p a-pair(r, p) . b-pair(p, j) for a kMicroRows x
// kMicroCols tile: a is an A panel (kMicroRows words per pair), b a B panel
// (kMicroCols words per pair), c rows ldc apart.
LOGITKIT_AVX512_BF16 void micro_kernel(int64_t pairs, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc,
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

// One micro-tile of C at (row, col) with `rows` x `cols` live entries: in
// place when whole, through a padded scratch tile at the edges.
void tile(int64_t pairs, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc, int64_t rows, int64_t cols,
          bool accumulate) {
  if (rows == kMicroRows && cols == kMicroCols) {
    micro_kernel(pairs, a, b, c, ldc, accumulate);
    return;
  }
  float scratch[kMicroRows * kMicroCols] = {};
  if (accumulate) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(scratch + r * kMicroCols, c + r * ldc, cols * sizeof(float));
  }
  micro_kernel(pairs, a, b, scratch, kMicroCols, accumulate);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, scratch + r * kMicroCols, cols * sizeof(float));
}

}  // namespace

bool bf16_gemm_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return false;
    // AVX512_BF16: CPUID leaf 7, sub-leaf 1, EAX bit 5 (GCC 12's
    // __builtin_cpu_supports does not know the name).
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return ((eax >> 5) & 1u) != 0;
  }();
  return supported;
}

void bf16_gemm(int64_t m, int64_t n, int64_t k, Bf16MatrixView a, Bf16MatrixView b, float* c, int64_t ldc,
               bool accumulate) {
  TORCH_INTERNAL_ASSERT(bf16_gemm_supported(), "bf16_gemm: this CPU has no AVX512-BF16");
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.0f);
    }
    return;
  }
  const Lines a_lines{a.data, a.row_stride, a.col_stride, k};  // A's rows
  const Lines b_lines{b.data, b.col_stride, b.row_stride, k};  // B's columns
  const int64_t total_pairs = ceil_div(k, 2);
  // Work split: row blocks (at least one per thread, each packing its own A
  // block); when there are fewer row blocks than threads, also column parts.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t row_blocks = threads * ceil_div(m, threads * kMaxBlockRows);
  const int64_t block_rows = ceil_div(ceil_div(m, row_blocks), kMicroRows) * kMicroRows;
  row_blocks = ceil_div(m, block_rows);

  std::vector<uint32_t> b_packed;
  for (int64_t col0 = 0; col0 < n; col0 += kMaxBlockCols) {
    const int64_t block_cols = std::min(kMaxBlockCols, n - col0);
    const int64_t col_panels = ceil_div(block_cols, kMicroCols);
    const int64_t col_parts = std::min(col_panels, std::max<int64_t>(1, threads / row_blocks));
    for (int64_t pair0 = 0; pair0 < total_pairs; pair0 += kBlockPairs) {
      const int64_t pairs = std::min(kBlockPairs, total_pairs - pair0);
      const bool add = accumulate || pair0 > 0;
      b_packed.resize(col_panels * pairs * kMicroCols);
      at::parallel_for(0, col_panels, 1, [&](int64_t first, int64_t last) {
        pack_panels(b_lines, col0 + first * kMicroCols,
                    std::min(block_cols - first * kMicroCols, (last - first) * kMicroCols), pair0, pairs, kMicroCols,
                    b_packed.data() + first * pairs * kMicroCols);
      });
      at::parallel_for(0, row_blocks * col_parts, 1, [&](int64_t first, int64_t last) {
        std::vector<uint32_t> a_packed(block_rows * pairs);
        int64_t packed_block = -1;
        for (int64_t task = first; task < last; ++task) {
          const int64_t block = task / col_parts, part = task % col_parts;
          const int64_t row0 = block * block_rows, rows = std::min(block_rows, m - row0);
          if (block != packed_block) {
            pack_panels(a_lines, row0, rows, pair0, pairs, kMicroRows, a_packed.data());
            packed_block = block;
          }
          const int64_t panel_begin = part * col_panels / col_parts, panel_end = (part + 1) * col_panels / col_parts;
          for (int64_t cp = panel_begin; cp < panel_end; ++cp) {
            const int64_t col = cp * kMicroCols, cols = std::min(kMicroCols, block_cols - col);
            const uint32_t* b_panel = b_packed.data() + cp * pairs * kMicroCols;
            for (int64_t r = 0; r < rows; r += kMicroRows) {
              tile(pairs, a_packed.data() + r * pairs, b_panel, c + (row0 + r) * ldc + col0 + col, ldc,
                   std::min(kMicroRows, rows - r), cols, add);
            }
          }
        }
      });
    }
  }
}

#else  // not x86-64 with GCC/Clang: no kernel

bool bf16_gemm_supported() { return false; }

void bf16_gemm(int64_t, int64_t, int64_t, Bf16MatrixView, Bf16MatrixView, float*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "bf16_gemm: not built for this CPU");
}

#endif

}  // namespace logitkit::cpu
