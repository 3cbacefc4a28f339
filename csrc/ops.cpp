// The CPU kernels of the fastrnn layer ops. The schemas are defined in Python
// (fastrnn/ops.py), so that the ops exist, for the Triton engine and for
// torch.compile, without this library; loading it adds the CPU kernels.
#include <torch/csrc/autograd/functions/utils.h>
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
  m.def("layer_step", &fastrnn::layer_step, py::call_guard<py::gil_scoped_release>(),
        "One step on a (B, I) input: the states layer_forward leaves after it as a "
        "length-1 sequence (no __torch_function__ handling: callers check for it).");
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
