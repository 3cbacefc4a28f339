// The non-template pieces of layer.h: argument checks, the step map, the
// input projection, the previous states and the batched end of backward.
#include "layer.h"

#include <ATen/AccumulateType.h>

namespace fastrnn::cpu {

namespace {

// Raises ATen's own error for the product of a by b where their dtypes
// differ (addmm with a bias and mm without word it differently), by running
// that product on empty tensors, as functional._product_dtype_error does.
void check_same_dtype(const at::Tensor& a, const at::Tensor& b,
                      const std::optional<at::Tensor>& bias) {
  if (a.scalar_type() == b.scalar_type()) {
    return;
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto m1 = a.new_empty({0, 1}), m2 = b.new_empty({1, 0});
  if (bias.has_value() && bias->defined()) {
    at::addmm(bias->new_empty({0, 0}), m1, m2);
  } else {
    at::mm(m1, m2);
  }
  TORCH_INTERNAL_ASSERT(false, "the product of different dtypes ran");
}

void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "Expected all tensors to be on the same device, but ",
              name, " is on ", t.device(), " and input is on ", input.device());
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input, int64_t G,
                const char* name) {
  if (!bias.has_value() || !bias->defined()) {
    return;
  }
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == G, name, " must have shape [", G, "], got ",
              bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), name, " must have dtype ",
              input.scalar_type(), ", got ", bias->scalar_type());
  check_same_device(*bias, input, name);
}

}  // namespace

LayerSizes check_layer_args(
    const at::Tensor& input,
    at::TensorList hx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr,
    const std::optional<at::Tensor>& lengths,
    int64_t gates) {
  TORCH_CHECK(input.dim() == 3, "input must have 3 dimensions (T, B, input_size), got ",
              input.dim());
  TORCH_CHECK(weight_ih.dim() == 2, "weight_ih must have 2 dimensions, got ", weight_ih.dim());
  TORCH_CHECK(weight_hh.dim() == 2, "weight_hh must have 2 dimensions, got ", weight_hh.dim());
  for (const auto& h : hx) {
    TORCH_CHECK(h.dim() == 2, "hx must hold 2-dimensional states (B, size), got ", h.dim(),
                " dimensions");
  }
  const int64_t G = weight_hh.size(0), K = weight_hh.size(1);
  TORCH_CHECK(G % gates == 0, "weight_hh must have a multiple of ", gates, " rows, got ",
              weight_hh.sizes());
  const LayerSizes s{input.size(0), input.size(1), input.size(2), G / gates, G, K};
  const bool projects = weight_hr.has_value() && weight_hr->defined();
  if (projects) {
    TORCH_CHECK(weight_hr->dim() == 2 && weight_hr->size(0) == s.K && weight_hr->size(1) == s.H,
                "weight_hr must have shape [", s.K, ", ", s.H, "], got ", weight_hr->sizes());
    TORCH_CHECK(weight_hr->scalar_type() == weight_hh.scalar_type(), "weight_hr must have dtype ",
                weight_hh.scalar_type(), ", got ", weight_hr->scalar_type());
    check_same_device(*weight_hr, input, "weight_hr");
  } else {
    TORCH_CHECK(s.K == s.H, "weight_hh must have shape [", G, ", ", s.H, "], got ",
                weight_hh.sizes());
  }
  TORCH_CHECK(weight_ih.size(0) == s.G && weight_ih.size(1) == s.I,
              "weight_ih must have shape [", s.G, ", ", s.I, "], got ", weight_ih.sizes());
  check_same_dtype(input, weight_ih, bias_ih);
  check_same_dtype(hx[0], weight_hh, bias_hh);
  for (size_t i = 1; i < hx.size(); ++i) {
    // As ATen's LSTM cell words it, where the cell state meets the gates.
    TORCH_CHECK(hx[i].scalar_type() == weight_hh.scalar_type(),
                "expected m1 and m2 to have the same dtype, but got: ", hx[i].dtype(), " != ",
                weight_hh.dtype());
  }
  TORCH_CHECK(weight_ih.scalar_type() == weight_hh.scalar_type(),
              "weight_ih and weight_hh must have the same dtype, got ", weight_ih.scalar_type(),
              " and ", weight_hh.scalar_type());
  for (size_t i = 0; i < hx.size(); ++i) {
    const int64_t width = i == 0 ? s.K : s.H;
    TORCH_CHECK(hx[i].size(0) == s.B && hx[i].size(1) == width, "hx[", i,
                "] must have shape [", s.B, ", ", width, "], got ", hx[i].sizes());
    check_same_device(hx[i], input, "hx");
  }
  check_same_device(weight_ih, input, "weight_ih");
  check_same_device(weight_hh, input, "weight_hh");
  check_bias(bias_ih, input, s.G, "bias_ih");
  check_bias(bias_hh, input, s.G, "bias_hh");
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == s.B, "lengths must have shape [",
                s.B, "], got ", lengths->sizes());
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->device().is_cpu(),
                "lengths must be an int64 CPU tensor");
    if (s.B > 0) {
      const auto bounds = at::aminmax(*lengths);
      TORCH_CHECK(std::get<0>(bounds).item<int64_t>() >= 0 &&
                      std::get<1>(bounds).item<int64_t>() <= s.T,
                  "lengths must lie in [0, ", s.T, "]");
    }
  }
  return s;
}

void check_grad_args(const LayerSizes& s, const at::Tensor& grad_output, at::TensorList grad_hy,
                     at::TensorList hx, const at::Tensor& output) {
  TORCH_CHECK(output.sizes() == at::IntArrayRef({s.T, s.B, s.K}), "output must have shape [",
              s.T, ", ", s.B, ", ", s.K, "], got ", output.sizes());
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "grad_output must have shape ",
              output.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == output.scalar_type(), "gradients must have dtype ",
              output.scalar_type(), ", got ", grad_output.scalar_type());
  for (size_t i = 0; i < grad_hy.size(); ++i) {
    TORCH_CHECK(grad_hy[i].sizes() == hx[i].sizes(), "grad_hy[", i, "] must have shape ",
                hx[i].sizes(), ", got ", grad_hy[i].sizes());
    TORCH_CHECK(grad_hy[i].scalar_type() == output.scalar_type(), "gradients must have dtype ",
                output.scalar_type(), ", got ", grad_hy[i].scalar_type());
  }
}

StepMap::StepMap(int64_t T, int64_t B, const std::optional<at::Tensor>& lengths, bool reverse)
    : T_(T), B_(B), len_(nullptr), reverse_(reverse), rows_(T, B) {
  if (!lengths.has_value() || !lengths->defined()) {
    return;
  }
  lengths_ = lengths->contiguous();
  len_ = lengths_.data_ptr<int64_t>();
  // rows_[s] = 1 + the last sequence index still active at step s.
  std::fill(rows_.begin(), rows_.end(), 0);
  for (int64_t b = 0; b < B; ++b) {
    if (len_[b] > 0) {
      rows_[len_[b] - 1] = std::max(rows_[len_[b] - 1], b + 1);
    }
  }
  for (int64_t s = T - 2; s >= 0; --s) {
    rows_[s] = std::max(rows_[s], rows_[s + 1]);
  }
}

at::Tensor project_input(const at::Tensor& input, const at::Tensor& weight_ih,
                         const std::optional<at::Tensor>& bias_ih,
                         const std::optional<at::Tensor>& bias_hh, int64_t folded_columns,
                         at::Tensor out) {
  const auto x2d = contiguous_buffer(input).view({input.size(0) * input.size(1), input.size(2)});
  const auto w = weight_ih.contiguous();
  const int64_t rows = x2d.size(0), I = x2d.size(1), G = w.size(0);
  if (!out.defined()) {
    out = empty_buffer({rows, G}, input.options());
  }
  // Written into strided rows in place, where at::addmm_out would compute
  // into a contiguous temporary and copy; the biases are summed into one row
  // rather than into a tensor of their own (a small call's cost is its
  // allocations), which the product adds to every row.
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::project_input", [&] {
    const auto bias = summed_bias<scalar_t>(bias_ih, bias_hh, folded_columns, G);
    const WeightProduct<scalar_t> product(w.const_data_ptr<scalar_t>(), I, G, G, true, rows);
    product.multiply(out.mutable_data_ptr<scalar_t>(), out.stride(0),
                     x2d.const_data_ptr<scalar_t>(), I, rows, scalar_t(0),
                     bias.empty() ? nullptr : bias.data());
  });
  return out;
}

at::Tensor previous_states(const at::Tensor& output, const at::Tensor& hx, const StepMap& map,
                           bool reverse) {
  const int64_t T = output.size(0);
  if (T == 1 && !map.has_lengths()) {
    return hx.unsqueeze(0).contiguous();  // a single step started from hx
  }
  auto prev = empty_buffer(output.sizes(), output.options());
  if (T == 0) {
    return prev;
  }
  if (!reverse) {
    prev.select(0, 0).copy_(hx);
    prev.narrow(0, 1, T - 1).copy_(output.narrow(0, 0, T - 1));
    // The step after a sequence's end is padding: it must read zero, not the
    // sequence's last output (a padded 0 times an infinite state is NaN).
    for (int64_t b = 0; map.has_lengths() && b < output.size(1); ++b) {
      if (map.length(b) < T) {
        prev.select(0, map.length(b)).select(0, b).zero_();
      }
    }
    return prev;
  }
  prev.narrow(0, 0, T - 1).copy_(output.narrow(0, 1, T - 1));
  if (!map.has_lengths()) {
    prev.select(0, T - 1).copy_(hx);
    return prev;
  }
  // Each sequence starts at its own last element.
  prev.select(0, T - 1).zero_();
  const int64_t B = output.size(1);
  for (int64_t b = 0; b < B; ++b) {
    if (map.length(b) > 0) {
      prev.select(0, map.length(b) - 1).select(0, b).copy_(hx.select(0, b));
    }
  }
  return prev;
}

namespace {

// One weight's gradient for weight_grads: grad_w (G x cols) from a (n x cols,
// contiguous).
template <typename scalar_t>
struct GradFactor {
  scalar_t* grad_w;
  const scalar_t* a;
  int64_t cols;
};

// Up to this many rows a bias's gradient is summed here, row by row into G
// running sums, so that the inner loop reads contiguous values and vectorises
// (column by column it strode G values: 6% of an LSTMCell training step at
// B=32, H=256); the dispatch and allocations of at::sum cost more than its
// arithmetic there. More rows are summed by at::sum, on every thread.
constexpr int64_t kRowsSummedHere = 64;

// grad_b (G) = beta grad_b + d^T 1, for d (n x G, contiguous).
template <typename scalar_t>
void column_sums(const scalar_t* d, int64_t n, int64_t G, scalar_t beta, scalar_t* grad_b) {
  const auto scaled = [beta](scalar_t old) {
    return beta == scalar_t(0) ? scalar_t(0) : beta * old;
  };
  if (n <= kRowsSummedHere) {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    std::vector<acc_t> sum(G, acc_t(0));
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < G; ++j) sum[j] += d[r * G + j];
    }
    for (int64_t j = 0; j < G; ++j) grad_b[j] = scaled(grad_b[j]) + static_cast<scalar_t>(sum[j]);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor total = at::from_blob(const_cast<scalar_t*>(d), {n, G}, options).sum(0);
  const scalar_t* t = total.const_data_ptr<scalar_t>();
  for (int64_t j = 0; j < G; ++j) grad_b[j] = scaled(grad_b[j]) + t[j];
}

// Whether weight_grads runs on the micro-kernel, for factors of these
// columns: where the BLAS is not preferred for large products, G >= 256 and
// the columns fill whole panels (one or more a factor), 128 or more in all.
// On the AMD EPYC, against MKL: LSTM H >= 256 weight gradients 3-15%
// faster; a lone factor of 64 columns, or partly filled panels, up to 1.5x
// slower, and 128 x 128 3% slower; LSTM H = 64's two factors of 64 columns
// together 2-4% faster end to end (bench/NOTES.md).
template <typename scalar_t>
bool grads_on_kernel(int64_t G, c10::ArrayRef<int64_t> columns) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    int64_t total = 0;
    bool whole_panels = true;
    for (const int64_t cols : columns) {
      total += cols;
      whole_panels = whole_panels && cols > 0 && cols % PackedWeight::kPanelWidth == 0;
    }
    return G >= 256 && total >= 128 && whole_panels && product_kernel() != "blas" &&
           !large_products_on_blas();
  }
  return false;
}

// For each factor grad_W = beta grad_W + d^T a, and given grad_b, grad_b =
// beta grad_b + d^T 1, summed over n rows of d (n x G, contiguous). On the
// micro-kernel (grads_on_kernel) d is transposed once for all the factors,
// and its columns summed on the way.
template <typename scalar_t>
void weight_grads(const scalar_t* d, int64_t G, int64_t n, scalar_t beta,
                  std::initializer_list<GradFactor<scalar_t>> factors, scalar_t* grad_b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::vector<int64_t> columns;
    for (const auto& f : factors) columns.push_back(f.cols);
    if (grads_on_kernel<scalar_t>(G, columns)) {
      std::vector<TransposedFactor> products;
      for (const auto& f : factors) products.push_back({f.grad_w, f.cols, f.a, f.cols});
      multiply_transposed(d, G, G, n, beta, products, grad_b);
      return;
    }
  }
  for (const auto& f : factors) {
    // Column-major: grad_W^T (cols x G) = a^T (cols x n) d (n x G).
    gemm<scalar_t>(false, true, f.cols, G, n, f.a, f.cols, d, G, beta, f.grad_w, f.cols);
  }
  if (grad_b) {
    column_sums(d, n, G, beta, grad_b);
  }
}

}  // namespace

LayerGrads finish_backward(const at::Tensor& grad_ih, const at::Tensor& grad_hh,
                           const at::Tensor& input, const PreviousStates& prev,
                           const at::Tensor& weight_ih, bool input_requires_grad) {
  const int64_t B = input.size(1), rows = input.size(0) * B, I = input.size(2);
  const int64_t G = grad_ih.size(2), K = prev.hx.size(-1);
  const bool shared = grad_hh.is_same(grad_ih);
  const auto x = contiguous_buffer(input).view({rows, I});
  const auto states = prev.states.defined() ? contiguous_buffer(prev.states) : at::Tensor();
  const auto output = states.defined() ? at::Tensor() : contiguous_buffer(prev.output);
  const auto hx = states.defined() ? at::Tensor() : prev.hx.contiguous();
  const auto options = input.options();
  auto grad_w_ih = empty_buffer({G, I}, options), grad_w_hh = empty_buffer({G, K}, options);
  auto grad_b_ih = at::empty({G}, options), grad_b_hh = at::empty({G}, options);
  auto grad_input = empty_buffer(input_requires_grad ? input.sizes() : at::IntArrayRef{0}, options);
  // Direct BLAS calls (or the micro-kernel): at a single step's sizes the
  // dispatch and allocations of at::mm cost more than its arithmetic.
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::finish_backward", [&] {
    const scalar_t* d_ih = grad_ih.const_data_ptr<scalar_t>();
    const scalar_t* d_hh = grad_hh.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dw_ih = grad_w_ih.mutable_data_ptr<scalar_t>();
    scalar_t* dw_hh = grad_w_hh.mutable_data_ptr<scalar_t>();
    scalar_t* b_ih = grad_b_ih.mutable_data_ptr<scalar_t>();
    scalar_t* b_hh = grad_b_hh.mutable_data_ptr<scalar_t>();
    // Where d_ih is d_hh (shared) and the micro-kernel takes both weights,
    // W_ih's gradient and the bias's come from the same passes over d as
    // W_hh's; else from one pass of their own over all the rows.
    const bool one_pass = shared && grads_on_kernel<scalar_t>(G, {I, K});
    // The gradients of n rows of d_hh from r0 on, whose steps started from
    // `started` (n x K).
    const auto hidden_side = [&](int64_t r0, int64_t n, const scalar_t* started, scalar_t beta) {
      if (one_pass) {
        weight_grads<scalar_t>(d_hh + r0 * G, G, n, beta,
                               {{dw_ih, xp + r0 * I, I}, {dw_hh, started, K}}, b_ih);
      } else {
        weight_grads<scalar_t>(d_hh + r0 * G, G, n, beta, {{dw_hh, started, K}},
                               shared ? nullptr : b_hh);
      }
    };
    if (!one_pass) {
      weight_grads<scalar_t>(d_ih, G, rows, 0, {{dw_ih, xp, I}}, b_ih);
    }
    if (states.defined()) {
      hidden_side(0, rows, states.const_data_ptr<scalar_t>(), 0);
    } else {
      // Every step but the first started from the output one step before
      // (in the sweep's order), the first from hx: two products, and no
      // (T, B, K) copy of the output shifted by a step.
      const scalar_t* out = output.const_data_ptr<scalar_t>();
      const int64_t later = rows - B;  // rows past the first step
      hidden_side(prev.reverse ? 0 : B, later, prev.reverse ? out + B * K : out, 0);
      hidden_side(prev.reverse ? later : 0, B, hx.const_data_ptr<scalar_t>(), 1);
    }
    if (shared) {
      std::copy(b_ih, b_ih + G, b_hh);
    }
    if (input_requires_grad) {  // grad_ih W_ih
      const auto w = weight_ih.contiguous();
      const WeightProduct<scalar_t> product(w.const_data_ptr<scalar_t>(), G, I, I, false, rows);
      product.multiply(grad_input.mutable_data_ptr<scalar_t>(), I, d_ih, G, rows, scalar_t(0));
    }
  });
  return {grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace fastrnn::cpu
