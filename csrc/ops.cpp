// The CPU kernels of the fastrnn layer ops. The schemas are defined in Python
// (fastrnn/ops.py), so that the ops exist, for the Triton engine and for
// torch.compile, without this library; loading it adds the CPU kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ops.h"
#include "cpu/panels.h"

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("layer_forward", &fastrnn::cpu::layer_forward);
  m.impl("layer_backward", &fastrnn::cpu::layer_backward);
}

// Importing fastrnn._C loads this library and so registers the kernels above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn's compiled CPU kernels (of the ops torch.ops.fastrnn.layer_*)";
  m.def("parallel_info", &at::get_parallel_info,
        "The threading setup the CPU engine runs with.");
  m.def("product_kernels", &fastrnn::cpu::product_kernels,
        "The micro-kernels of the per-step float products this CPU runs, best first, and "
        "'blas' (a BLAS call per step).");
  m.def("product_kernel", &fastrnn::cpu::product_kernel, "The step kernel float products use.");
  m.def("set_product_kernel", &fastrnn::cpu::set_product_kernel,
        "Chooses one of product_kernels().");
}
