// The CPU layer op's autograd, in C++: one node per layer call, whose
// backward runs the backward op (the engine's sweep). The Python Function
// (fastrnn/autograd.py) does the same for every engine, and is what
// torch.compile and torch.func trace; on the CPU in eager mode this node
// spares a call the Python Function's own cost, tens of microseconds, which
// is most of a single step's. Under create_graph the gradients come from
// fastrnn::layer_gradients (the reference loop's differentiable graph,
// defined in Python), as the Function's do.
#include <algorithm>

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "op_handles.h"

namespace fastrnn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;

using GradientsSignature = std::vector<Tensor>(
    c10::string_view, const OptionalTensor&, const c10::List<OptionalTensor>&, const Tensor&,
    at::TensorList, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, bool);

const auto& gradients_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn::layer_gradients", "")
                             .typed<GradientsSignature>();
  return op;
}

OptionalTensor optional(const Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

// The saved tensors, in this order, then the states.
enum Saved { kX, kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightHr, kLengths, kOutput,
             kWorkspace, kStates };

struct LayerNode : public torch::autograd::Function<LayerNode> {
  // The states come last: autograd expands the list into one input each.
  static variable_list forward(AutogradContext* ctx, c10::string_view cell, const Tensor& x,
                               const Tensor& weight_ih, const Tensor& weight_hh,
                               const OptionalTensor& bias_ih, const OptionalTensor& bias_hh,
                               const OptionalTensor& weight_hr, const OptionalTensor& lengths,
                               bool reverse, c10::string_view strategy, at::TensorList hx) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, workspace] =
        layer_forward_op().call(cell, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                lengths, reverse, /*save_workspace=*/true, strategy);
    variable_list saved = {x, weight_ih, weight_hh, bias_ih.value_or(Tensor()),
                           bias_hh.value_or(Tensor()), weight_hr.value_or(Tensor()),
                           lengths.value_or(Tensor()), output, workspace};
    saved.insert(saved.end(), hx.begin(), hx.end());
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({workspace});
    // Otherwise autograd would hand backward a zero gradient as large as the workspace.
    ctx->set_materialize_grads(false);
    ctx->saved_data["cell"] = std::string(cell);
    ctx->saved_data["strategy"] = std::string(strategy);
    ctx->saved_data["reverse"] = reverse;
    variable_list outputs = {output, workspace};
    outputs.insert(outputs.end(), h_n.begin(), h_n.end());
    return outputs;
  }

  // grads: (output, workspace, each final state); returns one per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const at::TensorList hx(saved.data() + kStates, saved.size() - kStates);
    const Tensor& x = saved[kX];
    const Tensor& output = saved[kOutput];
    // Every differentiable input, in the order the gradient ops list them.
    std::vector<Tensor> inputs = {x};
    inputs.insert(inputs.end(), hx.begin(), hx.end());
    for (int i : {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightHr}) inputs.push_back(saved[i]);
    std::vector<Tensor> found(inputs.size());

    if (at::GradMode::is_enabled()) {
      // create_graph: gradients that can be differentiated again, for the
      // inputs that require grad, in order.
      c10::List<OptionalTensor> grad_hy;
      for (size_t i = 2; i < grads.size(); ++i) grad_hy.push_back(optional(grads[i]));
      auto gradients = gradients_op().call(
          cell, optional(grads[0]), grad_hy, x, hx, saved[kWeightIh], saved[kWeightHh],
          optional(saved[kBiasIh]), optional(saved[kBiasHh]), optional(saved[kWeightHr]),
          optional(saved[kLengths]), reverse);
      size_t next = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (requires_grad(inputs[i])) {
          TORCH_CHECK(next < gradients.size(), "fastrnn::layer_gradients returned ",
                      gradients.size(), " gradients, fewer than the inputs requiring grad");
          found[i] = gradients[next++];
        }
      }
    } else {
      const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
      std::vector<Tensor> grad_hy;
      for (size_t i = 0; i < hx.size(); ++i) {
        const Tensor& g = grads[2 + i];
        grad_hy.push_back(g.defined() ? g : at::zeros(hx[i].sizes(), output.options()));
      }
      const bool hx_requires_grad = std::any_of(hx.begin(), hx.end(), requires_grad);
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_x, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr] =
          layer_backward_op().call(cell, grad_output, grad_hy, x, hx, saved[kWeightIh],
                                   saved[kWeightHh], optional(saved[kWeightHr]), output,
                                   saved[kWorkspace], optional(saved[kLengths]), reverse,
                                   requires_grad(x), hx_requires_grad,
                                   ctx->saved_data["strategy"].toStringRef());
      std::vector<Tensor> all = {grad_x};
      all.insert(all.end(), grad_hx.begin(), grad_hx.end());
      all.insert(all.end(), {grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr});
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (requires_grad(inputs[i])) found[i] = all[i];
      }
    }
    // One per forward argument: cell, x, weight_ih, weight_hh, bias_ih,
    // bias_hh, weight_hr, lengths, reverse, strategy, then each state.
    const size_t states = hx.size();
    variable_list result = {Tensor(), found[0]};
    result.insert(result.end(), found.begin() + 1 + states, found.end());
    result.insert(result.end(), {Tensor(), Tensor(), Tensor()});
    result.insert(result.end(), found.begin() + 1, found.begin() + 1 + states);
    return result;
  }
};

std::tuple<Tensor, std::vector<Tensor>, Tensor> layer_forward_autograd(
    c10::string_view cell, const Tensor& x, at::TensorList hx, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptionalTensor& bias_ih, const OptionalTensor& bias_hh,
    const OptionalTensor& weight_hr, const OptionalTensor& lengths, bool reverse,
    bool save_workspace, c10::string_view strategy) {
  if (!torch::autograd::compute_requires_grad(x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                              weight_hr)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_forward_op().call(cell, x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                   weight_hr, lengths, reverse, save_workspace, strategy);
  }
  TORCH_CHECK(save_workspace, "fastrnn: differentiating a layer op needs save_workspace=True "
              "(the workspace is what its backward reads)");
  variable_list outputs = LayerNode::apply(cell, x, weight_ih, weight_hh, bias_ih, bias_hh,
                                           weight_hr, lengths, reverse, strategy, hx);
  return {outputs[0], std::vector<Tensor>(outputs.begin() + 2, outputs.end()), outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, AutogradCPU, m) {
  m.impl("layer_forward", &layer_forward_autograd);
}

}  // namespace fastrnn
