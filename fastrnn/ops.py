"""The layer ops: one forward and one backward op for every cell, defined once.

``torch.ops.fastrnn.layer_forward`` and ``layer_backward`` run one layer in
one direction. Their kernels are registered per device with the dispatcher,
so the tensors' device picks the engine: the C++ engine's for CPU
(``csrc/ops.cpp``, loaded by ``fastrnn.cpp``) and the Triton engine's for
CUDA (``fastrnn.triton``, registered when it is first imported). The same
schemas under ``triton_layer_forward`` / ``triton_layer_backward`` run the
Triton kernels on CPU tensors under the Triton interpreter: the dispatcher
holds one CPU kernel per op, and that one is the C++ engine's.

The fake (meta) implementations below give torch.compile and the meta device
the output shapes without data. Both engines return the state, the output
and the workspace in the state dtype: float32 for half types, float64 for
float64. ``fastrnn.autograd`` registers the ops' autograd.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from fastrnn.cells import CELLS

FORWARD_SCHEMA = (
    "(str cell, Tensor input, Tensor[] hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
    "Tensor? bias_hh, Tensor? weight_hr, Tensor? lengths, bool reverse, bool save_workspace, "
    "str strategy) "
    "-> (Tensor, Tensor[], Tensor)")
BACKWARD_SCHEMA = (
    "(str cell, Tensor grad_output, Tensor[] grad_hy, Tensor input, Tensor[] hx, "
    "Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor output, Tensor workspace, "
    "Tensor? lengths, bool reverse, bool input_requires_grad, bool hx_requires_grad, "
    "str strategy) "
    "-> (Tensor, Tensor[], Tensor, Tensor, Tensor, Tensor, Tensor)")
# The gradients of a layer's inputs that require grad, in the order (input,
# each state, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), themselves
# differentiable: what backward computes under create_graph. Implemented in
# ``fastrnn.autograd``, for every device, over the reference loop's graph.
GRADIENTS_SCHEMA = (
    "layer_gradients(str cell, Tensor? grad_output, Tensor?[] grad_hy, Tensor input, "
    "Tensor[] hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
    "Tensor? weight_hr, Tensor? lengths, bool reverse) -> Tensor[]")

# (forward, backward) op names per kernel family: the device-dispatched pair
# and the Triton interpreter's.
DISPATCHED = ("layer_forward", "layer_backward")
INTERPRETED = ("triton_layer_forward", "triton_layer_backward")

_library = torch.library.Library("fastrnn", "DEF")
for _forward, _backward in (DISPATCHED, INTERPRETED):
    _library.define(_forward + FORWARD_SCHEMA)
    _library.define(_backward + BACKWARD_SCHEMA)
_library.define(GRADIENTS_SCHEMA)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engines keep the recurrent state in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_same_device(*tensors, lengths=None) -> None:
    """Raises as ATen does when the tensors given to one op sit on different devices.

    ``lengths`` may also be on the CPU, where the modules keep it.
    """
    if lengths is not None and lengths.device.type != "cpu":
        tensors = (*tensors, lengths)
    devices = sorted({str(t.device) for t in tensors if t is not None})
    torch._check(len(devices) <= 1, lambda: "Expected all tensors to be on the same device, but "
                 f"found at least two devices, {', '.join(devices)}!")


def fake_forward(cell, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                 reverse, save_workspace, strategy):
    """(output (T, B, H_out), [each state's shape], workspace (T, B, saved * H), or (0,)
    without save_workspace), in the state dtype; H_out is the projection's P
    with ``weight_hr`` (P, H), else H."""
    check_same_device(input, *hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                      lengths=lengths)
    dtype = state_dtype(input.dtype)
    T, B, _ = input.shape
    description = CELLS[cell]
    H = weight_hh.shape[0] // description.gates
    workspace = (T, B, description.saved * H) if save_workspace else (0,)
    return (input.new_empty(T, B, hx[0].shape[1], dtype=dtype),
            [h.new_empty(h.shape, dtype=dtype) for h in hx],
            input.new_empty(workspace, dtype=dtype))


def fake_backward(cell, grad_output, grad_hy, input, hx, weight_ih, weight_hh, weight_hr, output,
                  workspace, lengths, reverse, input_requires_grad, hx_requires_grad, strategy):
    """(grad_input, [grad per state tensor], grad_weight_ih, grad_weight_hh, grad_bias_ih,
    grad_bias_hh, grad_weight_hr); grad_input is empty when ``input_requires_grad``
    is False, each state's gradient when ``hx_requires_grad`` is False,
    grad_weight_hr without ``weight_hr``."""
    check_same_device(grad_output, *grad_hy, input, *hx, weight_ih, weight_hh, weight_hr, output,
                      workspace, lengths=lengths)
    rows = weight_hh.shape[0]
    return (input.new_empty(input.shape if input_requires_grad else (0,)),
            [h.new_empty(h.shape if hx_requires_grad else (0,)) for h in hx],
            weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), weight_hh.new_empty(rows),
            weight_hh.new_empty(rows),
            weight_hh.new_empty((0,) if weight_hr is None else weight_hr.shape))


def forward_flops(cell, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                  reverse, save_workspace, strategy, out_shape=None) -> int:
    """The FLOPs of a layer's products, as ``torch.utils.flop_counter`` counts
    torch.nn's (2 a multiply-add, from the shapes): x W_ih^T over all steps,
    h W_hh^T each step and, with a projection, m W_hr^T each step. From the
    shapes alone: a packed batch counts every padded step too."""
    T, B, I = input
    G, K = weight_hh
    flops = 2 * T * B * G * (I + K)
    if weight_hr is not None:
        P, H = weight_hr
        flops += 2 * T * B * P * H
    return flops


def backward_flops(cell, grad_output, grad_hy, input, hx, weight_ih, weight_hh, weight_hr, output,
                   workspace, lengths, reverse, input_requires_grad, hx_requires_grad, strategy,
                   out_shape=None) -> int:
    """Each product's two gradients (of its left factor and of its weight),
    as the counter counts a matrix product's backward, less those not asked
    for: the input's, and the initial state's (the first step's left factor).
    The weights' are counted always: the engines compute them always."""
    T, B, I = input
    G, K = weight_hh
    flops = 2 * forward_flops(cell, input, hx, weight_ih, weight_hh, None, None, weight_hr, lengths,
                              reverse, False, strategy)
    if not input_requires_grad:
        flops -= 2 * T * B * G * I
    if not hx_requires_grad:
        flops -= 2 * B * G * K
    return flops


for _forward, _backward in (DISPATCHED, INTERPRETED):
    torch.library.register_fake("fastrnn::" + _forward, fake_forward, lib=_library)
    torch.library.register_fake("fastrnn::" + _backward, fake_backward, lib=_library)
    register_flop_formula(getattr(torch.ops.fastrnn, _forward))(forward_flops)
    register_flop_formula(getattr(torch.ops.fastrnn, _backward))(backward_flops)
