// Typed handles of the layer ops (schemas in fastrnn/ops.py), for calling
// them through the dispatcher from C++: looked up once, on first use.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu/ops.h"

namespace fastrnn {

// Signatures are those of the CPU kernels (csrc/cpu/ops.h).
inline const auto& layer_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn::layer_forward", "")
                             .typed<decltype(cpu::layer_forward)>();
  return op;
}

inline const auto& layer_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn::layer_backward", "")
                             .typed<decltype(cpu::layer_backward)>();
  return op;
}

}  // namespace fastrnn
