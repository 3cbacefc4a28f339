// The CPU layer ops registered in csrc/ops.cpp. Each runs one layer in one
// direction over a time-major (T, B, input_size) input.
#pragma once

#include "layer.h"

namespace fastrnn::cpu {

std::tuple<at::Tensor, at::Tensor> rnn_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reverse, bool relu);

LayerGrads rnn_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                        const at::Tensor& input, const at::Tensor& hx,
                        const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                        const at::Tensor& output, const std::optional<at::Tensor>& lengths,
                        bool reverse, bool relu, bool input_requires_grad);

// Returns (output, h_n, workspace); the workspace (T, B, 4H) keeps r, z, n and
// W_hn h + b_hn of every step for the backward pass. Without save_workspace
// (inference) it is empty and the gates are not written.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reverse, bool save_workspace);

LayerGrads gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                        const at::Tensor& input, const at::Tensor& hx,
                        const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                        const at::Tensor& output, const at::Tensor& workspace,
                        const std::optional<at::Tensor>& lengths, bool reverse,
                        bool input_requires_grad);

}  // namespace fastrnn::cpu
