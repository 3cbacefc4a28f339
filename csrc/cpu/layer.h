// Shared pieces of the CPU recurrences: argument checks, the map from
// (step, sequence) to time, and the small GEMM/parallel helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastrnn::cpu {

// Sizes of one layer in one direction. G is the number of gate rows (H for an
// RNN, 3H for a GRU).
struct LayerSizes {
  int64_t T, B, I, H, G;
};

// Checks the arguments every layer op takes and returns the layer's sizes.
// Messages for dtype mismatches follow at::mm so that modules report what
// torch.nn reports.
LayerSizes check_layer_args(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& lengths,
    int64_t gates);

// Checks the gradients handed to a backward op against the forward's sizes.
void check_grad_args(
    const LayerSizes& sizes,
    const at::Tensor& grad_output,
    const at::Tensor& grad_hy,
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
  // that step's rows form one contiguous slice of a (T, B, ...) tensor.
  bool uniform_time() const { return !(reverse_ && len_); }
  int64_t uniform_time_of(int64_t s) const { return reverse_ ? T_ - 1 - s : s; }
  // Rows [0, rows(s)) hold every sequence still active at step s; the
  // recurrent GEMM of that step skips the rest (sorted batches shrink).
  int64_t rows(int64_t s) const { return rows_[s]; }
  bool has_lengths() const { return len_ != nullptr; }

 private:
  int64_t T_;
  const int64_t* len_;
  bool reverse_;
  std::vector<int64_t> rows_;
  at::Tensor lengths_;  // keeps len_ alive
};

// x (T, B, I) times W_ih^T plus an optional bias: the input projection of
// every step as one GEMM. Returns (T, B, G).
at::Tensor project_input(const at::Tensor& input, const at::Tensor& weight_ih,
                         const std::optional<at::Tensor>& bias);

// The state each step started from, in time order: (T, B, H). Entries at
// padded positions are zero.
at::Tensor previous_states(const at::Tensor& output, const at::Tensor& hx,
                           const StepMap& map, bool reverse);

// Runs fn(begin, end) over rows [0, rows), in parallel once a row range holds
// enough elementwise work to pay for waking the other threads.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t work_per_row, const F& fn) {
  constexpr int64_t kMinWork = 16384;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, rows, grain, fn);
}

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

// Column-major C (m x n) = A' B' + beta C, A' = A^T if trans_a (A stored k x m)
// else A (m x k), likewise B'. A direct BLAS call on raw rows: at small
// sizes the dispatcher and tensor views that at::mm_out needs cost as much
// as the product itself.
template <typename scalar_t>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a,
                 int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c,
                 int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  // BLAS requires leading dimensions >= 1 even for empty matrices (H = 0).
  const int mi = m, ni = n, ki = k;
  const int la = std::max<int64_t>(1, lda), lb = std::max<int64_t>(1, ldb),
            lc = std::max<int64_t>(1, ldc);
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

// Rows [begin, end) of out = state W^T (out: (B, G), state: (B, H), W: (G, H),
// all contiguous): each thread multiplies the rows it then updates, so a step
// needs one parallel region and no threading inside small GEMMs.
template <typename scalar_t>
inline void mm_rows(scalar_t* out, const scalar_t* state, const scalar_t* weight, int64_t G,
                    int64_t H, int64_t begin, int64_t end) {
  if (end > begin) {
    // Column-major: out^T (G x rows) = W (G x H) state^T (H x rows).
    gemm<scalar_t>(true, false, G, end - begin, H, weight, H, state + begin * H, H, scalar_t(0),
                   out + begin * G, G);
  }
}

// Rows [begin, end) of carry += step W (carry: (B, H), step: (B, G), W: (G, H)).
template <typename scalar_t>
inline void addmm_rows(scalar_t* carry, const scalar_t* step, const scalar_t* weight, int64_t G,
                       int64_t H, int64_t begin, int64_t end) {
  if (end > begin) {
    // Column-major: carry^T (H x rows) += W^T (H x G) step^T (G x rows).
    gemm<scalar_t>(false, false, H, end - begin, G, weight, H, step + begin * G, G, scalar_t(1),
                   carry + begin * H, H);
  }
}

// The reverse sweep every cell shares. Steps run from last to first; a
// sequence past its end at a step held its state, so its dh passes through.
// For each active sequence b, row_fn(row, dh_b, carry_b) computes the
// cell's gradients at time-major row `row` = t * B + b: it writes the G
// hidden-side pre-activation gradients to grad_hh[row] and to carry_b the
// part of the previous step's dh that does not pass through W_hh. The rest,
// grad_hh_t W_hh, is added per thread for its own rows. grad_hh (T, B, G)
// must be zero at padded positions. Returns the gradient of the initial
// state.
template <typename scalar_t, typename RowFn>
at::Tensor sweep_backward(at::Tensor& grad_hh, const at::Tensor& weight_hh, at::Tensor dh,
                          const StepMap& map, const RowFn& row_fn) {
  const int64_t T = grad_hh.size(0), B = grad_hh.size(1), G = grad_hh.size(2);
  const int64_t H = dh.size(1);
  auto carry = at::empty_like(dh);
  // Running in reverse with lengths, a step's rows sit at different times:
  // they are gathered here for the product.
  auto step_buf = map.uniform_time() ? at::Tensor() : at::empty({B, G}, dh.options());
  scalar_t* gh = grad_hh.mutable_data_ptr<scalar_t>();
  scalar_t* sb = step_buf.defined() ? step_buf.mutable_data_ptr<scalar_t>() : nullptr;
  const scalar_t* w = weight_hh.const_data_ptr<scalar_t>();
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t rows = map.rows(s);
    if (rows == 0) {
      continue;  // every sequence is past its end: dh passes through
    }
    const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
    scalar_t* cp = carry.mutable_data_ptr<scalar_t>();
    const scalar_t* step = sb ? sb : gh + map.uniform_time_of(s) * B * G;
    parallel_rows(B, H * G, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* dhb = dhp + b * H;
        scalar_t* cb = cp + b * H;
        if (!map.active(s, b)) {
          std::copy(dhb, dhb + H, cb);
          if (sb && b < rows) {
            std::fill(sb + b * G, sb + (b + 1) * G, scalar_t(0));
          }
          continue;
        }
        const int64_t row = map.time(s, b) * B + b;
        row_fn(row, dhb, cb);
        if (sb) {
          std::copy(gh + row * G, gh + (row + 1) * G, sb + b * G);
        }
      }
      addmm_rows(cp, step, w, G, H, begin, std::min(end, rows));
    });
    std::swap(dh, carry);
  }
  return dh;
}

// One layer's gradients, in the order the backward ops return them.
using LayerGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The batched half of backward: once the sweep has produced the
// pre-activation gradients of every step, the weight, bias and input
// gradients are large GEMMs and reductions over all T*B rows.
// grad_ih / grad_hh: (T, B, G) gradients of the input-side and hidden-side
// pre-activations (the same tensor for an RNN).
LayerGrads finish_backward(
    const at::Tensor& grad_ih, const at::Tensor& grad_hh, const at::Tensor& grad_hx,
    const at::Tensor& input, const at::Tensor& prev_states, const at::Tensor& weight_ih,
    bool input_requires_grad);

}  // namespace fastrnn::cpu
