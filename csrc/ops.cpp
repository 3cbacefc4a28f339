// The CPU kernels of the fastrnn layer ops. The schemas are defined in Python
// (fastrnn/ops.py), so that the ops exist, for the Triton engine and for
// torch.compile, without this library; loading it adds the CPU kernels.
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "autograd.h"
#include "cpu/buffers.h"
#include "cpu/ops.h"
#include "cpu/panels.h"
#include "op_handles.h"

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("layer_forward", &fastrnn::cpu::layer_forward);
  m.impl("layer_backward", &fastrnn::cpu::layer_backward);
}

namespace {

// torch.ops.fastrnn.layer_forward called through the dispatcher (every
// dispatch key, autograd included, as from torch.ops) without the boxing of
// its arguments and results that torch.ops does: 3 of the 7 microseconds a
// single small step takes that way. With save_workspace None the workspace
// is kept where autograd will record the layer, the one case where backward
// reads it.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> call_layer_forward(
    c10::string_view cell, const at::Tensor& input, const std::vector<at::Tensor>& hx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& lengths,
    bool reverse, std::optional<bool> save_workspace, c10::string_view strategy) {
  const bool keep = save_workspace.has_value()
                        ? *save_workspace
                        : torch::autograd::compute_requires_grad(
                              input, at::TensorList(hx), weight_ih, weight_hh, bias_ih, bias_hh,
                              weight_hr);
  return fastrnn::layer_forward_op().call(cell, input, hx, weight_ih, weight_hh, bias_ih,
                                          bias_hh, weight_hr, lengths, reverse, keep, strategy);
}

// The tensor `object` holds where it is a torch.Tensor or a Parameter
// exactly (a subclass may override __torch_function__), strided, not
// nested, on the CPU: what the plain calls below take; else null.
const at::Tensor* cpu_tensor(py::handle object) {
  if (!THPVariable_CheckExact(object.ptr())) return nullptr;
  const at::Tensor& tensor = THPVariable_Unpack(object.ptr());
  return tensor.layout() == at::kStrided && !tensor.is_nested() && tensor.is_cpu() ? &tensor
                                                                                   : nullptr;
}

// Whether the engine runs x's dtype as it is (float32, float64): the Python
// layer functions widen float16 and bfloat16 for it, and run complex inputs
// through the reference loop; the plain calls do neither.
bool native(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
}

// fastrnn::layer_step where the call is the plain one a cell module's
// common call makes, checked here in one pass rather than in Python, where
// the checks cost as much as a small step's arithmetic: x (B, I) and `hx`,
// a tuple of the cell's (B, H) states, sized as the weights (2-D) expect;
// every tensor a torch.Tensor or Parameter on the CPU (the biases may be
// None); x float32 or float64, and the states of its dtype. Returns
// the states after the step as a tuple, or None for any other call (it
// raises for none: the caller's own checks then do, as torch.nn's).
py::object plain_step(c10::string_view cell, py::handle x, py::handle hx, py::handle weight_ih,
                      py::handle weight_hh, py::handle bias_ih, py::handle bias_hh,
                      c10::string_view strategy) {
  const at::Tensor* input = cpu_tensor(x);
  const at::Tensor* w_ih = cpu_tensor(weight_ih);
  const at::Tensor* w_hh = cpu_tensor(weight_hh);
  const int64_t count = fastrnn::cpu::cell_states(cell);
  if (!input || !w_ih || !w_hh || count == 0 || !PyTuple_CheckExact(hx.ptr()) ||
      PyTuple_GET_SIZE(hx.ptr()) != count) {
    return py::none();
  }
  if (input->dim() != 2 || w_ih->dim() != 2 || w_hh->dim() != 2 ||
      input->size(1) != w_ih->size(1) || !native(*input)) {
    return py::none();
  }
  std::vector<at::Tensor> states;
  for (py::handle state : py::reinterpret_borrow<py::tuple>(hx)) {
    const at::Tensor* h = cpu_tensor(state);
    if (!h || h->dim() != 2 || h->size(0) != input->size(0) ||
        h->size(1) != w_hh->size(1) || h->scalar_type() != input->scalar_type()) {
      return py::none();
    }
    states.push_back(*h);
  }
  std::optional<at::Tensor> biases[2];
  const py::handle given[2] = {bias_ih, bias_hh};
  for (int i = 0; i < 2; ++i) {
    if (given[i].is_none()) continue;
    const at::Tensor* bias = cpu_tensor(given[i]);
    if (!bias) return py::none();
    biases[i] = *bias;
  }
  // Held here, not only by the Python objects, while the GIL is released.
  const at::Tensor x_held = *input, w_ih_held = *w_ih, w_hh_held = *w_hh;
  std::vector<at::Tensor> result;
  {
    // Released while the step runs, as torch.ops does.
    py::gil_scoped_release release;
    result = fastrnn::layer_step(cell, x_held, states, w_ih_held, w_hh_held, biases[0],
                                 biases[1], strategy);
  }
  py::tuple after(result.size());
  for (size_t i = 0; i < result.size(); ++i) after[i] = py::cast(std::move(result[i]));
  return after;
}

// The states of a recurrent module's call where it is the plain one:
// `input` a (T, B, input_size) tensor ((B, T, input_size) batch_first), T
// > 0, of the first weight's dtype, float32 or float64; `hx` its
// state (a tensor, h_size wide) or, with c_size, the tuple (h, c), each
// (layers, B, width), or None (zeros, as torch.nn makes them); `weights` the
// module's list of flat weights (an absent bias is not listed); every tensor a
// torch.Tensor or Parameter on the CPU. Returns the tuple of the states, or
// None for any other call (it raises for none: the module's own checks,
// torch.nn's, then do).
py::object plain_states(py::handle input, py::handle hx, py::handle weights, int64_t input_size,
                        int64_t layers, int64_t h_size, int64_t c_size, bool batch_first) {
  const at::Tensor* x = cpu_tensor(input);
  if (!x || x->dim() != 3 || x->size(2) != input_size || x->size(batch_first ? 1 : 0) == 0 ||
      !native(*x) || !PyList_CheckExact(weights.ptr()) ||
      PyList_GET_SIZE(weights.ptr()) == 0) {
    return py::none();
  }
  bool first = true;
  for (py::handle weight : py::reinterpret_borrow<py::list>(weights)) {
    // A None (a bias set to None by hand) is not plain: torch.nn raises.
    const at::Tensor* w = cpu_tensor(weight);
    if (!w || (first && w->scalar_type() != x->scalar_type())) {
      return py::none();
    }
    first = false;
  }
  const int64_t batch = x->size(batch_first ? 0 : 1);
  const int64_t widths[2] = {h_size, c_size};
  const bool pair = c_size > 0;
  if (hx.is_none()) {
    py::tuple zeros(pair ? 2 : 1);
    for (int i = 0; i < (pair ? 2 : 1); ++i) {
      zeros[i] = py::cast(at::zeros({layers, batch, widths[i]}, x->options()));
    }
    return zeros;
  }
  if (pair && !(PyTuple_CheckExact(hx.ptr()) && PyTuple_GET_SIZE(hx.ptr()) == 2)) {
    return py::none();
  }
  py::tuple states(pair ? 2 : 1);
  for (int i = 0; i < (pair ? 2 : 1); ++i) {
    py::handle state = pair ? PyTuple_GET_ITEM(hx.ptr(), i) : hx.ptr();
    const at::Tensor* h = cpu_tensor(state);
    if (!h || h->sizes() != at::IntArrayRef({layers, batch, widths[i]})) {
      return py::none();
    }
    states[i] = py::reinterpret_borrow<py::object>(state);
  }
  return states;
}

// recurrent_layers (fastrnn/functional.py) in one call where the call is a
// plain one, which spares the Python ops around each layer (indexing its
// states, stacking the final ones: a few microseconds each, as much as a
// short layer's arithmetic): x a (T, B, I) tensor, neither float16 nor
// bfloat16; `hx` the tuple of the cell's states, each (layers * directions,
// B, width); `weights` a list or tuple of each layer and direction's w_ih,
// w_hh, optionally b_ih and b_hh, then w_hr where `projects`; every tensor a
// torch.Tensor or Parameter exactly on the CPU (a bias may be None).
// Without dropout or lengths: the caller passes neither. Each layer is the
// forward op's call, as recurrent_layers makes it. Returns (output, final
// states stacked as hx), or None for any other call, raising for none.
py::object plain_layers(c10::string_view cell, py::handle x, py::handle hx, py::handle weights,
                        int64_t layers, bool bidirectional, bool projects,
                        c10::string_view strategy) {
  const at::Tensor* input = cpu_tensor(x);
  const int64_t count = fastrnn::cpu::cell_states(cell);
  const int64_t directions = bidirectional ? 2 : 1;
  if (!input || count == 0 || !native(*input) || !PyTuple_CheckExact(hx.ptr()) ||
      PyTuple_GET_SIZE(hx.ptr()) != count || layers < 1 ||
      !(PyList_CheckExact(weights.ptr()) || PyTuple_CheckExact(weights.ptr()))) {
    return py::none();
  }
  std::vector<at::Tensor> states;
  for (py::handle state : py::reinterpret_borrow<py::tuple>(hx)) {
    const at::Tensor* h = cpu_tensor(state);
    if (!h || h->dim() != 3 || h->size(0) != layers * directions) {
      return py::none();
    }
    states.push_back(*h);
  }
  const auto listed = py::reinterpret_borrow<py::sequence>(weights);
  const int64_t per_layer = static_cast<int64_t>(listed.size()) / (layers * directions);
  const bool biased = per_layer - (projects ? 1 : 0) == 4;
  if (per_layer * layers * directions != static_cast<int64_t>(listed.size()) ||
      !(biased || per_layer - (projects ? 1 : 0) == 2)) {
    return py::none();
  }
  std::vector<std::optional<at::Tensor>> flat;
  for (int64_t i = 0; i < static_cast<int64_t>(listed.size()); ++i) {
    const py::handle weight = listed[i];
    const bool bias = biased && (i % per_layer == 2 || i % per_layer == 3);
    if (bias && weight.is_none()) {
      flat.emplace_back(std::nullopt);
      continue;
    }
    const at::Tensor* w = cpu_tensor(weight);
    if (!w) return py::none();
    flat.emplace_back(*w);
  }
  at::Tensor output = *input;
  std::vector<at::Tensor> stacked;
  {
    // Released while the layers run, as torch.ops does.
    py::gil_scoped_release release;
    std::vector<std::vector<at::Tensor>> finals(count);
    for (int64_t layer = 0; layer < layers; ++layer) {
      std::vector<at::Tensor> outputs;
      for (int64_t direction = 0; direction < directions; ++direction) {
        const int64_t index = layer * directions + direction;
        const auto* group = &flat[index * per_layer];
        std::vector<at::Tensor> initial;
        for (const at::Tensor& h : states) initial.push_back(h.select(0, index));
        auto [out, h_n, workspace] = call_layer_forward(
            cell, output, initial, *group[0], *group[1], biased ? group[2] : std::nullopt,
            biased ? group[3] : std::nullopt, projects ? group[per_layer - 1] : std::nullopt,
            std::nullopt, direction == 1, std::nullopt, strategy);
        outputs.push_back(out);
        for (int64_t k = 0; k < count; ++k) finals[k].push_back(h_n[k]);
      }
      output = directions == 1 ? outputs[0] : at::cat(outputs, 2);
    }
    for (const auto& states_of : finals) stacked.push_back(at::stack(states_of));
  }
  py::tuple final_states(count);
  for (int64_t k = 0; k < count; ++k) final_states[k] = py::cast(std::move(stacked[k]));
  return py::make_tuple(py::cast(std::move(output)), final_states);
}

}  // namespace

// Importing fastrnn._C loads this library and so registers the kernels above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn's compiled CPU kernels (of the ops torch.ops.fastrnn.layer_*)";
  m.def("parallel_info", &at::get_parallel_info,
        "The threading setup the CPU engine runs with.");
  m.def("product_kernels", &fastrnn::cpu::product_kernels,
        "The micro-kernels of the float products this CPU runs, best first, and "
        "'blas' (a BLAS call per product).");
  m.def("product_kernel", &fastrnn::cpu::product_kernel,
        "The kernel float products use (large single ones aside: large_products_on_blas).");
  // The GIL is released while the layer runs, as torch.ops does.
  m.def("layer_forward", &call_layer_forward, py::call_guard<py::gil_scoped_release>(),
        "torch.ops.fastrnn.layer_forward, the same dispatch without boxing its arguments "
        "(no __torch_function__ handling: callers check for it); save_workspace None: "
        "where autograd records the layer.");
  m.def("plain_step", &plain_step,
        "One step on a (B, I) input where the call is a cell module's plain one: the "
        "states layer_forward leaves after it as a length-1 sequence, or None for any "
        "other call (no __torch_function__ handling: callers check for modes).");
  m.def("plain_layers", &plain_layers,
        "functional.recurrent_layers without dropout or lengths in one call where the call "
        "is a plain one; None for any other call.");
  m.def("plain_states", &plain_states,
        "The tuple of a recurrent module's states where its call is a plain one, or None "
        "for any other call.");
  m.def("set_product_kernel", &fastrnn::cpu::set_product_kernel,
        "Chooses one of product_kernels() for every float product.");
  m.def("reset_product_kernel", &fastrnn::cpu::reset_product_kernel,
        "Back to the default choice of product kernels.");
  m.def("large_products_on_blas", &fastrnn::cpu::large_products_on_blas,
        "Whether float products of many rows in one call by a large weight (input "
        "projections, dx) run on the BLAS rather than the chosen kernel.");
  m.def("cached_bytes", &fastrnn::cpu::cached_bytes,
        "Bytes the cache of large CPU buffers holds in blocks no tensor uses.");
  m.def("empty_cache", &fastrnn::cpu::empty_cache,
        "Frees the blocks of the cache of large CPU buffers that no tensor uses.");
}
