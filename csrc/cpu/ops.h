// The CPU kernels of the layer ops (schemas in fastrnn/ops.py, registered in
// csrc/ops.cpp). Each runs one layer of the named cell ("rnn_tanh",
// "rnn_relu", "gru", "lstm") in one direction over a time-major (T, B,
// input_size) input; hx holds the cell's state tensors: h (B, H), or (B, P)
// with an LSTM's projection weight_hr (P, H), then c (B, H). `strategy` is a
// Triton launch setting: the CPU ignores it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastrnn::cpu {

// The number of state tensors of the cell named `cell`; 0 for an unknown name.
int64_t cell_states(c10::string_view cell);

// (output (T, B, H or P), final states, workspace): the workspace is (T, B,
// saved * H), what each step keeps for backward, with save_workspace, and
// (0,) without (inference, where no step writes it).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> layer_forward(
    c10::string_view cell, const at::Tensor& input, at::TensorList hx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& lengths,
    bool reverse, bool save_workspace, c10::string_view strategy);

// (grad_input ((0,) unless input_requires_grad), grads of the initial
// states (each (0,) unless hx_requires_grad), grad_weight_ih,
// grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr ((0,) without
// weight_hr)).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layer_backward(c10::string_view cell, const at::Tensor& grad_output, at::TensorList grad_hy,
               const at::Tensor& input, at::TensorList hx, const at::Tensor& weight_ih,
               const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr,
               const at::Tensor& output,
               const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
               bool reverse, bool input_requires_grad, bool hx_requires_grad,
               c10::string_view strategy);

}  // namespace fastrnn::cpu
