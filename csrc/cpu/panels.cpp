#include "cpu/panels.h"

#include "cpu/buffers.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTRNN_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace fastrnn::cpu {
namespace {

constexpr int64_t kPanel = PackedWeight::kPanelWidth;
// Values a thread packs at least, where packing is shared: 7-26 us at
// 0.1-0.4 ns a value, against the microseconds of starting the threads.
constexpr int64_t kMinParallelPack = int64_t{1} << 16;

// One instruction set's micro-kernel (panel_kernel.inc): out (n x cols) =
// beta out + bias + a (n x R) panel (R x cols) for n <= its rows and cols <=
// its pass width; `panel` and `bias` (null: none) point at the pass's first
// column.
using Kernel = void (*)(float* out, int64_t ldo, const float* a, int64_t lda, int64_t n,
                        const float* panel, int64_t R, int64_t cols, float beta,
                        const float* bias);

#ifdef FASTRNN_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
// 8 rows x 2 vectors of 16: 16 of the 32 vector registers accumulate.
constexpr int kRows = 8, kVectors = 2;
struct Vec {
  using type = __m512;
  static constexpr int64_t kWidth = 16;
  static type zero() { return _mm512_setzero_ps(); }
  static type load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, type x) { _mm512_storeu_ps(p, x); }
  static type broadcast(float x) { return _mm512_set1_ps(x); }
  static type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  // Interleaving within 128-bit lanes, by single floats and by pairs.
  static type unpacklo(type a, type b) { return _mm512_unpacklo_ps(a, b); }
  static type unpackhi(type a, type b) { return _mm512_unpackhi_ps(a, b); }
  static type unpacklo2(type a, type b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  static type unpackhi2(type a, type b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
};
#include "cpu/panel_kernel.inc"

// One block of transpose() (below): 16 x 16, a 4 x 4 transpose within each
// 128-bit lane and then the lanes moved; `rows` x `cols` of src read (the
// rest taken as zero), `lanes` of each of dst's `cols` rows written. (GCC
// 12's shuffle intrinsics start from a deliberately undefined vector, which
// its flow analysis reports.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                     int64_t ldd, int64_t lanes) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * lds) : _mm512_setzero_ps();
  }
  transpose_in_lanes(r);
  // Column 4k + m gathers lane k of r[m], r[4 + m], r[8 + m], r[12 + m].
  const __mmask16 lane_mask = static_cast<__mmask16>((1u << lanes) - 1);
  for (int m = 0; m < 4; ++m) {
    const __m512 even_lo = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    const __m512 odd_lo = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    const __m512 even_hi = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    const __m512 odd_hi = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    const __m512 column[4] = {_mm512_shuffle_f32x4(even_lo, even_hi, 0x88),
                              _mm512_shuffle_f32x4(odd_lo, odd_hi, 0x88),
                              _mm512_shuffle_f32x4(even_lo, even_hi, 0xDD),
                              _mm512_shuffle_f32x4(odd_lo, odd_hi, 0xDD)};
    for (int k = 0; k < 4; ++k) {
      if (4 * k + m < cols) _mm512_mask_storeu_ps(dst + (4 * k + m) * ldd, lane_mask, column[k]);
    }
  }
}
#pragma GCC diagnostic pop
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// 6 rows x 2 vectors of 8: 12 of the 16 vector registers accumulate; a
// panel takes two passes.
constexpr int kRows = 6, kVectors = 2;
struct Vec {
  using type = __m256;
  static constexpr int64_t kWidth = 8;
  static type zero() { return _mm256_setzero_ps(); }
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, type x) { _mm256_storeu_ps(p, x); }
  static type broadcast(float x) { return _mm256_set1_ps(x); }
  static type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static type unpacklo(type a, type b) { return _mm256_unpacklo_ps(a, b); }
  static type unpackhi(type a, type b) { return _mm256_unpackhi_ps(a, b); }
  static type unpacklo2(type a, type b) {
    return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
  }
  static type unpackhi2(type a, type b) {
    return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
  }
};
#include "cpu/panel_kernel.inc"

// One block of transpose() (below): 8 x 8, as the AVX-512 one in two lanes.
// (The comment there covers this one too.)
void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                     int64_t ldd, int64_t lanes) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i col_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), index);
  __m256 r[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = i < rows ? _mm256_maskload_ps(src + i * lds, col_mask) : _mm256_setzero_ps();
  }
  transpose_in_lanes(r);
  const __m256i lane_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), index);
  for (int m = 0; m < 4; ++m) {
    const __m256 column[2] = {_mm256_permute2f128_ps(r[m], r[4 + m], 0x20),
                              _mm256_permute2f128_ps(r[m], r[4 + m], 0x31)};
    for (int k = 0; k < 2; ++k) {
      if (4 * k + m < cols) _mm256_maskstore_ps(dst + (4 * k + m) * ldd, lane_mask, column[k]);
    }
  }
}
}  // namespace avx2
#pragma GCC pop_options
#endif

// One instruction set's block of transpose(): dst[c * ldd + i] = src[i *
// lds + c] for i < lanes, c < cols, reading rows <= lanes rows (zero beyond).
using TransposeBlock = void (*)(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                float* dst, int64_t ldd, int64_t lanes);

struct KernelInfo {
  std::string name;
  Kernel kernel;
  int64_t rows;         // output rows per call
  int64_t pass_width;   // panel columns per call
  TransposeBlock transpose_block;
  int64_t block_width;  // of a transpose block: its rows and columns
};

const std::vector<KernelInfo>& kernel_table() {
  static const std::vector<KernelInfo> table = [] {
    std::vector<KernelInfo> t;
#ifdef FASTRNN_X86_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
      t.push_back({"avx512", &avx512::kernel, avx512::kRows,
                   avx512::kVectors * avx512::Vec::kWidth, &avx512::transpose_block,
                   avx512::Vec::kWidth});
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      t.push_back({"avx2", &avx2::kernel, avx2::kRows, avx2::kVectors * avx2::Vec::kWidth,
                   &avx2::transpose_block, avx2::Vec::kWidth});
    }
#endif
    return t;
  }();
  return table;
}

// The index of the best kernel in kernel_table(), or -1 (BLAS) where there is none.
int default_kernel() { return kernel_table().empty() ? -1 : 0; }

// The index of the chosen kernel in kernel_table(), or -1 for BLAS.
std::atomic<int>& chosen() {
  static std::atomic<int> index{default_kernel()};
  return index;
}

// Whether set_product_kernel has chosen the kernel of every product.
std::atomic<bool>& chosen_for_all() {
  static std::atomic<bool> all{false};
  return all;
}

// dst[c * ldd + i] = src[i * lds + c] for i < rows, c < cols, and zero for
// rows <= i < rows_out, in vector blocks (element by element, laying out and
// writing back the rows of multiply_unpacked took longer than its product).
void transpose(const KernelInfo& info, const float* src, int64_t lds, int64_t rows, int64_t cols,
               float* dst, int64_t ldd, int64_t rows_out) {
  const int64_t w = info.block_width;
  for (int64_t c = 0; c < cols; c += w) {
    for (int64_t i = 0; i < rows_out; i += w) {
      const int64_t read = std::clamp<int64_t>(rows - i, 0, w);
      info.transpose_block(read > 0 ? src + i * lds + c : src, lds, read, std::min(w, cols - c),
                           dst + c * ldd + i, ldd, std::min(w, rows_out - i));
    }
  }
}

}  // namespace

std::vector<std::string> product_kernels() {
  std::vector<std::string> names;
  for (const auto& info : kernel_table()) names.push_back(info.name);
  names.push_back("blas");
  return names;
}

const std::string& product_kernel() {
  static const std::string blas = "blas";
  const int index = chosen().load();
  return index < 0 ? blas : kernel_table()[index].name;
}

void set_product_kernel(const std::string& name) {
  const auto& table = kernel_table();
  int index = -1;
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].name == name) index = static_cast<int>(i);
  }
  TORCH_CHECK(index >= 0 || name == "blas", "unknown or unsupported CPU product kernel '", name,
              "': this CPU has ", c10::Join(", ", product_kernels()));
  chosen().store(index);
  chosen_for_all().store(true);
}

void reset_product_kernel() {
  chosen().store(default_kernel());
  chosen_for_all().store(false);
}

bool large_products_on_blas() {
#ifdef FASTRNN_X86_KERNELS
  static const bool intel_mkl = at::hasMKL() && __builtin_cpu_is("intel");
#else
  static const bool intel_mkl = false;
#endif
  return intel_mkl && !chosen_for_all().load();
}

PackedWeight::PackedWeight(const float* weight, int64_t R, int64_t N, int64_t segment,
                           bool transposed)
    : R_(R), N_(N), segment_(segment), kernel_(chosen().load()) {
  TORCH_INTERNAL_ASSERT(kernel_ >= 0 && segment > 0 && N % segment == 0);
  panels_per_segment_ = (segment + kPanel - 1) / kPanel;
  const int64_t segments = N / segment;
  panels_ = at::empty({segments, panels_per_segment_, R, kPanel}, at::kFloat);
  float* p = panels_.mutable_data_ptr<float>();
  // Panel by panel. From M^T (transposed) the panel's columns are M^T's
  // rows, transposed in vector blocks, with zeros in the columns past a
  // segment's end. (Value by value, in tiles of 16 rows, this took about
  // 0.4 ns a value; in blocks, calls at B = 1 and at H = 64 ran up to 9%
  // faster, others about level: bench/NOTES.md.) From M each panel row is
  // a copy of a row piece, padded with zeros past a segment's end.
  // A large weight packs on every thread: one thread packing W_hh and W_ih
  // (1 MiB each at LSTM H = 256) left the other idle for 4% of a forward.
  const int64_t grain = std::max<int64_t>(1, kMinParallelPack / std::max<int64_t>(1, R * kPanel));
  const KernelInfo& info = kernel_table()[kernel_];
  const auto pack = [&](int64_t first, int64_t last) {
    for (int64_t panel = first; panel < last; ++panel) {
      const int64_t s = panel / panels_per_segment_;
      const int64_t c0 = (panel % panels_per_segment_) * kPanel;
      const int64_t cols = std::min(kPanel, segment - c0);
      const int64_t col0 = s * segment + c0;  // the panel's first column of M
      float* dst = p + panel * R * kPanel;
      if (transposed) {
        transpose(info, weight + col0 * R, R, cols, R, dst, kPanel, kPanel);
        continue;
      }
      for (int64_t r = 0; r < R; ++r) {
        std::copy(weight + r * N + col0, weight + r * N + col0 + cols, dst + r * kPanel);
        std::fill(dst + r * kPanel + cols, dst + (r + 1) * kPanel, 0.0f);
      }
    }
  };
  at::parallel_for(0, segments * panels_per_segment_, grain, pack);
}

void PackedWeight::multiply(float* out, int64_t ldo, const float* a, int64_t lda, int64_t n,
                            int64_t c0, int64_t c1, float beta, const float* bias,
                            PanelOrder order) const {
  TORCH_INTERNAL_ASSERT(c0 % kPanel == 0);
  const KernelInfo& info = kernel_table()[kernel_];
  const float* panels = panels_.const_data_ptr<float>();
  const int64_t segments = N_ / segment_;
  // The panels of [c0, c1) in every segment, numbered segment by segment.
  const int64_t per_segment = (c1 - c0 + kPanel - 1) / kPanel, count = segments * per_segment;
  // Panel k's first column of out.
  const auto column_of = [&](int64_t k) {
    const int64_t index = order == PanelOrder::kAscending ? k : count - 1 - k;
    return index / per_segment * segment_ + c0 + index % per_segment * kPanel;
  };
  // Blocks of rows small enough to stay in cache while every panel passes.
  constexpr int64_t kRowBlock = 96;
  for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) {
    const int64_t i1 = std::min(n, i0 + kRowBlock);
    int64_t next_column = column_of(0);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t panel_column = next_column;
      // The panel after this one (the first again for the next block of rows).
      next_column = column_of(k + 1 < count ? k + 1 : 0);
      const int64_t next_i = k + 1 < count ? i0 : i1;
      const int64_t s = panel_column / segment_, c = panel_column % segment_;
      const float* panel = panels + ((s * panels_per_segment_ + c / kPanel) * R_) * kPanel;
      const int64_t panel_cols = std::min(kPanel, c1 - c);
      for (int64_t pass = 0; pass < panel_cols; pass += info.pass_width) {
        const int64_t cols = std::min(info.pass_width, panel_cols - pass);
        const int64_t column = panel_column + pass;
        const float* b = bias ? bias + column : nullptr;
        for (int64_t i = i0; i < i1; i += info.rows) {
          // The output tile of the next call, fetched while this call runs:
          // reading it for beta, or storing to it, missed cache at the end of
          // the call (in the sweeps, out is a whole sequence's gates).
          int64_t tile_i = i + info.rows, tile_column = column, tile_cols = cols;
          if (tile_i >= i1) {
            if (pass + info.pass_width < panel_cols) {  // this panel's next pass
              tile_i = i0;
              tile_column = column + info.pass_width;
              tile_cols = std::min(info.pass_width, panel_cols - pass - info.pass_width);
            } else {  // the next panel's first pass
              tile_i = next_i;
              tile_column = next_column;
              tile_cols = std::min({info.pass_width, kPanel, c1 - next_column % segment_});
            }
          }
          for (int64_t j = tile_i; j < std::min(n, tile_i + info.rows); ++j) {
            const float* row = out + tile_column + j * ldo;
            __builtin_prefetch(row);
            __builtin_prefetch(row + tile_cols - 1);
          }
          info.kernel(out + column + i * ldo, ldo, a + i * lda, lda, std::min(info.rows, i1 - i),
                      panel + pass, R_, cols, beta, b);
        }
      }
    }
  }
}

void multiply_transposed(const float* d, int64_t ldd, int64_t M, int64_t rows, float beta,
                         const std::vector<TransposedFactor>& factors, float* sums) {
  const int index = chosen().load();
  TORCH_INTERNAL_ASSERT(index >= 0);
  const KernelInfo& info = kernel_table()[index];
  const auto scale = [beta](float* o, int64_t n) {  // o = beta o
    for (int64_t j = 0; j < n; ++j) o[j] = beta == 0.0f ? 0.0f : beta * o[j];
  };
  if (rows == 0) {  // an empty sum
    for (const auto& f : factors) {
      for (int64_t m = 0; m < M; ++m) scale(f.out + m * f.ldo, f.N);
    }
    if (sums) scale(sums, M);
    return;
  }
  // Rows a chunk copies: 4 MiB of d at LSTM H = 256 (G = 1024). 512 ran
  // slower, 4096 no faster.
  constexpr int64_t kChunk = 1024;
  // A thread's share of d's columns: whole transpose blocks and kernel rows.
  const int64_t unit = std::lcm(info.block_width, info.rows);
  const auto transposed = empty_buffer({M, std::min(kChunk, rows)}, at::kFloat);
  float* d_t = transposed.mutable_data_ptr<float>();
  const int64_t count = static_cast<int64_t>(factors.size());
  std::vector<std::optional<PackedWeight>> panels(count);
  for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    const int64_t R = std::min(kChunk, rows - r0);
    const auto pack = [&](int64_t f0, int64_t f1) {
      for (int64_t i = f0; i < f1; ++i) {
        const auto& f = factors[i];
        panels[i].emplace(f.a + r0 * f.N, R, f.N, f.N, /*transposed=*/false);
      }
    };
    // A factor too small to share its packing (kMinParallelPack) packs on
    // one thread: where every factor is, they pack side by side instead,
    // one a thread; larger ones one after the other, each on every thread.
    const bool small = std::all_of(factors.begin(), factors.end(), [&](const TransposedFactor& f) {
      return R * f.N <= kMinParallelPack;
    });
    if (count > 1 && small) {
      at::parallel_for(0, count, 1, pack);
    } else {
      pack(0, count);
    }
    const float chunk_beta = r0 == 0 ? beta : 1.0f;
    at::parallel_for(0, (M + unit - 1) / unit, 1, [&](int64_t u0, int64_t u1) {
      const int64_t m0 = u0 * unit, m1 = std::min(M, u1 * unit);
      transpose(info, d + r0 * ldd + m0, ldd, R, m1 - m0, d_t + m0 * R, R, R);
      for (size_t i = 0; i < factors.size(); ++i) {
        const auto& f = factors[i];
        panels[i]->multiply(f.out + m0 * f.ldo, f.ldo, d_t + m0 * R, R, m1 - m0, 0, f.N,
                           chunk_beta);
      }
      for (int64_t m = m0; sums && m < m1; ++m) {
        // Lane by lane, so that the loop vectorises (a float sum in order does not).
        constexpr int kLanes = 16;
        float lane[kLanes] = {};
        const float* row = d_t + m * R;
        int64_t r = 0;
        for (; r + kLanes <= R; r += kLanes) {
          for (int l = 0; l < kLanes; ++l) lane[l] += row[r + l];
        }
        float sum = 0.0f;
        for (; r < R; ++r) sum += row[r];
        for (int l = 0; l < kLanes; ++l) sum += lane[l];
        sums[m] = chunk_beta == 0.0f ? sum : chunk_beta * sums[m] + sum;
      }
    });
  }
}

void multiply_unpacked(const float* weight, int64_t R, int64_t N, int64_t segment, float* out,
                       int64_t ldo, const float* a, int64_t lda, int64_t n, int64_t c0,
                       int64_t c1, float beta, const float* bias) {
  const int index = chosen().load();
  TORCH_INTERNAL_ASSERT(index >= 0 && segment > 0 && N % segment == 0 && c0 <= c1 &&
                        c1 <= segment);
  const KernelInfo& info = kernel_table()[index];
  const int64_t cols_per_segment = c1 - c0, segments = N / segment;
  // Per thread: a^T as one panel of kPanel rows of a (zero past n); out^T for
  // those rows, (segments * cols_per_segment) x kPanel; and out, rows x
  // (segments * cols_per_segment).
  thread_local std::vector<float> panel, product, result;
  const int64_t width = segments * cols_per_segment;
  panel.resize(R * kPanel);
  product.resize(width * kPanel);
  result.resize(width * kPanel);
  for (int64_t i0 = 0; i0 < n; i0 += kPanel) {
    const int64_t rows = std::min(kPanel, n - i0);
    transpose(info, a + i0 * lda, lda, rows, R, panel.data(), kPanel, kPanel);
    for (int64_t s = 0; s < segments; ++s) {
      for (int64_t c = c0; c < c1; c += info.rows) {
        const float* w = weight + (s * segment + c) * R;
        float* o = product.data() + (s * cols_per_segment + c - c0) * kPanel;
        for (int64_t pass = 0; pass < rows; pass += info.pass_width) {
          info.kernel(o + pass, kPanel, w, R, std::min(info.rows, c1 - c), panel.data() + pass, R,
                      std::min(info.pass_width, rows - pass), 0.0f, nullptr);
        }
      }
    }
    transpose(info, product.data(), kPanel, width, rows, result.data(), width, width);
    // out = beta out + bias + result, row by row (each case its own loop,
    // so that each vectorises).
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t s = 0; s < segments; ++s) {
        const float* v = result.data() + i * width + s * cols_per_segment;
        float* o = out + (i0 + i) * ldo + s * segment + c0;
        const float* b = bias ? bias + s * segment + c0 : nullptr;
        const int64_t count = cols_per_segment;
        if (beta == 0.0f && b == nullptr) {
          std::copy(v, v + count, o);
        } else if (beta == 0.0f) {
          for (int64_t c = 0; c < count; ++c) o[c] = v[c] + b[c];
        } else if (b == nullptr) {
          for (int64_t c = 0; c < count; ++c) o[c] = beta * o[c] + v[c];
        } else {
          for (int64_t c = 0; c < count; ++c) o[c] = beta * o[c] + (v[c] + b[c]);
        }
      }
    }
  }
}

}  // namespace fastrnn::cpu
