// Shared pieces of the CPU recurrences: argument checks, the map from
// (step, sequence) to time, and the small GEMM/parallel helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/buffers.h"
#include "cpu/panels.h"
#include "cpu/team.h"

namespace fastrnn::cpu {

// Sizes of one layer in one direction. G is the number of gate rows (H for an
// RNN, 3H for a GRU, 4H for an LSTM); K the width of h, which W_hh
// multiplies: H, or P with a projection.
struct LayerSizes {
  int64_t T, B, I, H, G, K;
};

// Checks the arguments every layer op takes and returns the layer's sizes.
// Messages for dtype mismatches follow at::mm so that modules report what
// torch.nn reports.
// hx holds the states: h (B, K), then any others (B, H).
LayerSizes check_layer_args(
    const at::Tensor& input,
    at::TensorList hx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr,
    const std::optional<at::Tensor>& lengths,
    int64_t gates);

// Checks the gradients handed to a backward op against the forward's sizes.
void check_grad_args(
    const LayerSizes& sizes,
    const at::Tensor& grad_output,
    at::TensorList grad_hy,
    at::TensorList hx,
    const at::Tensor& output);

// Where step s of sequence b sits in time. A sequence of length L is active
// for steps 0..L-1; after that its state is held. Running in reverse, step s
// reads time L-1-s, so each sequence starts from its own last element.
class StepMap {
 public:
  StepMap(int64_t T, int64_t B, const std::optional<at::Tensor>& lengths, bool reverse);

  int64_t length(int64_t b) const { return len_ ? len_[b] : T_; }
  bool active(int64_t s, int64_t b) const { return s < length(b); }
  int64_t time(int64_t s, int64_t b) const { return reverse_ ? length(b) - 1 - s : s; }
  // True when every sequence active at a step reads the same time index, so
  // that step's rows form one contiguous slice of a (T, B, ...) tensor (at
  // T = 1 every length is 1).
  bool uniform_time() const { return !(reverse_ && len_) || T_ == 1; }
  int64_t uniform_time_of(int64_t s) const { return reverse_ ? T_ - 1 - s : s; }
  // Rows [0, rows(s)) hold every sequence still active at step s; the
  // recurrent GEMM of that step skips the rest (sorted batches shrink).
  int64_t rows(int64_t s) const { return rows_[s]; }
  // The steps that run: rows(s) > 0 for s < steps(), and every sequence has
  // ended after them (rows never grows again).
  int64_t steps() const { return std::find(rows_.begin(), rows_.end(), 0) - rows_.begin(); }
  bool has_lengths() const { return len_ != nullptr; }
  // The time-major row (t * B + b) of the step before `row`'s in the
  // sweep's order, or -1 at its sequence's first step (which starts from
  // the initial state).
  int64_t previous_row(int64_t row) const {
    const int64_t t = row / B_, b = row - t * B_;
    if (reverse_ ? t == length(b) - 1 : t == 0) {
      return -1;
    }
    return reverse_ ? row + B_ : row - B_;
  }

 private:
  int64_t T_, B_;
  const int64_t* len_;
  bool reverse_;
  std::vector<int64_t> rows_;
  at::Tensor lengths_;  // keeps len_ alive
};

// b_ih plus the first `folded_columns` entries of b_hh, G values (either
// may be absent; empty when both are).
template <typename scalar_t>
std::vector<scalar_t> summed_bias(const std::optional<at::Tensor>& bias_ih,
                                  const std::optional<at::Tensor>& bias_hh,
                                  int64_t folded_columns, int64_t G) {
  const auto contiguous_or_none = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
  };
  const at::Tensor b_ih = contiguous_or_none(bias_ih);
  const at::Tensor b_hh = folded_columns > 0 ? contiguous_or_none(bias_hh) : at::Tensor();
  if (!b_ih.defined() && !b_hh.defined()) {
    return {};
  }
  const scalar_t* bi = b_ih.defined() ? b_ih.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bh = b_hh.defined() ? b_hh.const_data_ptr<scalar_t>() : nullptr;
  std::vector<scalar_t> sum(G);
  for (int64_t j = 0; j < G; ++j) {
    sum[j] = (bi ? bi[j] : scalar_t(0)) + (bh && j < folded_columns ? bh[j] : scalar_t(0));
  }
  return sum;
}

// x (T, B, I) times W_ih^T plus summed_bias(bias_ih, bias_hh,
// folded_columns): the input projection of every step as one GEMM, as
// (T * B, G) rows. Written into `out` (its rows may be strided) when given,
// else into a new tensor; returns it.
at::Tensor project_input(const at::Tensor& input, const at::Tensor& weight_ih,
                         const std::optional<at::Tensor>& bias_ih,
                         const std::optional<at::Tensor>& bias_hh, int64_t folded_columns,
                         at::Tensor out = {});

// The state each step started from, in time order: (T, B, H). Entries at
// padded positions are zero.
at::Tensor previous_states(const at::Tensor& output, const at::Tensor& hx,
                           const StepMap& map, bool reverse);

// The Fortran BLAS that PyTorch's CPU library exports where it links one
// (MKL on x86-64). Weak: where it is absent they are null and gemm() below
// goes through ATen instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

// Whether every size fits the Fortran BLAS's 32-bit integers.
inline bool fits_blas_int(std::initializer_list<int64_t> sizes) {
  for (const int64_t size : sizes) {
    if (size > std::numeric_limits<int>::max()) return false;
  }
  return true;
}

// Column-major C (m x n) = A' B' + beta C, A' = A^T if trans_a (A stored k x m)
// else A (m x k), likewise B'. A direct BLAS call on raw rows: at small
// sizes the dispatcher and tensor views that at::mm_out needs cost as much
// as the product itself. Sizes past the BLAS's 32-bit integers go through
// ATen, which takes 64-bit sizes, rather than wrap.
template <typename scalar_t>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a,
                 int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c,
                 int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  // BLAS requires leading dimensions >= 1 even for empty matrices (H = 0).
  lda = std::max<int64_t>(1, lda), ldb = std::max<int64_t>(1, ldb), ldc = std::max<int64_t>(1, ldc);
  if (fits_blas_int({m, n, k, lda, ldb, ldc})) {
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    const scalar_t one = 1;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (sgemm_ != nullptr) {
        sgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
        return;
      }
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      if (dgemm_ != nullptr) {
        dgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
        return;
      }
    }
  }
  // A column-major (r x s) matrix with leading dimension ld is the row-major
  // (s x r) tensor with row stride ld, transposed. Worker threads start with
  // grad mode on, and this product must not be recorded.
  c10::AutoGradMode no_grad(false);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<scalar_t*>(p), {trans ? rows : cols, trans ? cols : rows},
                           {ld, 1}, options);
    return trans ? t : t.t();
  };
  auto c_view = view(c, m, n, ldc, false);
  c_view.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, 1);
}

// The right-hand factor M (R x N) of products out = beta out + a M by one
// weight: a sweep's per-step products and the layer's large ones. M's N
// columns form segments of `segment` columns (a cell's gates: the product of
// a block of units takes those units of every gate). `weight` holds M
// (R x N, row-major), or M^T (N x R) when `transposed` (W_hh for h W_hh^T).
// float products run on a micro-kernel over a copy packed once (panels.h);
// double products, float with the "blas" product kernel, and large single
// float products where large_products_on_blas(), call the BLAS.
template <typename scalar_t>
class WeightProduct {
 public:
  // total_rows: the rows of all its products together; product_rows: the
  // rows of each (a sweep's batch; a single product's all). Packing cost
  // about 0.4 ns a value when this was measured (less since W^T is packed
  // in vector blocks); the kernel gains over the BLAS about 0.03 ns a value
  // a row at one row a product, falling about as 1/sqrt(rows a product)
  // (bench/NOTES.md): break-even near 13 sqrt(product_rows) rows in all on
  // those figures, measured at 20-24 at one row for the largest weights
  // (beyond L2). So a weight is packed from 24 sqrt(product_rows) rows, and
  // from 256 whatever the products. For fewer, a weight given as W (N x R,
  // `transposed`) whose products have at least kUnpackedRows rows runs on the
  // micro-kernel as it is (multiply_unpacked: the rows are laid out instead);
  // any other stays as it is, on the BLAS. So does a single product (no
  // product_rows given: the input projection, dx) of kLarge rows or more, by
  // a weight of kLarge rows and columns or more, where
  // large_products_on_blas(): such products ran faster on MKL there, those
  // by a weight of 64 rows (LSTM, H = 64) slower (bench/NOTES.md).
  WeightProduct(const scalar_t* weight, int64_t R, int64_t N, int64_t segment, bool transposed,
                int64_t total_rows, int64_t product_rows = -1)
      : weight_(weight), R_(R), N_(N), segment_(segment), transposed_(transposed) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const bool large = product_rows < 0 && total_rows >= kLarge && R >= kLarge && N >= kLarge;
      if (product_rows < 0) product_rows = total_rows;
      if (N > 0 && R > 0 && product_kernel() != "blas" && !(large && large_products_on_blas())) {
        if (packs(total_rows, product_rows)) {
          packed_.emplace(weight, R, N, segment, transposed);
        } else {
          unpacked_ = transposed && product_rows >= kUnpackedRows;
        }
      }
    }
  }

  // Whether the products run on the micro-kernel; if not, each call of
  // block() or columns() is a BLAS call per segment.
  bool on_kernel() const { return packed_.has_value() || unpacked_; }

  // The bytes of the weight every product reads from its packed copy (0:
  // none; the copy pads each segment to whole panels).
  int64_t packed_bytes() const { return packed_ ? R_ * N_ * int64_t{sizeof(scalar_t)} : 0; }

  // Block k of a step's product (out = beta out + a M; out: (B, N), a: (B,
  // R), contiguous): rows [b0, min(b1, rows)), columns [j0, j1) of every
  // segment; a packed weight's panels walked in `order`. With `bias` (N
  // values; beta must be 0) out = bias + a M.
  void block(scalar_t* out, const scalar_t* a, int64_t rows, const Block& k, scalar_t beta,
             PanelOrder order, const scalar_t* bias = nullptr) const {
    block(out, N_, a, R_, rows, k, beta, order, bias);
  }

  // The same with row strides ldo and lda.
  void block(scalar_t* out, int64_t ldo, const scalar_t* a, int64_t lda, int64_t rows,
             const Block& k, scalar_t beta, PanelOrder order,
             const scalar_t* bias = nullptr) const {
    const int64_t n = std::min(k.b1, rows) - k.b0;
    columns(out + k.b0 * ldo, ldo, a + k.b0 * lda, lda, n, k.j0, k.j1, beta, bias, order);
  }

  // The whole product over n rows (row strides ldo and lda), split across
  // the threads, or on the calling thread below kMinParallelWork; with `bias`
  // (N values; beta must be 0) out = bias + a M. The micro-kernel starts its
  // sums from the bias, where the BLAS needs it written to every row of out
  // first: a pass over the whole output.
  void multiply(scalar_t* out, int64_t ldo, const scalar_t* a, int64_t lda, int64_t n,
                scalar_t beta, const scalar_t* bias = nullptr) const {
    TORCH_INTERNAL_ASSERT(bias == nullptr || beta == scalar_t(0));
    if (!packed_ && !unpacked_) {  // the BLAS threads it
      if (bias != nullptr) {
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, N_));
        at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
          write_bias(out + r0 * ldo, ldo, r1 - r0, 0, segment_, bias);
        });
        beta = 1;
      }
      columns(out, ldo, a, lda, n, 0, segment_, beta);
      return;
    }
    if (n * R_ * N_ < kMinParallelWork) {
      columns(out, ldo, a, lda, n, 0, segment_, beta, bias);
      return;
    }
    if (unpacked_) {
      // Few rows: the columns of every segment split across the threads, in
      // units of 8 (the AVX-512 kernel's rows of W), each thread taking all rows.
      constexpr int64_t kColumnUnit = 8;
      at::parallel_for(0, (segment_ + kColumnUnit - 1) / kColumnUnit, 1,
                       [&](int64_t u0, int64_t u1) {
                         columns(out, ldo, a, lda, n, u0 * kColumnUnit,
                                 std::min(segment_, u1 * kColumnUnit), beta, bias);
                       });
      return;
    }
    // The rows in units of 8, split evenly across the threads (tasks of a
    // fixed 96 rows left one thread up to a task behind the other: 9 of 17
    // at 1600 rows). The kernel blocks each thread's rows for the cache.
    constexpr int64_t kRowUnit = 8;
    at::parallel_for(0, (n + kRowUnit - 1) / kRowUnit, 1, [&](int64_t t0, int64_t t1) {
      const int64_t r0 = t0 * kRowUnit, r1 = std::min(n, t1 * kRowUnit);
      columns(out + r0 * ldo, ldo, a + r0 * lda, lda, r1 - r0, 0, segment_, beta, bias);
    });
  }

 private:
  // Rows [0, n) x columns [c0, c1) of every segment, on this thread (or the
  // BLAS's).
  void columns(scalar_t* out, int64_t ldo, const scalar_t* a, int64_t lda, int64_t n, int64_t c0,
               int64_t c1, scalar_t beta, const scalar_t* bias = nullptr,
               PanelOrder order = PanelOrder::kAscending) const {
    TORCH_INTERNAL_ASSERT(bias == nullptr || beta == scalar_t(0));
    if (n <= 0 || c1 <= c0) {
      return;
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (packed_) {
        packed_->multiply(out, ldo, a, lda, n, c0, c1, beta, bias, order);
        return;
      }
      if (unpacked_) {
        multiply_unpacked(weight_, R_, N_, segment_, out, ldo, a, lda, n, c0, c1, beta, bias);
        return;
      }
    }
    if (bias != nullptr) {  // the BLAS adds to what out holds
      write_bias(out, ldo, n, c0, c1, bias);
      beta = 1;
    }
    // Column-major: out^T[cols] (cols x n) = M^T[cols] (cols x R) a^T (R x n) + beta out^T.
    auto product = [&](int64_t c, int64_t count) {
      gemm<scalar_t>(transposed_, false, count, n, R_, transposed_ ? weight_ + c * R_ : weight_ + c,
                     transposed_ ? R_ : N_, a, lda, beta, out + c, ldo);
    };
    if (c0 == 0 && c1 == segment_) {  // every column: one product
      product(0, N_);
      return;
    }
    for (int64_t s = 0; s < N_; s += segment_) {
      product(s + c0, c1 - c0);
    }
  }

  // Columns [c0, c1) of every segment of rows [0, n) of out = the bias's.
  void write_bias(scalar_t* out, int64_t ldo, int64_t n, int64_t c0, int64_t c1,
                  const scalar_t* bias) const {
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t s = 0; s < N_; s += segment_) {
        std::copy(bias + s + c0, bias + s + c1, out + r * ldo + s + c0);
      }
    }
  }

  static bool packs(int64_t total_rows, int64_t product_rows) {
    const double enough = std::min(256.0, 24.0 * std::sqrt(static_cast<double>(product_rows)));
    return static_cast<double>(total_rows) >= enough;
  }

  // Below this many rows a product leaves most of a panel of rows empty.
  static constexpr int64_t kUnpackedRows = 16;
  // A single product's rows, and its weight's, from which it is large.
  static constexpr int64_t kLarge = 256;

  const scalar_t* weight_;
  int64_t R_, N_, segment_;
  bool transposed_;
  std::optional<PackedWeight> packed_;  // float only
  bool unpacked_ = false;               // float only: multiply_unpacked
};

// The bytes split_step weighs for a sweep's split by sequences at small
// batches: the packed W_hh's, or 0 with lengths, where the sequences still
// running fall below a kernel block a thread as they end (GRU B=16, H=256
// ran 3-11% slower split by sequences: bench/NOTES.md).
template <typename scalar_t>
int64_t sequence_split_bytes(const WeightProduct<scalar_t>& recurrent, const StepMap& map) {
  return map.has_lengths() ? 0 : recurrent.packed_bytes();
}

// Copies (or, from null, zeroes) units [j0, j1) of every gate of one (G)-row.
template <typename scalar_t>
inline void copy_units(const scalar_t* from, scalar_t* to, int64_t G, int64_t H, int64_t j0,
                       int64_t j1) {
  for (int64_t g = 0; g < G; g += H) {
    if (from) {
      std::copy(from + g + j0, from + g + j1, to + g + j0);
    } else {
      std::fill(to + g + j0, to + g + j1, scalar_t(0));
    }
  }
}

// The projection of a cell's output, h = m W_hr^T with W_hr (P, H), for the
// sweeps; `weight` null without one (h is m itself).
template <typename scalar_t>
struct OutputProjection {
  const scalar_t* weight = nullptr;
  int64_t P = 0;
};

// An input projection the forward sweep computes step by step, each thread
// for its own block: out = x W^T + bias, with `product` by W (G, I), x (T,
// B, I) contiguous, bias G values (null: none) and out (T * B, G) rows of
// stride ldo.
template <typename scalar_t>
struct StepInput {
  const WeightProduct<scalar_t>* product = nullptr;
  const scalar_t* x = nullptr;
  int64_t I = 0;
  const scalar_t* bias = nullptr;
  scalar_t* out = nullptr;
  int64_t ldo = 0;
};

// The forward time loop every cell shares. Each step, each thread of the
// sweep's team takes a block of sequences x hidden units (split_step): it
// multiplies its sequences' states h_b (K wide: H, or P with a projection)
// by those units' rows of W_hh (every gate), then row_fn(row, j0, j1, q_b,
// h_b, next_b, c_b) updates units [j0, j1) of sequence b at time-major row
// `row` = t * B + b from q_b = W_hh h_b + bias (G; `bias` may be null) and
// the state h_b, writing the new state (or the m it projects) to next_b and
// the outputs; c_b is the row of the second state, updated in place (null
// without one). The state is double-buffered: other threads may still read
// this step's state while the next is written; the threads meet after each
// step. With a projection a second pass over the P units of each step
// computes h = m W_hr^T and hands each active row to out_fn(row, p0, p1,
// h_b). Given an `input`, each thread first computes its block's input
// projection of the step (every active sequence reads the same time at each
// step). A sequence past its end holds its states. Returns the final states.
template <typename scalar_t, typename RowFn, typename OutFn>
std::vector<at::Tensor> sweep_forward(const at::Tensor& weight_hh, const scalar_t* bias,
                                      const at::Tensor& hx, const at::Tensor& cx,
                                      const OutputProjection<scalar_t>& projection,
                                      const StepMap& map, int64_t T, int64_t H,
                                      const RowFn& row_fn, const OutFn& out_fn,
                                      const StepInput<scalar_t>* input = nullptr) {
  TORCH_INTERNAL_ASSERT(input == nullptr || map.uniform_time());
  const int64_t B = hx.size(0), K = hx.size(1), G = weight_hh.size(0), P = projection.P;
  const int64_t steps = map.steps();
  // Two state buffers, each step reading one and writing the other (a
  // sequence past its end copies its state across once, and then both hold
  // it). A single step only writes the second: the first can be hx itself.
  const at::Tensor buffers[2] = {steps > 1 ? contiguous_copy(hx) : hx.contiguous(),
                                 at::empty({B, K}, hx.options())};
  auto hh = at::empty({B, G}, hx.options());
  auto cell = cx.defined() ? contiguous_copy(cx) : at::Tensor();
  const at::Tensor m = projection.weight ? at::empty({B, H}, hx.options()) : at::Tensor();
  // q = h W_hh^T, and h = m W_hr^T with a projection.
  const WeightProduct<scalar_t> recurrent(weight_hh.const_data_ptr<scalar_t>(), K, G, H, true,
                                          T * B, B);
  const std::optional<WeightProduct<scalar_t>> project =
      projection.weight ? std::make_optional<WeightProduct<scalar_t>>(projection.weight, H, P, P,
                                                                      true, T * B, B)
                        : std::nullopt;
  const int64_t row_work = G * (K + (input ? input->I : 0));  // multiply-adds a sequence a step
  const int64_t threads = team_threads(steps * B * row_work);
  const auto blocks = split_step(B, H, row_work, PackedWeight::kPanelWidth, threads,
                                 sequence_split_bytes(recurrent, map));
  const auto projected_blocks =
      m.defined() ? split_step(B, P, P * H, PackedWeight::kPanelWidth, threads,
                               sequence_split_bytes(*project, map))
                  : std::vector<Block>{};
  scalar_t* q = hh.mutable_data_ptr<scalar_t>();
  scalar_t* c = cell.defined() ? cell.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* mp = m.defined() ? m.mutable_data_ptr<scalar_t>() : nullptr;
  // buffers[0] is written from the second step on, where it is a copy.
  scalar_t* const state[2] = {const_cast<scalar_t*>(buffers[0].const_data_ptr<scalar_t>()),
                              buffers[1].mutable_data_ptr<scalar_t>()};
  Team::run(std::max(blocks.size(), projected_blocks.size()), [&](const Team& team) {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t rows = map.rows(s);
      const scalar_t* h = state[s & 1];
      scalar_t* hn = state[(s + 1) & 1];
      scalar_t* dest = mp ? mp : hn;
      team.each(blocks, rows, [&](const Block& k) {
        if (input) {
          const int64_t t = map.uniform_time_of(s);
          input->product->block(input->out + t * B * input->ldo, input->ldo,
                               input->x + t * B * input->I, input->I, rows, k, scalar_t(0),
                               alternate(s), input->bias);
        }
        recurrent.block(q, h, rows, k, scalar_t(0), alternate(s), bias);
        for (int64_t b = k.b0; b < k.b1; ++b) {
          if (map.active(s, b)) {
            row_fn(map.time(s, b) * B + b, k.j0, k.j1, q + b * G, h + b * K, dest + b * H,
                   c ? c + b * H : nullptr);
          } else if (!mp && s == map.length(b)) {
            // First step past the end: after this copy both buffers hold it.
            std::copy(h + b * H + k.j0, h + b * H + k.j1, hn + b * H + k.j0);
          }
        }
      });
      team.sync();
      if (mp) {
        team.each(projected_blocks, rows, [&](const Block& k) {
          project->block(hn, mp, rows, k, scalar_t(0), alternate(s));
          for (int64_t b = k.b0; b < k.b1; ++b) {
            if (map.active(s, b)) {
              out_fn(map.time(s, b) * B + b, k.j0, k.j1, hn + b * P);
            } else if (b < rows || s == map.length(b)) {
              // Held: the product overwrote it, or this is the first step past the end.
              std::copy(h + b * P + k.j0, h + b * P + k.j1, hn + b * P + k.j0);
            }
          }
        });
        team.sync();
      }
    }
  });
  // No step ran: the final state must not be hx itself.
  at::Tensor final_state = steps == 0 ? buffers[0].clone() : buffers[steps & 1];
  if (cell.defined()) {
    return {final_state, cell};
  }
  return {final_state};
}

// The projection's part of the reverse sweep: W_hr (P, H), and per row
// of the layer the upstream output gradient (T, B, P) and where the sweep
// writes the total gradient reaching h (T, B, P), which grad W_hr needs.
template <typename scalar_t>
struct GradProjection {
  const scalar_t* weight = nullptr;
  int64_t P = 0;
  const scalar_t* grad_out = nullptr;
  scalar_t* grad_h = nullptr;
};

// The reverse sweep every cell shares. Steps run from last to first; a
// sequence past its end at a step held its states, so their gradients pass
// through. Each step, each thread takes a block of sequences x hidden units
// [j0, j1) (split_step): it first completes its block of dh with the
// previous (later) step's product grad_hh_{t+1} W_hh, then for each active
// sequence b row_fn(row, j0, j1, dh_b, carry_b, dc_b) computes the cell's
// gradients of those units at time-major row `row` = t * B + b: it writes
// their hidden-side pre-activation gradients (every gate) to grad_hh[row]
// and to carry_b the part of the previous step's dh that does not pass
// through W_hh; dc_b, the second state's gradient (null without one), it
// updates in place. With a projection, dh is P wide: it is completed and
// summed with the output gradient over the P units first, then taken
// through W_hr to the H units (dm), which row_fn gets as dh_b, with carry_b
// null (h reaches the earlier step through W_hh alone). A step's product
// needs every unit's gradients, so it runs at the start of the next step,
// after the threads of the sweep's team have met. grad_hh (T, B, G) must be zero at padded
// positions. Returns the gradient of the initial h (undefined unless
// `initial_h`: its product, the first step's, is skipped); dc ends as the
// initial second state's.
template <typename scalar_t, typename RowFn>
at::Tensor sweep_backward(at::Tensor& grad_hh, const at::Tensor& weight_hh, at::Tensor dh,
                          at::Tensor& dc, const GradProjection<scalar_t>& projection,
                          const StepMap& map, int64_t H, bool initial_h, const RowFn& row_fn) {
  const int64_t T = grad_hh.size(0), B = grad_hh.size(1), G = grad_hh.size(2);
  const int64_t K = dh.size(1), P = projection.P;
  const bool projects = projection.weight != nullptr;
  auto carry = at::empty(dh.sizes(), dh.options());
  // With a projection: the step's gradient reaching h (B, P) and m (B, H).
  const at::Tensor grad_step = projects ? at::zeros({B, P}, dh.options()) : at::Tensor();
  const at::Tensor grad_m = projects ? at::empty({B, H}, dh.options()) : at::Tensor();
  // Running in reverse with lengths, a step's rows sit at different times:
  // they are gathered for the product, into one of two buffers (the step
  // before's product still reads the other).
  auto gathered = map.uniform_time() ? at::Tensor() : at::empty({2, B, G}, dh.options());
  scalar_t* gh = grad_hh.mutable_data_ptr<scalar_t>();
  scalar_t* dcp = dc.defined() ? dc.mutable_data_ptr<scalar_t>() : nullptr;
  // dh += grad_hh W_hh, and dm = dh W_hr with a projection.
  const WeightProduct<scalar_t> recurrent(weight_hh.const_data_ptr<scalar_t>(), G, K, K, false,
                                          T * B, B);
  const std::optional<WeightProduct<scalar_t>> project =
      projects ? std::make_optional<WeightProduct<scalar_t>>(projection.weight, P, H, H, false,
                                                             T * B, B)
               : std::nullopt;
  const int64_t steps = map.steps();
  const int64_t threads = team_threads(steps * B * G * K);
  const int64_t packed = sequence_split_bytes(recurrent, map);
  const auto blocks = split_step(B, H, G * K, PackedWeight::kPanelWidth, threads, packed);
  const auto projected_blocks =
      projects ? split_step(B, P, G * P, PackedWeight::kPanelWidth, threads, packed)
               : std::vector<Block>{};
  const auto initial_blocks = split_step(B, K, G * K, PackedWeight::kPanelWidth, threads, packed);
  // dh and carry trade places after every step that runs.
  scalar_t* const grads[2] = {dh.mutable_data_ptr<scalar_t>(), carry.mutable_data_ptr<scalar_t>()};
  scalar_t* gs = projects ? grad_step.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dm = projects ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
  Team::run(std::max({blocks.size(), projected_blocks.size(), initial_blocks.size()}),
            [&](const Team& team) {
    int64_t d = 0;                      // grads[d] is dh, grads[d ^ 1] carry
    const scalar_t* pending = nullptr;  // the later step's grad_hh rows
    int64_t pending_rows = 0;
    // Past the steps that run every sequence has ended: the gradients pass through.
    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t rows = map.rows(s);
      scalar_t* dhp = grads[d];
      scalar_t* cp = grads[d ^ 1];
      scalar_t* sb = gathered.defined()
                         ? gathered.mutable_data_ptr<scalar_t>() + (s & 1) * B * G
                         : nullptr;
      if (projects) {
        team.each(projected_blocks, rows, [&](const Block& k) {
          if (pending) {
            recurrent.block(dhp, pending, pending_rows, k, scalar_t(1), alternate(s));
          }
          for (int64_t b = k.b0; b < k.b1; ++b) {
            scalar_t* dhb = dhp + b * P;
            if (!map.active(s, b)) {
              std::copy(dhb + k.j0, dhb + k.j1, cp + b * P + k.j0);
              std::fill(gs + b * P + k.j0, gs + b * P + k.j1, scalar_t(0));
              continue;
            }
            const int64_t row = map.time(s, b) * B + b;
            for (int64_t p = k.j0; p < k.j1; ++p) {
              const scalar_t g = projection.grad_out[row * P + p] + dhb[p];
              gs[b * P + p] = g;
              projection.grad_h[row * P + p] = g;
              cp[b * P + p] = scalar_t(0);
            }
          }
        });
        team.sync();
      }
      team.each(blocks, rows, [&](const Block& k) {
        if (projects) {
          project->block(dm, gs, rows, k, scalar_t(0), alternate(s));
        } else if (pending) {
          recurrent.block(dhp, pending, pending_rows, k, scalar_t(1), alternate(s));
        }
        for (int64_t b = k.b0; b < k.b1; ++b) {
          if (!map.active(s, b)) {
            if (!projects) {
              std::copy(dhp + b * H + k.j0, dhp + b * H + k.j1, cp + b * H + k.j0);
            }
            if (sb && b < rows) {
              copy_units<scalar_t>(nullptr, sb + b * G, G, H, k.j0, k.j1);
            }
            continue;
          }
          const int64_t row = map.time(s, b) * B + b;
          row_fn(row, k.j0, k.j1, projects ? dm + b * H : dhp + b * H,
                 projects ? nullptr : cp + b * H, dcp ? dcp + b * H : nullptr);
          if (sb) {
            copy_units<scalar_t>(gh + row * G, sb + b * G, G, H, k.j0, k.j1);
          }
        }
      });
      team.sync();
      d ^= 1;
      pending = sb ? sb : gh + map.uniform_time_of(s) * B * G;
      pending_rows = rows;
    }
    if (initial_h && pending) {
      team.each(initial_blocks, pending_rows, [&](const Block& k) {
        recurrent.block(grads[d], pending, pending_rows, k, scalar_t(1), alternate(-1));
      });
    }
  });
  if (!initial_h) {
    return at::Tensor();
  }
  if (steps & 1) {
    std::swap(dh, carry);
  }
  return dh;
}

// A layer's input, weight and bias gradients: grad_input, grad_weight_ih,
// grad_weight_hh, grad_bias_ih, grad_bias_hh.
using LayerGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The batched half of backward: once the sweep has produced the
// pre-activation gradients of every step, the weight, bias and input
// gradients are large GEMMs and reductions over all T*B rows.
// grad_ih / grad_hh: (T, B, G) gradients of the input-side and hidden-side
// pre-activations (the same tensor for an RNN).
// The states each step of a layer started from, which grad W_hh multiplies:
// `states` (T, B, K) where built (with lengths, whose padded positions must
// read zero); else undefined, and they are read in place: the output
// (T, B, K) one step earlier in the sweep's order, and hx (B, K) at the first.
struct PreviousStates {
  at::Tensor states, output, hx;
  bool reverse = false;
};

LayerGrads finish_backward(
    const at::Tensor& grad_ih, const at::Tensor& grad_hh, const at::Tensor& input,
    const PreviousStates& prev, const at::Tensor& weight_ih, bool input_requires_grad);

}  // namespace fastrnn::cpu
