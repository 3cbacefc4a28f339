// GRU layer on the CPU, gate rows stacked r | z | n:
//   r = σ(W_ir x + b_ir + W_hr h + b_hr)
//   z = σ(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
//   h' = (1 − z) ⊙ n + z ⊙ h
// Same shape of work as rnn.cpp, with three gates per step.
#include "math.h"
#include "ops.h"

#include <type_traits>

namespace fastrnn::cpu {
namespace {

// Per (step, sequence) the workspace row holds [r | z | n | W_hn h + b_hn].
constexpr int64_t kSaved = 4;

// Units [0, n) of one sequence's update at one step; gate k of unit j sits
// at k * H + j. Reads the input-side pre-activations, q = W_hh h and the
// state h; writes the output and the new state. Inference (Save false)
// reads the pre-activations from p. Training (Save true) finds them in the
// workspace row's first 3H entries, where the projection was written, and
// overwrites them in place with the gates r | z | n, W_hn h + b_hn going to
// hn_saved (the row's last H): one pointer reads and writes the gates, so
// no two restrict pointers alias.
template <typename scalar_t, bool Save>
FASTRNN_INLINE void forward_row_body(const scalar_t* __restrict p, const scalar_t* __restrict q,
                                     const scalar_t* __restrict bias_hn,
                                     const scalar_t* __restrict h, scalar_t* __restrict gates,
                                     scalar_t* __restrict hn_saved, scalar_t* __restrict out,
                                     scalar_t* __restrict next, int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* pre = Save ? gates : p;  // based on one of them: no alias between the two
    const scalar_t r = sigmoid(pre[j] + q[j]);
    const scalar_t z = sigmoid(pre[H + j] + q[H + j]);
    const scalar_t hn = q[2 * H + j] + bias_hn[j];
    const scalar_t c = cpu::tanh(pre[2 * H + j] + r * hn);
    const scalar_t v = (h[j] - c) * z + c;
    if constexpr (Save) {
      gates[j] = r;
      gates[H + j] = z;
      gates[2 * H + j] = c;
      hn_saved[j] = hn;
    }
    out[j] = v;
    next[j] = v;
  }
}

FASTRNN_MULTIVERSION void forward_row_f32(const float* p, const float* q, const float* bias_hn,
                                          const float* h, float* saved, float* out, float* next,
                                          int64_t n, int64_t H) {
  if (saved) {
    forward_row_body<float, true>(p, q, bias_hn, h, saved, saved + 3 * H, out, next, n, H);
  } else {
    forward_row_body<float, false>(p, q, bias_hn, h, nullptr, nullptr, out, next, n, H);
  }
}

// saved null: inference, the pre-activations come from p and no gates are kept;
// else saved is the step's workspace row (see forward_row_body).
template <typename scalar_t>
void forward_row(const scalar_t* p, const scalar_t* q, const scalar_t* bias_hn, const scalar_t* h,
                 scalar_t* saved, scalar_t* out, scalar_t* next, int64_t n, int64_t H) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    forward_row_f32(p, q, bias_hn, h, saved, out, next, n, H);
  } else if (saved) {
    forward_row_body<scalar_t, true>(p, q, bias_hn, h, saved, saved + 3 * H, out, next, n, H);
  } else {
    forward_row_body<scalar_t, false>(p, q, bias_hn, h, nullptr, nullptr, out, next, n, H);
  }
}

// Runs the time loop; returns the final state. With a workspace, the input
// projection sits in each of its rows (first 3H) and is overwritten by the
// step's gates; without one, it comes from proj.
template <typename scalar_t>
at::Tensor forward_steps(const at::Tensor& proj, const at::Tensor& weight_hh,
                         const scalar_t* bias_hn, at::Tensor& output, const at::Tensor& hx,
                         at::Tensor& workspace, const StepMap& map) {
  const int64_t T = output.size(0), H = hx.size(1);
  const scalar_t* p = proj.defined() ? proj.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  scalar_t* ws = workspace.numel() ? workspace.mutable_data_ptr<scalar_t>() : nullptr;
  return sweep_forward<scalar_t>(
      weight_hh, hx, map, T,
      [&](int64_t row, int64_t j0, int64_t j1, const scalar_t* q, const scalar_t* h,
          scalar_t* next) {
        forward_row(p ? p + row * 3 * H + j0 : nullptr, q + j0, bias_hn + j0, h + j0,
                    ws ? ws + row * kSaved * H + j0 : nullptr, out + row * H + j0, next + j0,
                    j1 - j0, H);
      });
}

// Units [0, n) of one sequence's gradients at one step: from the gradient g
// reaching its output (upstream plus from the next step), the input-side
// and hidden-side gate pre-activation gradients (gate k of unit j at
// k * H + j) and the direct part g z of dh.
template <typename scalar_t>
FASTRNN_INLINE void backward_row_body(const scalar_t* __restrict grad_out,
                                      const scalar_t* __restrict h_prev,
                                      const scalar_t* __restrict saved,
                                      const scalar_t* __restrict dh, scalar_t* __restrict grad_ih,
                                      scalar_t* __restrict grad_hh, scalar_t* __restrict carry,
                                      int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t r = saved[j], z = saved[H + j], c = saved[2 * H + j], hn = saved[3 * H + j];
    const scalar_t g = grad_out[j] + dh[j];
    const scalar_t dn = g * (scalar_t(1) - z) * (scalar_t(1) - c * c);
    const scalar_t dz = g * (h_prev[j] - c) * z * (scalar_t(1) - z);
    const scalar_t dr = dn * hn * r * (scalar_t(1) - r);
    grad_ih[j] = dr;
    grad_ih[H + j] = dz;
    grad_ih[2 * H + j] = dn;
    grad_hh[j] = dr;
    grad_hh[H + j] = dz;
    grad_hh[2 * H + j] = dn * r;
    carry[j] = g * z;
  }
}

FASTRNN_MULTIVERSION void backward_row_f32(const float* grad_out, const float* h_prev,
                                           const float* saved, const float* dh, float* grad_ih,
                                           float* grad_hh, float* carry, int64_t n, int64_t H) {
  backward_row_body(grad_out, h_prev, saved, dh, grad_ih, grad_hh, carry, n, H);
}

template <typename scalar_t>
void backward_row(const scalar_t* grad_out, const scalar_t* h_prev, const scalar_t* saved,
                  const scalar_t* dh, scalar_t* grad_ih, scalar_t* grad_hh, scalar_t* carry,
                  int64_t n, int64_t H) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    backward_row_f32(grad_out, h_prev, saved, dh, grad_ih, grad_hh, carry, n, H);
  } else {
    backward_row_body(grad_out, h_prev, saved, dh, grad_ih, grad_hh, carry, n, H);
  }
}

// Fills grad_ih / grad_hh (T, B, 3H), the gradients of the input-side and
// hidden-side gate pre-activations (they differ in the n rows, where the
// hidden side is scaled by r), and returns the gradient of the initial state.
template <typename scalar_t>
at::Tensor backward_sweep(const at::Tensor& grad_output, const at::Tensor& prev_states,
                          const at::Tensor& workspace, const at::Tensor& weight_hh,
                          at::Tensor& grad_ih, at::Tensor& grad_hh, at::Tensor dh,
                          const StepMap& map) {
  const int64_t H = prev_states.size(2);
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* hp = prev_states.const_data_ptr<scalar_t>();
  const scalar_t* ws = workspace.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_ih.mutable_data_ptr<scalar_t>();
  scalar_t* gh = grad_hh.mutable_data_ptr<scalar_t>();
  return sweep_backward<scalar_t>(
      grad_hh, weight_hh, std::move(dh), map,
      [&](int64_t row, int64_t j0, int64_t j1, const scalar_t* dhb, scalar_t* cb) {
        backward_row(go + row * H + j0, hp + row * H + j0, ws + row * kSaved * H + j0, dhb + j0,
                     gi + row * 3 * H + j0, gh + row * 3 * H + j0, cb + j0, j1 - j0, H);
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reverse, bool save_workspace) {
  const auto s = check_layer_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, 3);
  const auto w_hh = weight_hh.contiguous();
  // b_hr and b_hz add straight to the pre-activations, so they join the input
  // projection; b_hn sits inside r ⊙ (W_hn h + b_hn) and stays in the loop.
  std::optional<at::Tensor> bias = bias_ih;
  auto bias_hn = at::zeros({s.H}, input.options());
  if (bias_hh.has_value() && bias_hh->defined()) {
    auto folded = bias_hh->clone();
    folded.narrow(0, 2 * s.H, s.H).zero_();
    bias = bias.has_value() && bias->defined() ? *bias + folded : folded;
    bias_hn = bias_hh->narrow(0, 2 * s.H, s.H).contiguous();
  }
  auto workspace = save_workspace ? at::empty({s.T, s.B, kSaved * s.H}, input.options())
                                  : at::empty({0}, input.options());
  if (save_workspace && lengths.has_value() && lengths->defined()) {
    // No step writes the W_hn h + b_hn slot of rows past a sequence's end
    // (the gate slots hold the projection there): zero it, so that the
    // workspace is a function of the inputs, not of uninitialised memory.
    workspace.narrow(2, 3 * s.H, s.H).zero_();
  }
  // Training writes the projection straight into the workspace rows, where
  // each step overwrites it with its gates: no separate (T, B, 3H) buffer.
  at::Tensor proj;
  if (save_workspace) {
    project_input(input.contiguous(), weight_ih, bias,
                  workspace.view({s.T * s.B, kSaved * s.H}).narrow(1, 0, 3 * s.H));
  } else {
    proj = project_input(input.contiguous(), weight_ih, bias);
  }
  const StepMap map(s.T, s.B, lengths, reverse);
  auto output = map.has_lengths() ? at::zeros({s.T, s.B, s.H}, input.options())
                                  : at::empty({s.T, s.B, s.H}, input.options());
  at::Tensor state;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::gru_forward", [&] {
    state = forward_steps<scalar_t>(proj, w_hh, bias_hn.const_data_ptr<scalar_t>(), output, hx,
                                    workspace, map);
  });
  return {output, state, workspace};
}

LayerGrads gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                        const at::Tensor& input, const at::Tensor& hx,
                        const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                        const at::Tensor& output, const at::Tensor& workspace,
                        const std::optional<at::Tensor>& lengths, bool reverse,
                        bool input_requires_grad) {
  const auto s = check_layer_args(input, hx, weight_ih, weight_hh, std::nullopt, std::nullopt,
                                  lengths, 3);
  check_grad_args(s, grad_output, grad_hy, output);
  TORCH_CHECK(workspace.sizes() == at::IntArrayRef({s.T, s.B, kSaved * s.H}),
              "workspace must have shape [", s.T, ", ", s.B, ", ", kSaved * s.H, "], got ",
              workspace.sizes());
  TORCH_CHECK(workspace.scalar_type() == input.scalar_type(), "workspace must have dtype ",
              input.scalar_type(), ", got ", workspace.scalar_type());
  const StepMap map(s.T, s.B, lengths, reverse);
  const auto prev = previous_states(output.contiguous(), hx, map, reverse);
  const auto ws = workspace.contiguous();
  const auto w_hh = weight_hh.contiguous();
  auto make_grad = [&] {
    return map.has_lengths() ? at::zeros({s.T, s.B, 3 * s.H}, input.options())
                             : at::empty({s.T, s.B, 3 * s.H}, input.options());
  };
  auto grad_ih = make_grad();
  auto grad_hh = make_grad();
  at::Tensor grad_hx;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::gru_backward", [&] {
    grad_hx = backward_sweep<scalar_t>(grad_output.contiguous(), prev, ws, w_hh, grad_ih, grad_hh,
                                       grad_hy.clone(at::MemoryFormat::Contiguous), map);
  });
  return finish_backward(grad_ih, grad_hh, grad_hx, input, prev, weight_ih, input_requires_grad);
}

}  // namespace fastrnn::cpu
