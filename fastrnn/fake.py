"""Output shapes of the engine ops, for tracing without data.

torch.compile and the meta device call these instead of an engine: they
return empty tensors with the shapes and dtypes the engines would return.
Both engines keep their state (and return output, h_n and the GRU
workspace) in float32, or float64 for float64 input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engines keep the recurrent state in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_forward(input: Tensor, hx: Tensor) -> tuple[Tensor, Tensor]:
    """(output (T, B, H), h_n (B, H)) in the state dtype."""
    dtype = state_dtype(input.dtype)
    T, B, _ = input.shape
    return (input.new_empty(T, B, hx.shape[1], dtype=dtype),
            hx.new_empty(hx.shape, dtype=dtype))


def gru_forward(input: Tensor, hx: Tensor,
                save_workspace: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(output, h_n, workspace (T, B, 4H), or empty without save_workspace) in the state dtype."""
    output, h_n = layer_forward(input, hx)
    shape = (output.shape[0], output.shape[1], 4 * hx.shape[1]) if save_workspace else (0,)
    return output, h_n, output.new_empty(shape)


def layer_backward(input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                   input_requires_grad: bool):
    """(grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh).

    grad_input is empty when ``input_requires_grad`` is False.
    """
    grad_input = input.new_empty(input.shape if input_requires_grad else (0,))
    gates = weight_hh.shape[0]
    return (grad_input, hx.new_empty(hx.shape), weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), weight_hh.new_empty(gates),
            weight_hh.new_empty(gates))


def check_same_device(*tensors, lengths=None) -> None:
    """Raises as ATen does when the tensors given to one op sit on different devices.

    ``lengths`` may also be on the CPU, where the modules keep it.
    """
    if lengths is not None and lengths.device.type != "cpu":
        tensors = (*tensors, lengths)
    devices = sorted({str(t.device) for t in tensors if t is not None})
    torch._check(len(devices) <= 1, lambda: "Expected all tensors to be on the same device, but "
                 f"found at least two devices, {', '.join(devices)}!")
