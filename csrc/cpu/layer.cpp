// One layer of any cell (cells.h) on the CPU. Forward hoists the input
// projection of every step into one GEMM and then runs the time loop
// (recurrent GEMM + the cell's fused pointwise update). Backward sweeps the
// steps in reverse for the pre-activation gradients and finishes with large
// GEMMs. The op entry points pick the cell by name, then the dtype.
#include "cells.h"
#include "layer.h"
#include "ops.h"

namespace fastrnn::cpu {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor>;
using BackwardOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor>;

bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The rest of b_hh, which the row function adds inside the loop (zero
// without b_hh); undefined when every gate folds.
template <typename Cell>
at::Tensor unfolded_bias(const std::optional<at::Tensor>& bias_hh, const at::Tensor& input,
                         int64_t H) {
  constexpr int64_t kUnfolded = Cell::kGates - Cell::kFoldedGates;
  if constexpr (kUnfolded == 0) {
    return {};
  } else if (present(bias_hh)) {
    return bias_hh->narrow(0, Cell::kFoldedGates * H, kUnfolded * H).contiguous();
  } else {
    return at::zeros({kUnfolded * H}, input.options());
  }
}

// Where forward writes the input projection, so that no extra (T, B, G)
// buffer is needed where it can be helped: in training into the workspace
// rows, which each step then overwrites with what it saves; else, for a
// one-gate cell, into the output, which each step overwrites with its state.
enum class Projection { kWorkspace, kOutput, kBuffer };

template <typename Cell>
Projection projection_target(bool save_workspace) {
  if (save_workspace && Cell::kSaved > 0) {
    return Projection::kWorkspace;
  }
  return Cell::kGates == 1 ? Projection::kOutput : Projection::kBuffer;
}

template <typename Cell, typename scalar_t>
ForwardOutputs forward_layer(const LayerSizes& s, const at::Tensor& input, at::TensorList hx,
                             const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                             const std::optional<at::Tensor>& bias_ih,
                             const std::optional<at::Tensor>& bias_hh,
                             const std::optional<at::Tensor>& weight_hr,
                             const std::optional<at::Tensor>& lengths, bool reverse,
                             bool save_workspace) {
  static_assert(Cell::kStates == 1 || Cell::kStates == 2, "the sweeps carry one or two states");
  static_assert(Cell::kSaved == 0 || Cell::kSaved >= Cell::kGates,
                "the projection is written into the workspace rows");
  constexpr int64_t kSaved = Cell::kSaved;
  const int64_t T = s.T, B = s.B, H = s.H, G = s.G, K = s.K;
  const auto w_hh = weight_hh.contiguous();
  const auto w_hr = present(weight_hr) ? weight_hr->contiguous() : at::Tensor();
  // The input projection adds b_ih and the folded gates' part of b_hh;
  // where every gate folds, the recurrent products start their sums from
  // that bias instead: the micro-kernel starts from it at no cost, where a
  // projection on the BLAS would first write it to all T * B rows, a pass
  // over the whole (T, B, G) buffer (bench/NOTES.md).
  const int64_t folded = Cell::kFoldedGates * H;
  constexpr bool kBiasInSweep = Cell::kFoldedGates == Cell::kGates;
  const std::optional<at::Tensor> no_bias;
  const auto& proj_bias_ih = kBiasInSweep ? no_bias : bias_ih;
  const auto& proj_bias_hh = kBiasInSweep ? no_bias : bias_hh;
  const auto sweep_bias =
      kBiasInSweep ? summed_bias<scalar_t>(bias_ih, bias_hh, folded, G) : std::vector<scalar_t>{};
  const at::Tensor bias_rest = unfolded_bias<Cell>(bias_hh, input, H);
  const auto target = projection_target<Cell>(save_workspace);

  auto workspace = save_workspace ? empty_buffer({T, B, kSaved * H}, input.options())
                                  : at::empty({0}, input.options());
  if constexpr (kSaved > Cell::kGates) {
    if (target == Projection::kWorkspace && present(lengths)) {
      // No step writes the slots past the gates in rows past a sequence's end
      // (the gate slots hold the projection there): zero them, so that the
      // workspace is a function of the inputs, not of uninitialised memory.
      workspace.narrow(2, Cell::kGates * H, (kSaved - Cell::kGates) * H).zero_();
    }
  }
  const auto x = contiguous_buffer(input);
  at::Tensor proj, output, proj_rows;  // proj_rows: the projection's (T * B, G) rows
  switch (target) {
    case Projection::kWorkspace:
      proj_rows = workspace.view({T * B, kSaved * H}).narrow(1, 0, G);
      break;
    case Projection::kOutput:
      output = empty_buffer({T, B, H}, input.options());
      proj_rows = output.view({T * B, H});
      break;
    case Projection::kBuffer:
      proj = empty_buffer({T * B, G}, input.options());
      proj_rows = proj;
      break;
  }
  // A single step's projection on the micro-kernel runs inside the sweep,
  // each thread multiplying the x rows of its own block: one product either
  // way, but one parallel region fewer, and each thread writes the
  // projection where its own rows read it (bench/NOTES.md). On the BLAS
  // (a few rows) it would take a call per gate and thread, and longer
  // inputs take one large GEMM over all steps, far faster than a small
  // product per step.
  const auto w_ih = weight_ih.contiguous();
  const int64_t I = x.size(2);
  std::optional<WeightProduct<scalar_t>> step_product;
  if (T == 1) {
    step_product.emplace(w_ih.const_data_ptr<scalar_t>(), I, G, H, true, B, B);
  }
  StepInput<scalar_t> step_input;
  std::vector<scalar_t> step_bias;
  const bool project_in_sweep = step_product && step_product->on_kernel();
  if (project_in_sweep) {
    step_bias = summed_bias<scalar_t>(proj_bias_ih, proj_bias_hh, folded, G);
    step_input = {&*step_product, x.const_data_ptr<scalar_t>(), I,
                  step_bias.empty() ? nullptr : step_bias.data(),
                  proj_rows.mutable_data_ptr<scalar_t>(), proj_rows.stride(0)};
  } else {
    project_input(x, w_ih, proj_bias_ih, proj_bias_hh, folded, proj_rows);
  }
  const StepMap map(T, B, lengths, reverse);
  if (!output.defined()) {
    output = map.has_lengths() ? zeros_buffer({T, B, K}, input.options())
                               : empty_buffer({T, B, K}, input.options());
  }

  const scalar_t* p = proj.defined() ? proj.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = bias_rest.defined() ? bias_rest.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  scalar_t* ws = target == Projection::kWorkspace && workspace.numel()
                     ? workspace.mutable_data_ptr<scalar_t>()
                     : nullptr;
  OutputProjection<scalar_t> projection;
  if (w_hr.defined()) {
    projection = {w_hr.const_data_ptr<scalar_t>(), K};
  }
  const bool projects = projection.weight != nullptr;
  auto states = sweep_forward<scalar_t>(
      w_hh, sweep_bias.empty() ? nullptr : sweep_bias.data(), hx[0],
      Cell::kStates == 2 ? hx[1] : at::Tensor(), projection, map, T, H,
      [&](int64_t row, int64_t j0, int64_t j1, const scalar_t* q, const scalar_t* h,
          scalar_t* next, scalar_t* c) {
        Cell::template forward<scalar_t>(ForwardRow<scalar_t>{
            p ? p + row * G + j0 : nullptr, q + j0, b ? b + j0 : nullptr,
            projects ? nullptr : h + j0, ws ? ws + row * kSaved * H + j0 : nullptr,
            projects ? nullptr : out + row * K + j0, next + j0, j1 - j0, H,
            c ? c + j0 : nullptr});
      },
      [&](int64_t row, int64_t p0, int64_t p1, const scalar_t* h) {
        std::copy(h + p0, h + p1, out + row * K + p0);
      },
      project_in_sweep ? &step_input : nullptr);
  if (target == Projection::kOutput) {
    // Positions past a sequence's end still hold their projection: they are zero.
    for (int64_t i = 0; map.has_lengths() && i < B; ++i) {
      output.narrow(0, map.length(i), T - map.length(i)).select(1, i).zero_();
    }
  }
  return {output, states, workspace};
}

template <typename Cell, typename scalar_t>
BackwardOutputs backward_layer(const LayerSizes& s, const at::Tensor& grad_output,
                               at::TensorList grad_hy, const at::Tensor& input,
                               at::TensorList hx, const at::Tensor& weight_ih,
                               const at::Tensor& weight_hh,
                               const std::optional<at::Tensor>& weight_hr,
                               const at::Tensor& output, const at::Tensor& workspace,
                               const std::optional<at::Tensor>& lengths, bool reverse,
                               bool input_requires_grad, bool hx_requires_grad) {
  constexpr int64_t kSaved = Cell::kSaved;
  // Every gate's hidden-side product adds straight to its pre-activation:
  // both sides have the same gradient, one tensor.
  constexpr bool kSharedGrads = Cell::kFoldedGates == Cell::kGates;
  const int64_t T = s.T, B = s.B, H = s.H, G = s.G, K = s.K;
  const StepMap map(T, B, lengths, reverse);
  const auto out = contiguous_buffer(output);
  const auto h0 = hx[0].contiguous();
  // The states each step started from, for grad W_hh: built only where
  // they cannot be read in place (finish_backward), with lengths or at one
  // step (where they are hx itself).
  PreviousStates prev{at::Tensor(), out, h0, reverse};
  if (map.has_lengths() || T <= 1) {
    prev.states = previous_states(out, h0, map, reverse);
  }
  const auto ws = contiguous_buffer(workspace);
  const auto w_hh = weight_hh.contiguous();
  const auto w_hr = present(weight_hr) ? weight_hr->contiguous() : at::Tensor();
  const auto go = contiguous_buffer(grad_output);
  // The sweep leaves padded positions alone: they must read zero.
  auto make = [&](int64_t width) {
    return map.has_lengths() ? zeros_buffer({T, B, width}, input.options())
                             : empty_buffer({T, B, width}, input.options());
  };
  at::Tensor grad_hh = make(G);
  at::Tensor grad_ih = kSharedGrads ? grad_hh : make(G);
  // A second state's value after each step is the last H of its workspace row.
  at::Tensor c0, dc;
  if constexpr (Cell::kStates == 2) {
    c0 = hx[1].contiguous();
    dc = contiguous_copy(grad_hy[1]);
  }
  // With a projection: the gradient reaching h, and m, at every step.
  at::Tensor grad_h, m;
  GradProjection<scalar_t> projection;
  if (w_hr.defined()) {
    grad_h = make(K);
    m = make(H);
    projection = {w_hr.const_data_ptr<scalar_t>(), K, go.const_data_ptr<scalar_t>(),
                  grad_h.mutable_data_ptr<scalar_t>()};
  }
  const bool projects = projection.weight != nullptr;

  const scalar_t* g = go.const_data_ptr<scalar_t>();
  const scalar_t* o = out.const_data_ptr<scalar_t>();
  const scalar_t* h0p = h0.const_data_ptr<scalar_t>();
  const scalar_t* sv = kSaved > 0 ? ws.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* c0p = c0.defined() ? c0.const_data_ptr<scalar_t>() : nullptr;
  // The states a row's step started from, read in place: the step before's
  // output (and second state, from its workspace row), or the initial ones.
  auto h_before = [&](int64_t row) {
    const int64_t before = map.previous_row(row);
    return before < 0 ? h0p + (row % B) * K : o + before * K;
  };
  auto c_before = [&](int64_t row) {
    const int64_t before = map.previous_row(row);
    return before < 0 ? c0p + (row % B) * H : sv + before * kSaved * H + (kSaved - 1) * H;
  };
  scalar_t* mp = m.defined() ? m.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gi = grad_ih.mutable_data_ptr<scalar_t>();
  scalar_t* gh = grad_hh.mutable_data_ptr<scalar_t>();
  auto grad_h0 = sweep_backward<scalar_t>(
      grad_hh, w_hh, contiguous_copy(grad_hy[0]), dc, projection, map, H,
      hx_requires_grad,
      [&](int64_t row, int64_t j0, int64_t j1, const scalar_t* dh, scalar_t* carry,
          scalar_t* dcb) {
        Cell::template backward<scalar_t>(BackwardRow<scalar_t>{
            projects ? nullptr : g + row * K + j0, dh + j0,
            projects ? nullptr : o + row * K + j0, projects ? nullptr : h_before(row) + j0,
            sv ? sv + row * kSaved * H + j0 : nullptr, gi + row * G + j0, gh + row * G + j0,
            carry ? carry + j0 : nullptr, j1 - j0, H, c0p ? c_before(row) + j0 : nullptr,
            dcb ? dcb + j0 : nullptr, mp ? mp + row * H + j0 : nullptr});
      });
  auto [grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
      finish_backward(grad_ih, grad_hh, input, prev, weight_ih, input_requires_grad);
  // grad W_hr = sum over steps of (gradient reaching h)^T m: one GEMM.
  auto grad_w_hr = projects ? at::mm(grad_h.view({T * B, K}).t(), m.view({T * B, H}))
                            : at::empty({0}, input.options());
  std::vector<at::Tensor> grad_states{grad_h0};
  if (dc.defined()) {
    grad_states.push_back(dc);
  }
  if (!hx_requires_grad) {
    for (auto& grad : grad_states) grad = at::empty({0}, input.options());
  }
  return {grad_input, grad_states, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

// Calls f with the trait of the cell named `cell` (a default-constructed
// instance, for its type); unknown() for any other name.
template <typename F, typename Unknown>
auto visit_cell(c10::string_view cell, const F& f, const Unknown& unknown) {
  if (cell == c10::string_view("rnn_tanh")) {
    return f(RnnCell<false>{});
  }
  if (cell == c10::string_view("rnn_relu")) {
    return f(RnnCell<true>{});
  }
  if (cell == c10::string_view("gru")) {
    return f(GruCell{});
  }
  if (cell == c10::string_view("lstm")) {
    return f(LstmCell{});
  }
  return unknown();
}

// visit_cell, where an unknown name is an error.
template <typename F>
auto with_cell(c10::string_view cell, const F& f) {
  return visit_cell(cell, f, [&]() -> decltype(f(LstmCell{})) {
    TORCH_CHECK(false, "fastrnn: unknown cell '", cell, "'");
  });
}

template <typename Cell>
void check_state_count(c10::string_view cell, at::TensorList states, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(states.size()) == Cell::kStates, "fastrnn: cell '", cell,
              "' has ", Cell::kStates, " state tensor(s), but ", name, " holds ", states.size());
}

template <typename Cell>
void check_projection(c10::string_view cell, const std::optional<at::Tensor>& weight_hr) {
  TORCH_CHECK(Cell::kProjects || !present(weight_hr), "fastrnn: cell '", cell,
              "' takes no weight_hr");
}

}  // namespace

int64_t cell_states(c10::string_view cell) {
  return visit_cell(
      cell, [](auto trait) { return decltype(trait)::kStates; }, [] { return int64_t{0}; });
}

ForwardOutputs layer_forward(c10::string_view cell, const at::Tensor& input, at::TensorList hx,
                             const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                             const std::optional<at::Tensor>& bias_ih,
                             const std::optional<at::Tensor>& bias_hh,
                             const std::optional<at::Tensor>& weight_hr,
                             const std::optional<at::Tensor>& lengths, bool reverse,
                             bool save_workspace, c10::string_view /*strategy*/) {
  return with_cell(cell, [&](auto trait) {
    using Cell = decltype(trait);
    check_state_count<Cell>(cell, hx, "hx");
    check_projection<Cell>(cell, weight_hr);
    const auto s = check_layer_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                    lengths, Cell::kGates);
    ForwardOutputs result;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::layer_forward", [&] {
      result = forward_layer<Cell, scalar_t>(s, input, hx, weight_ih, weight_hh, bias_ih,
                                             bias_hh, weight_hr, lengths, reverse,
                                             save_workspace);
    });
    return result;
  });
}

BackwardOutputs layer_backward(c10::string_view cell, const at::Tensor& grad_output,
                               at::TensorList grad_hy, const at::Tensor& input, at::TensorList hx,
                               const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                               const std::optional<at::Tensor>& weight_hr,
                               const at::Tensor& output, const at::Tensor& workspace,
                               const std::optional<at::Tensor>& lengths, bool reverse,
                               bool input_requires_grad, bool hx_requires_grad,
                               c10::string_view /*strategy*/) {
  return with_cell(cell, [&](auto trait) {
    using Cell = decltype(trait);
    check_state_count<Cell>(cell, hx, "hx");
    check_state_count<Cell>(cell, grad_hy, "grad_hy");
    check_projection<Cell>(cell, weight_hr);
    const auto s = check_layer_args(input, hx, weight_ih, weight_hh, std::nullopt, std::nullopt,
                                    weight_hr, lengths, Cell::kGates);
    check_grad_args(s, grad_output, grad_hy, hx, output);
    const int64_t saved = Cell::kSaved * s.H;
    TORCH_CHECK(workspace.sizes() == at::IntArrayRef({s.T, s.B, saved}),
                "workspace must have shape [", s.T, ", ", s.B, ", ", saved, "], got ",
                workspace.sizes());
    TORCH_CHECK(workspace.scalar_type() == input.scalar_type(), "workspace must have dtype ",
                input.scalar_type(), ", got ", workspace.scalar_type());
    BackwardOutputs result;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastrnn::layer_backward", [&] {
      result = backward_layer<Cell, scalar_t>(s, grad_output, grad_hy, input, hx, weight_ih,
                                              weight_hh, weight_hr, output, workspace, lengths,
                                              reverse, input_requires_grad, hx_requires_grad);
    });
    return result;
  });
}

}  // namespace fastrnn::cpu
