// The CPU layer op's autograd (csrc/autograd.cpp), for callers in C++.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace fastrnn {

// One step of a layer on a (B, I) input (a cell's call), as the layer op
// over a length-1 sequence: the states after it. Where an input requires
// grad it records the op's node, whose gradient for x is (B, I).
std::vector<at::Tensor> layer_step(c10::string_view cell, const at::Tensor& x,
                                   const std::vector<at::Tensor>& hx,
                                   const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                   const std::optional<at::Tensor>& bias_ih,
                                   const std::optional<at::Tensor>& bias_hh,
                                   c10::string_view strategy);

}  // namespace fastrnn
