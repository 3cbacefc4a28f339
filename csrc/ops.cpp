// The fastrnn operator library: schemas of the layer ops and their CPU
// kernels. Registering them with the dispatcher makes them visible as
// torch.ops.fastrnn.* to autograd, torch.compile and other backends.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "rnn_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? lengths, bool reverse, bool relu) -> (Tensor, Tensor)");
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor? lengths, bool reverse, "
      "bool relu, bool input_requires_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? lengths, bool reverse, bool save_workspace=True) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor workspace, Tensor? lengths, "
      "bool reverse, bool input_requires_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("rnn_forward", &fastrnn::cpu::rnn_forward);
  m.impl("rnn_backward", &fastrnn::cpu::rnn_backward);
  m.impl("gru_forward", &fastrnn::cpu::gru_forward);
  m.impl("gru_backward", &fastrnn::cpu::gru_backward);
}

// Importing fastrnn._C loads this library and so registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn's compiled operators (registered as torch.ops.fastrnn.*)";
  m.def("parallel_info", &at::get_parallel_info,
        "The threading setup the CPU engine runs with.");
}
