"""The autograd Functions: one layer, one direction, per cell type.

Forward runs the engine's fused time loop; backward runs its hand-written
backward-through-time, so autograd records one node per layer and direction
however long the sequence. Both engines (C++ and Triton) share these
Functions. Their backward is not itself differentiable (double backward
raises): it is a fused kernel, not a graph of differentiable ops.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastrnn import backends, cpp


def _engine(device: torch.device):
    name = backends.resolve(device)
    if name == "cpp":
        return cpp
    if name == "triton":
        return backends.triton_engine  # imported by resolve()
    raise RuntimeError(
        f"fastrnn has no compiled engine for tensors on {device} under backend "
        f"{backends.current_backend()!r}; use fastrnn.use_backend('reference')"
    )


def _bias_grads(ctx, grad_b_ih: Tensor, grad_b_hh: Tensor):
    return (grad_b_ih if ctx.needs_input_grad[4] else None,
            grad_b_hh if ctx.needs_input_grad[5] else None)


class RNNFunction(torch.autograd.Function):
    """tanh/ReLU RNN layer: ``apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, nonlinearity)``.

    x is (T, B, I) time-major, h0 (B, H); b_ih/b_hh may be None; lengths is
    None or an int64 CPU tensor (B,); positions past a sequence's length
    must hold finite values and come out as zeros. Returns (output, h_n), in
    x's dtype, or in float32 for half-precision x on the Triton engine (the
    state it kept; ``fastrnn.functional`` narrows them). Forward and
    ``setup_context`` are separate, so ``torch.func.grad`` and friends can
    differentiate through it.
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, nonlinearity):
        """Runs the engine's time loop."""
        return _engine(x.device).rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                             nonlinearity == "relu")

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Saves what the backward sweep reads."""
        x, h0, w_ih, w_hh, _, _, lengths, reverse, nonlinearity = inputs
        ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], lengths)
        ctx.engine, ctx.reverse, ctx.relu = _engine(x.device), reverse, nonlinearity == "relu"

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_hy):
        """The engine's backward-through-time sweep, then the weight GEMMs."""
        x, h0, w_ih, w_hh, output, lengths = ctx.saved_tensors
        grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = ctx.engine.rnn_backward(
            grad_output, grad_hy, x, h0, w_ih, w_hh, output, lengths, ctx.reverse, ctx.relu,
            ctx.needs_input_grad[0])
        return (grad_x if ctx.needs_input_grad[0] else None, grad_h0, grad_w_ih, grad_w_hh,
                *_bias_grads(ctx, grad_b_ih, grad_b_hh), None, None, None)


class GRUFunction(torch.autograd.Function):
    """GRU layer: ``apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)``; see RNNFunction.

    Returns (output, h_n, workspace): the workspace holds the gates backward
    reads and is not differentiable.
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
        """Runs the engine's time loop, keeping its gates."""
        return _engine(x.device).gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Saves what the backward sweep reads, the gates included."""
        x, h0, w_ih, w_hh, _, _, lengths, reverse = inputs
        out, _, workspace = output
        ctx.mark_non_differentiable(workspace)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out, workspace, lengths)
        ctx.engine, ctx.reverse = _engine(x.device), reverse
        # Otherwise autograd would hand backward a zero gradient as large as
        # the workspace; the two it needs are made in backward when unused.
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_hy, _grad_workspace):
        """The engine's backward-through-time sweep, then the weight GEMMs."""
        x, h0, w_ih, w_hh, output, workspace, lengths = ctx.saved_tensors
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        if grad_hy is None:
            grad_hy = torch.zeros(h0.shape, dtype=output.dtype, device=output.device)
        grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = ctx.engine.gru_backward(
            grad_output, grad_hy, x, h0, w_ih, w_hh, output, workspace, lengths, ctx.reverse,
            ctx.needs_input_grad[0])
        return (grad_x if ctx.needs_input_grad[0] else None, grad_h0, grad_w_ih, grad_w_hh,
                *_bias_grads(ctx, grad_b_ih, grad_b_hh), None, None)
