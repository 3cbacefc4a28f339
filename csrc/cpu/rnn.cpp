// tanh / ReLU RNN layer on the CPU:
//   h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
// Forward hoists the input projection into one GEMM and then runs the time
// loop (recurrent GEMM + fused pointwise update). Backward sweeps the steps
// in reverse for the pre-activation gradients and finishes with large GEMMs.
#include "math.h"
#include "ops.h"

#include <type_traits>

namespace fastrnn::cpu {
namespace {

template <typename scalar_t, bool Relu>
inline scalar_t activation(scalar_t v) {
  if constexpr (Relu) {
    return v < scalar_t(0) ? scalar_t(0) : v;  // NaN passes through, as in torch.relu
  } else {
    return cpu::tanh(v);
  }
}

// The activation's derivative, written through its output h = act(v).
template <typename scalar_t, bool Relu>
inline scalar_t activation_grad(scalar_t h) {
  if constexpr (Relu) {
    // As torch's threshold_backward: the gradient passes unless h <= 0, so
    // it also passes where h is NaN.
    return h <= scalar_t(0) ? scalar_t(0) : scalar_t(1);
  } else {
    return scalar_t(1) - h * h;
  }
}

// Units [0, n) of one sequence's update at one step: out holds the input
// projection p and becomes out = next = act(p + q).
template <typename scalar_t, bool Relu>
FASTRNN_INLINE void forward_row_body(const scalar_t* __restrict q, scalar_t* __restrict out,
                                     scalar_t* __restrict next, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = activation<scalar_t, Relu>(out[j] + q[j]);
    out[j] = v;
    next[j] = v;
  }
}

FASTRNN_MULTIVERSION void forward_row_f32(const float* q, float* out, float* next, int64_t n,
                                          bool relu) {
  if (relu) {
    forward_row_body<float, true>(q, out, next, n);
  } else {
    forward_row_body<float, false>(q, out, next, n);
  }
}

template <typename scalar_t, bool Relu>
void forward_row(const scalar_t* q, scalar_t* out, scalar_t* next, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    forward_row_f32(q, out, next, n, Relu);
  } else {
    forward_row_body<scalar_t, Relu>(q, out, next, n);
  }
}

// Runs the time loop over output, which holds the input projection and is
// overwritten step by step with the states; returns the final state.
template <typename scalar_t, bool Relu>
at::Tensor forward_steps(const at::Tensor& weight_hh, at::Tensor& output, const at::Tensor& hx,
                         const StepMap& map) {
  const int64_t T = output.size(0), H = hx.size(1);
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  return sweep_forward<scalar_t>(
      weight_hh, hx, map, T,
      [&](int64_t row, int64_t j0, int64_t j1, const scalar_t* q, const scalar_t*, scalar_t* next) {
        forward_row<scalar_t, Relu>(q + j0, out + row * H + j0, next + j0, j1 - j0);
      });
}

// Fills grad_pre (T, B, H) with the pre-activation gradients and returns the
// gradient reaching the initial state.
template <typename scalar_t, bool Relu>
at::Tensor backward_sweep(const at::Tensor& grad_output, const at::Tensor& output,
                          const at::Tensor& weight_hh, at::Tensor& grad_pre, at::Tensor dh,
                          const StepMap& map) {
  const int64_t H = output.size(2);
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* out = output.const_data_ptr<scalar_t>();
  scalar_t* dp = grad_pre.mutable_data_ptr<scalar_t>();
  return sweep_backward<scalar_t>(
      grad_pre, weight_hh, std::move(dh), map,
      [&](int64_t row, int64_t j0, int64_t j1, const scalar_t* dhb, scalar_t* cb) {
        const scalar_t* gb = go + row * H;
        const scalar_t* ob = out + row * H;
        scalar_t* db = dp + row * H;
        for (int64_t j = j0; j < j1; ++j) {
          db[j] = (gb[j] + dhb[j]) * activation_grad<scalar_t, Relu>(ob[j]);
          cb[j] = scalar_t(0);  // all of dh_{t-1} comes through W_hh
        }
      });
}

std::optional<at::Tensor> combined_bias(const std::optional<at::Tensor>& bias_ih,
                                        const std::optional<at::Tensor>& bias_hh) {
  const bool has_ih = bias_ih.has_value() && bias_ih->defined();
  const bool has_hh = bias_hh.has_value() && bias_hh->defined();
  if (has_ih && has_hh) {
    return *bias_ih + *bias_hh;
  }
  if (has_ih) {
    return bias_ih;
  }
  return has_hh ? bias_hh : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rnn_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reverse, bool relu) {
  const auto s = check_layer_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, 1);
  const auto w_hh = weight_hh.contiguous();
  // The projection is computed into the output, which each step then
  // overwrites with its state: no separate (T, B, H) buffer.
  auto output = project_input(input.contiguous(), weight_ih, combined_bias(bias_ih, bias_hh))
                    .view({s.T, s.B, s.H});
  const StepMap map(s.T, s.B, lengths, reverse);
  at::Tensor state;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::rnn_forward", [&] {
    state = relu ? forward_steps<scalar_t, true>(w_hh, output, hx, map)
                 : forward_steps<scalar_t, false>(w_hh, output, hx, map);
  });
  // Positions past a sequence's end still hold their projection: they are zero.
  for (int64_t b = 0; map.has_lengths() && b < s.B; ++b) {
    output.narrow(0, map.length(b), s.T - map.length(b)).select(1, b).zero_();
  }
  return {output, state};
}

LayerGrads rnn_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                        const at::Tensor& input, const at::Tensor& hx,
                        const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                        const at::Tensor& output, const std::optional<at::Tensor>& lengths,
                        bool reverse, bool relu, bool input_requires_grad) {
  const auto s = check_layer_args(input, hx, weight_ih, weight_hh, std::nullopt, std::nullopt,
                                  lengths, 1);
  check_grad_args(s, grad_output, grad_hy, output);
  const auto out = output.contiguous();
  const auto w_hh = weight_hh.contiguous();
  const StepMap map(s.T, s.B, lengths, reverse);
  auto grad_pre = map.has_lengths() ? at::zeros({s.T, s.B, s.H}, input.options())
                                    : at::empty({s.T, s.B, s.H}, input.options());
  at::Tensor grad_hx;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::rnn_backward", [&] {
    const auto go = grad_output.contiguous();
    auto dh = grad_hy.clone(at::MemoryFormat::Contiguous);
    grad_hx = relu ? backward_sweep<scalar_t, true>(go, out, w_hh, grad_pre, dh, map)
                   : backward_sweep<scalar_t, false>(go, out, w_hh, grad_pre, dh, map);
  });
  const auto prev = previous_states(out, hx, map, reverse);
  return finish_backward(grad_pre, grad_pre, grad_hx, input, prev, weight_ih,
                         input_requires_grad);
}

}  // namespace fastrnn::cpu
