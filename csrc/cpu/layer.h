// Shared pieces of the CPU recurrences: argument checks, the map from
// (step, sequence) to time, and the small GEMM/parallel helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
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

// Rows [begin, end) of out = a b, or of out += a b: each thread multiplies
// the rows it then updates, so a step needs one parallel region and no
// threading inside small GEMMs. Worker threads start with grad mode on, and
// these products must not be recorded, hence the guards.
inline void mm_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t begin,
                    int64_t end) {
  if (end > begin) {
    c10::AutoGradMode no_grad(false);
    auto out_rows = out.narrow(0, begin, end - begin);
    at::mm_out(out_rows, a.narrow(0, begin, end - begin), b);
  }
}

inline void addmm_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t begin,
                       int64_t end) {
  if (end > begin) {
    c10::AutoGradMode no_grad(false);
    out.narrow(0, begin, end - begin).addmm_(a.narrow(0, begin, end - begin), b);
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
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t rows = map.rows(s);
    if (rows == 0) {
      continue;  // every sequence is past its end: dh passes through
    }
    const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
    scalar_t* cp = carry.mutable_data_ptr<scalar_t>();
    const auto step = sb ? step_buf : grad_hh.select(0, map.uniform_time_of(s));
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
      addmm_rows(carry, step, weight_hh, begin, std::min(end, rows));
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
