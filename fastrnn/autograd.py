"""The autograd Functions: one layer, one direction, per cell type.

Forward runs the engine's fused time loop; backward runs its hand-written
backward-through-time, so autograd records one node per layer and direction
however long the sequence. Both engines (C++ and Triton) share these
Functions; the engine and its settings (the Triton strategy) are chosen in
forward and kept for backward.

Backward is twice differentiable: under ``create_graph=True`` (grad mode on
in backward) the gradients come from the reference loop's autograd graph
over the same inputs instead, so that they are themselves differentiable
(gradient penalties, Hessian-vector products, meta-learning). First-order
backward keeps the engine's fused sweep and the flat graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn import backends, cpp, reference


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


def _keep_engine(ctx, device: torch.device) -> None:
    """Stores the engine forward ran on, and its settings, for backward."""
    ctx.engine = _engine(device)
    ctx.settings = ctx.engine.settings()


def _only_needed(ctx, grads) -> tuple:
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


def _differentiable_gradients(ctx, layer, inputs, grad_output: Tensor | None,
                              grad_hy: Tensor | None) -> tuple:
    """The layer's gradients through the reference loop's graph (``layer``
    over ``inputs``), built so that they can be differentiated again."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    output, h_n = layer(*inputs)
    upstream = [torch.zeros_like(t) if g is None else g.to(t.dtype)
                for g, t in ((grad_output, output), (grad_hy, h_n))]
    grads = torch.autograd.grad((output, h_n), [inputs[i] for i in wanted], upstream,
                                create_graph=True, allow_unused=True, materialize_grads=True)
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


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
        engine = _engine(x.device)
        return engine.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                  nonlinearity == "relu", *engine.settings())

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Saves what the backward sweep reads."""
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, nonlinearity = inputs
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, output[0], lengths)
        ctx.reverse, ctx.nonlinearity = reverse, nonlinearity
        _keep_engine(ctx, x.device)

    @staticmethod
    def backward(ctx, grad_output, grad_hy):
        """The engine's backward-through-time sweep, then the weight GEMMs
        (under create_graph: the reference loop's differentiable graph)."""
        x, h0, w_ih, w_hh, b_ih, b_hh, output, lengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            def layer(*tensors):
                return reference.rnn_layer(*tensors, lengths, ctx.reverse, ctx.nonlinearity)

            grads = _differentiable_gradients(ctx, layer, (x, h0, w_ih, w_hh, b_ih, b_hh),
                                              grad_output, grad_hy)
            return (*grads, None, None, None)
        grads = ctx.engine.rnn_backward(
            grad_output, grad_hy, x, h0, w_ih, w_hh, output, lengths, ctx.reverse,
            ctx.nonlinearity == "relu", ctx.needs_input_grad[0], *ctx.settings)
        return (*_only_needed(ctx, grads), None, None, None)


class GRUFunction(torch.autograd.Function):
    """GRU layer: ``apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)``; see RNNFunction.

    Returns (output, h_n, workspace): the workspace holds the gates backward
    reads and is not differentiable.
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
        """Runs the engine's time loop, keeping its gates."""
        engine = _engine(x.device)
        return engine.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, *engine.settings())

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Saves what the backward sweep reads, the gates included."""
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse = inputs
        out, _, workspace = output
        ctx.mark_non_differentiable(workspace)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, out, workspace, lengths)
        ctx.reverse = reverse
        _keep_engine(ctx, x.device)
        # Otherwise autograd would hand backward a zero gradient as large as
        # the workspace; the two it needs are made in backward when unused.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_hy, _grad_workspace):
        """The engine's backward-through-time sweep, then the weight GEMMs
        (under create_graph: the reference loop's differentiable graph)."""
        x, h0, w_ih, w_hh, b_ih, b_hh, output, workspace, lengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            def layer(*tensors):
                return reference.gru_layer(*tensors, lengths, ctx.reverse)

            grads = _differentiable_gradients(ctx, layer, (x, h0, w_ih, w_hh, b_ih, b_hh),
                                              grad_output, grad_hy)
            return (*grads, None, None)
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        if grad_hy is None:
            grad_hy = torch.zeros(h0.shape, dtype=output.dtype, device=output.device)
        grads = ctx.engine.gru_backward(
            grad_output, grad_hy, x, h0, w_ih, w_hh, output, workspace, lengths, ctx.reverse,
            ctx.needs_input_grad[0], *ctx.settings)
        return (*_only_needed(ctx, grads), None, None)
