"""The C++ CPU engine: loads ``fastrnn._C`` and exposes its layer ops.

The ops are registered with the dispatcher as ``torch.ops.fastrnn.*``; the
fake (meta) implementations below give their output shapes so that tracing
(torch.compile, the meta device) needs no real data.
"""

from __future__ import annotations

import torch

try:
    from fastrnn import _C  # noqa: F401  (loading it registers torch.ops.fastrnn)

    _LOAD_ERROR: str | None = None
except ImportError as error:  # a source checkout whose extension is not built
    _LOAD_ERROR = f"the compiled extension fastrnn._C could not be loaded ({error})"


def available() -> bool:
    """Whether the compiled extension is loaded."""
    return _LOAD_ERROR is None


def load_error() -> str | None:
    """Why the extension is not loaded, or None."""
    return _LOAD_ERROR


def _layer_output(input, hx):
    return input.new_empty(input.shape[0], input.shape[1], hx.shape[1]), hx.new_empty(hx.shape)


def _layer_grads(grad_output, grad_hy, input, hx, weight_ih, weight_hh, input_requires_grad):
    grad_input = input.new_empty(input.shape) if input_requires_grad else input.new_empty(0)
    gates = weight_hh.shape[0]
    return (grad_input, hx.new_empty(hx.shape), weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), weight_hh.new_empty(gates),
            weight_hh.new_empty(gates))


if available():
    @torch.library.register_fake("fastrnn::rnn_forward")
    def _(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, relu):
        return _layer_output(input, hx)

    @torch.library.register_fake("fastrnn::rnn_backward")
    def _(grad_output, grad_hy, input, hx, weight_ih, weight_hh, output, lengths, reverse, relu,
          input_requires_grad):
        return _layer_grads(grad_output, grad_hy, input, hx, weight_ih, weight_hh,
                            input_requires_grad)

    @torch.library.register_fake("fastrnn::gru_forward")
    def _(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse):
        output, h_n = _layer_output(input, hx)
        return output, h_n, input.new_empty(input.shape[0], input.shape[1], 4 * hx.shape[1])

    @torch.library.register_fake("fastrnn::gru_backward")
    def _(grad_output, grad_hy, input, hx, weight_ih, weight_hh, output, workspace, lengths,
          reverse, input_requires_grad):
        return _layer_grads(grad_output, grad_hy, input, hx, weight_ih, weight_hh,
                            input_requires_grad)

    rnn_forward = torch.ops.fastrnn.rnn_forward
    rnn_backward = torch.ops.fastrnn.rnn_backward
    gru_forward = torch.ops.fastrnn.gru_forward
    gru_backward = torch.ops.fastrnn.gru_backward
