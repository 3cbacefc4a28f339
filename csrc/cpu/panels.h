// The per-step products of the sweeps, against a weight laid out once per
// sweep for a register-blocked micro-kernel.
//
// Each step multiplies a few state rows by the same weight. A BLAS call per
// step repacks the weight every time and, at these sizes, picks kernels far
// from the machine's peak (MKL reached 70-75 GFLOP/s per core at 16 rows
// where this kernel reaches 110-115 on the same AMD EPYC core). Here the
// weight is copied once into column panels of kPanelWidth, each a contiguous
// (R x kPanelWidth) stream, and a micro-kernel keeps a block of output rows x
// one panel in vector registers over the whole reduction.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastrnn::cpu {

// The micro-kernels this build has for the CPU it runs on, best first
// ("avx512", "avx2"), and "blas" (a BLAS call per product) last.
std::vector<std::string> product_kernels();
// The kernel float products use: the best available unless set (large
// single products aside: large_products_on_blas()).
const std::string& product_kernel();
// Chooses one of product_kernels() for every float product.
void set_product_kernel(const std::string& name);
// Back to the default: the best kernel, and large_products_on_blas().
void reset_product_kernel();
// Whether a float product of many rows in one call by a large weight (a
// layer's input projection, dx) runs on the BLAS rather than on the chosen
// kernel: by default where the BLAS is MKL on an Intel CPU, whose own
// kernels ran such products 9-31% faster at two threads than the
// micro-kernel on an AVX-512 Xeon (on the AMD EPYC MKL was the slower:
// bench/NOTES.md); never once set_product_kernel has chosen a kernel for
// every product.
bool large_products_on_blas();

// The order a product walks a packed weight's panels in. A sweep alternates
// it from step to step: where the panels a thread reads each step are about
// as large as its cache (LSTM, H=512, one row a step: 2 MiB a core), walking
// them the same way every step evicts each panel just before it is needed
// again, while walking back finds the ones read last still there
// (bench/NOTES.md). The sums do not depend on it.
enum class PanelOrder { kAscending, kDescending };

// The order of a sweep's products at step s (any integer).
inline PanelOrder alternate(int64_t s) {
  return s & 1 ? PanelOrder::kDescending : PanelOrder::kAscending;
}

// A float weight packed into panels: the right-hand factor M (R x N) of
// out = beta out + a M. Its N columns form segments of `segment` columns each
// (a cell's gates); each segment is padded to whole panels, so a product can
// take the same columns [c0, c1) of every segment.
class PackedWeight {
 public:
  static constexpr int64_t kPanelWidth = 32;

  // weight holds M (R x N, row-major), or M^T (N x R) when `transposed`.
  PackedWeight(const float* weight, int64_t R, int64_t N, int64_t segment, bool transposed);

  // out[i * ldo + j] = beta out[...] + bias[j] + sum_r a[i * lda + r] M[r][j],
  // j = s * segment + c, for rows i < n and columns c in [c0, c1) of every
  // segment s; c0 is a multiple of kPanelWidth. bias (N values) may be null.
  void multiply(float* out, int64_t ldo, const float* a, int64_t lda, int64_t n, int64_t c0,
                int64_t c1, float beta, const float* bias = nullptr,
                PanelOrder order = PanelOrder::kAscending) const;

 private:
  at::Tensor panels_;  // (segments, panels per segment, R, kPanelWidth)
  int64_t R_, N_, segment_, panels_per_segment_;
  int kernel_;  // index into the kernel table, fixed at packing
};

// out[i * ldo + j] = beta out[...] + bias[j] + sum_r a[i * lda + r] W[j][r]
// for rows i < n and columns j = s * segment + c, c in [c0, c1) of every
// segment s, with W (N x R, row-major) read as it is: the few rows of `a`
// are laid out as panels instead (R x kPanelWidth each), and the micro-kernel
// takes W's rows as its left-hand rows, giving out^T. Where a weight is used
// for too few rows to pay for packing it, this costs a pass over those rows
// rather than over W. bias (N values) may be null.
void multiply_unpacked(const float* weight, int64_t R, int64_t N, int64_t segment, float* out,
                       int64_t ldo, const float* a, int64_t lda, int64_t n, int64_t c0,
                       int64_t c1, float beta, const float* bias = nullptr);

// One product of multiply_transposed: out (M x N, row stride ldo) = beta out
// + d^T a, for a (rows x N, contiguous).
struct TransposedFactor {
  float* out;
  int64_t ldo;
  const float* a;
  int64_t N;
};

// Weight gradients, summed over every step of every sequence, on the
// threads: for each factor, out = beta out + d^T a, for d (rows x M, row
// stride ldd); and, given `sums` (M values), sums = beta sums + d^T 1 (a
// bias's gradient). In chunks of rows, each factor's rows are packed as
// panels and d's columns transposed into rows once for all factors, so that
// the micro-kernel reads both in order, and the sums read the transposed
// rows while they are in cache. (With d read transposed in place, each step
// of the reduction touched a new cache line: bench/NOTES.md.)
void multiply_transposed(const float* d, int64_t ldd, int64_t M, int64_t rows, float beta,
                         const std::vector<TransposedFactor>& factors, float* sums);

}  // namespace fastrnn::cpu
