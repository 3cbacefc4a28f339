// The CPU layer op's autograd, in C++: one node per layer call, whose
// backward runs the backward op (the engine's sweep). The Python Function
// (fastrnn/autograd.py) does the same for every engine, and is what
// torch.compile traces (under torch.func the layers run the reference loop
// instead); on the CPU in eager mode this node spares a call the Python
// Function's own cost, tens of microseconds, which is most of a single
// step's. Under create_graph, or vmap, the gradients come from
// fastrnn::layer_gradients (the reference loop's graph, defined in Python),
// as the Function's do under create_graph.
#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "autograd.h"
#include "op_handles.h"

namespace fastrnn {
namespace {

using at::Tensor;
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

// Whether vmap batches any of `grads` (a batched backward: autograd.grad
// with is_grads_batched, vectorized Jacobians): the engine's ops have no
// batching rule.
bool batched(const variable_list& grads) {
  return std::any_of(grads.begin(), grads.end(), [](const Tensor& g) {
    return g.defined() && (g.key_set().has(c10::DispatchKey::Batched) ||
                           g.key_set().has(c10::DispatchKey::FuncTorchBatched));
  });
}

// The layer op's backward, a hand-written autograd node as ATen's generated
// ones are: a torch::autograd::Function builds a context with a hash map of
// named values and a record of every argument on each call, several
// microseconds of a small step's few tens.
struct LayerBackward : public torch::autograd::Node {
  // The saved tensors, in this order, then the states.
  enum Saved { kX, kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightHr, kLengths, kOutput,
               kWorkspace, kStates };

  std::string name() const override { return "fastrnn::LayerBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& variable : saved) variable.reset_data();
  }

  // grads: (output, each final state); returns one gradient per edge: x,
  // each initial state, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Tensor> unpacked;
    unpacked.reserve(saved.size());
    for (auto& variable : saved) unpacked.push_back(variable.unpack(getptr()));
    const at::TensorList hx(unpacked.data() + kStates, unpacked.size() - kStates);
    // A step's (B, I) input ran as the (1, B, I) sequence x; its gradient
    // goes back as (B, I).
    const Tensor& step_input = unpacked[kX];
    const Tensor x = step ? step_input.unsqueeze(0) : step_input;
    const auto to_input_shape = [&](const Tensor& grad) {
      return step && grad.defined() ? grad.reshape(step_input.sizes()) : grad;
    };
    // Every differentiable input, in the order of the edges.
    std::vector<Tensor> inputs = {x};
    inputs.insert(inputs.end(), hx.begin(), hx.end());
    for (int i : {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightHr}) {
      inputs.push_back(unpacked[i]);
    }
    variable_list result(num_outputs());

    if (at::GradMode::is_enabled() || batched(grads)) {
      // create_graph: gradients that can be differentiated again, for the
      // inputs that require grad, in order; under vmap, the same gradients
      // (the reference loop's plain ops batch), without a graph.
      c10::List<OptionalTensor> grad_hy;
      for (size_t i = 1; i < grads.size(); ++i) grad_hy.push_back(optional(grads[i]));
      auto gradients = gradients_op().call(
          cell, optional(grads[0]), grad_hy, x, hx, unpacked[kWeightIh], unpacked[kWeightHh],
          optional(unpacked[kBiasIh]), optional(unpacked[kBiasHh]),
          optional(unpacked[kWeightHr]), optional(unpacked[kLengths]), reverse);
      size_t next = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (requires_grad(inputs[i])) {
          TORCH_CHECK(next < gradients.size(), "fastrnn::layer_gradients returned ",
                      gradients.size(), " gradients, fewer than the inputs requiring grad");
          if (task_should_compute_output(i)) {
            result[i] = i == 0 ? to_input_shape(gradients[next]) : gradients[next];
          }
          ++next;
        }
      }
      return result;
    }
    Tensor output = unpacked[kOutput], workspace = unpacked[kWorkspace];
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (output_version.current_version() != output_saved_version) {
      // The output was changed in place after forward (ReLU(inplace=True),
      // a residual +=), which torch.nn's CPU layers allow: backward needs
      // it as forward left it, so forward runs again on the saved inputs
      // (the same values, with the same threads the same bits), at the
      // cost of a forward and a second workspace. A write that bypasses the
      // version counter (through .data) goes unseen, as for any saved tensor.
      std::tie(output, std::ignore, workspace) = layer_forward_op().call(
          cell, x, hx, unpacked[kWeightIh], unpacked[kWeightHh], optional(unpacked[kBiasIh]),
          optional(unpacked[kBiasHh]), optional(unpacked[kWeightHr]),
          optional(unpacked[kLengths]), reverse, true, strategy);
    }
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    std::vector<Tensor> grad_hy;
    for (size_t i = 0; i < hx.size(); ++i) {
      const Tensor& g = grads[1 + i];
      grad_hy.push_back(g.defined() ? g : at::zeros(hx[i].sizes(), output.options()));
    }
    bool hx_needed = false;
    for (size_t i = 0; i < hx.size(); ++i) hx_needed |= task_should_compute_output(1 + i);
    auto [grad_x, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr] =
        layer_backward_op().call(cell, grad_output, grad_hy, x, hx, unpacked[kWeightIh],
                                 unpacked[kWeightHh], optional(unpacked[kWeightHr]), output,
                                 workspace, optional(unpacked[kLengths]), reverse,
                                 task_should_compute_output(0), hx_needed, strategy);
    std::vector<Tensor> all = {grad_x};
    all.insert(all.end(), grad_hx.begin(), grad_hx.end());
    all.insert(all.end(), {grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr});
    for (size_t i = 0; i < all.size(); ++i) {
      if (task_should_compute_output(i)) result[i] = i == 0 ? to_input_shape(all[i]) : all[i];
    }
    return result;
  }

  std::vector<torch::autograd::SavedVariable> saved;
  // The output is saved as data of its own (no version check), with the
  // output's version counter and its version at forward to tell whether it
  // changed since.
  c10::VariableVersion output_version;
  uint32_t output_saved_version = 0;
  std::string cell, strategy;
  bool reverse = false;
  bool step = false;  // x is one step's (B, I) input, run as a length-1 sequence
};

// The layer op below autograd and, where an input requires grad, its node.
// With `step`, x is one step's (B, I) input, run as the sequence (1, B, I)
// with the node's edge on x itself: a differentiable unsqueeze would add a
// node of its own to every step's graph. save_workspace nullopt: where the
// node is recorded.
std::tuple<Tensor, std::vector<Tensor>, Tensor> forward_and_record(
    c10::string_view cell, const Tensor& x, bool step, at::TensorList hx,
    const Tensor& weight_ih, const Tensor& weight_hh, const OptionalTensor& bias_ih,
    const OptionalTensor& bias_hh, const OptionalTensor& weight_hr,
    const OptionalTensor& lengths, bool reverse, std::optional<bool> save_workspace,
    c10::string_view strategy) {
  using torch::autograd::isFwGradDefined;
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(isFwGradDefined(x) || torch::autograd::isFwGradDefinedTensorList(hx) ||
        isFwGradDefined(weight_ih) || isFwGradDefined(weight_hh) || isFwGradDefined(bias_ih) ||
        isFwGradDefined(bias_hh) || isFwGradDefined(weight_hr)),
      "fastrnn::layer_forward has no forward-mode AD formula; fastrnn's modules and layer "
      "functions run inputs with tangents through the reference loop");
  const bool records = torch::autograd::compute_requires_grad(x, hx, weight_ih, weight_hh,
                                                              bias_ih, bias_hh, weight_hr);
  const bool keep = save_workspace.value_or(records);
  if (records) {
    TORCH_CHECK(keep, "fastrnn: differentiating a layer op needs save_workspace=True "
                "(the workspace is what its backward reads)");
    if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
      // Under torch.func the layers run the reference loop (fastrnn.functional).
      functorch->checkSupportsCppAutogradFunction();
    }
  }
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_forward_op().call(cell, step ? x.unsqueeze(0) : x, hx, weight_ih, weight_hh,
                                   bias_ih, bias_hh, weight_hr, lengths, reverse,
                                   keep, strategy);
  }();
  if (!records) return result;
  auto& [output, h_n, workspace] = result;
  auto node = c10::make_intrusive<LayerBackward>();
  node->set_next_edges(
      torch::autograd::collect_next_edges(x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                          weight_hr));
  torch::autograd::set_history(output, node);
  torch::autograd::set_history(h_n, node);
  using torch::autograd::SavedVariable;
  auto& saved = node->saved;
  saved.reserve(LayerBackward::kStates + hx.size());
  for (const OptionalTensor& input : {OptionalTensor(x), OptionalTensor(weight_ih),
                                      OptionalTensor(weight_hh), bias_ih, bias_hh, weight_hr,
                                      lengths}) {
    saved.emplace_back(input, /*is_output=*/false);
  }
  saved.emplace_back(output.variable_data(), /*is_output=*/false);
  node->output_version = torch::autograd::impl::version_counter(output);
  node->output_saved_version = node->output_version.current_version();
  saved.emplace_back(workspace, /*is_output=*/false);  // not differentiable: no history
  for (const Tensor& h : hx) saved.emplace_back(h, /*is_output=*/false);
  node->cell = std::string(cell);
  node->strategy = std::string(strategy);
  node->reverse = reverse;
  node->step = step;
  return result;
}

// The op's autograd kernel.
std::tuple<Tensor, std::vector<Tensor>, Tensor> layer_forward_autograd(
    c10::string_view cell, const Tensor& x, at::TensorList hx, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptionalTensor& bias_ih, const OptionalTensor& bias_hh,
    const OptionalTensor& weight_hr, const OptionalTensor& lengths, bool reverse,
    bool save_workspace, c10::string_view strategy) {
  return forward_and_record(cell, x, /*step=*/false, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                            weight_hr, lengths, reverse, save_workspace, strategy);
}

}  // namespace

std::vector<Tensor> layer_step(c10::string_view cell, const Tensor& x,
                               const std::vector<Tensor>& hx, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptionalTensor& bias_ih,
                               const OptionalTensor& bias_hh, c10::string_view strategy) {
  return std::get<1>(forward_and_record(cell, x, /*step=*/true, hx, weight_ih, weight_hh,
                                        bias_ih, bias_hh, std::nullopt, std::nullopt,
                                        /*reverse=*/false, std::nullopt, strategy));
}

TORCH_LIBRARY_IMPL(fastrnn, AutogradCPU, m) {
  m.impl("layer_forward", &layer_forward_autograd);
}

}  // namespace fastrnn
