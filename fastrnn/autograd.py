"""The autograd Function of a layer: one layer, one direction, any cell type.

Forward runs the engine's fused time loop (the ``fastrnn.ops`` layer op);
backward runs its hand-written backward-through-time, so autograd records
one node per layer and direction however long the sequence. The inputs are
unpacked by the cell's description (``fastrnn.cells``): one Function serves
every cell and both engines. The engine's op family and its settings (the
Triton strategy) are chosen once, before forward, and kept for backward.

In eager mode on the CPU the C++ engine's forward op records its own
node instead (``csrc/autograd.cpp``): the same backward, without a Python
Function's cost per call, which is most of a single step's time.
torch.compile traces ``LayerFunction``; under a torch.func transform the
layers run the reference loop instead (``fastrnn.functional``).

Backward is twice differentiable: under ``create_graph=True`` (grad mode on
in backward) the gradients come from the reference loop's autograd graph
over the same inputs instead, so that they are themselves differentiable
(gradient penalties, Hessian-vector products, meta-learning). First-order
backward keeps the engine's fused sweep and the flat graph.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import Tensor

from fastrnn import backends, cpp, ops, reference
from fastrnn.settings import settings

# Where each of the Function's inputs sits: the cell's states come last, as
# many as its description names.
X, W_IH, W_HH, B_IH, B_HH, W_HR, STATES = 3, 4, 5, 6, 7, 8, 11


def family(engine: str, device: torch.device) -> tuple[str, str]:
    """The (forward, backward) op names that run ``engine`` on ``device``:
    the device-dispatched ops, or for Triton on CPU tensors the interpreter's."""
    if engine == "triton" and device.type == "cpu":
        return ops.INTERPRETED
    if engine in ("cpp", "triton"):
        return ops.DISPATCHED
    raise RuntimeError(
        f"fastrnn has no compiled engine for tensors on {device} under backend "
        f"{backends.current_backend()!r}; use fastrnn.use_backend('reference')")


def _below_autograd():
    """Calls the ops straight to their device kernel, past their own autograd
    registration (``register`` below), which this Function stands in for:
    in eager mode that spares a Python round trip per call."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _op(name: str):
    return _OPS[name]


_OPS = {name: getattr(torch.ops.fastrnn, name).default
        for name in (*ops.DISPATCHED, *ops.INTERPRETED)}


def _split(grads: list, states: int) -> tuple:
    """(x, states..., weights...) gradients as (grad_x, [grad per state], *weights),
    the weights being w_ih, w_hh, b_ih, b_hh, w_hr."""
    return grads[0], grads[1:1 + states], *grads[1 + states:]


def _differentiable_gradients(cell: str, grad_output: Tensor | None, grad_hy, x: Tensor,
                              hx, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh, w_hr, lengths,
                              reverse: bool, needs) -> list:
    """The layer's gradients through the reference loop's graph over its
    inputs: one per input (x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr), None where
    ``needs`` is False. Under grad mode (create_graph) they can be
    differentiated again; without (a batched backward), they are plain."""
    create_graph = torch.is_grad_enabled()
    # Each wanted input enters the graph through an alias of its own, so
    # that one tensor passed in two places (tied biases, an LSTM's (h, h))
    # gets each place's gradient there, as the engine's sweep gives it, and
    # autograd adds them once, not the total twice.
    with torch.enable_grad():
        inputs = [t if t is None or not need else t.view_as(t)
                  for t, need in zip((x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr), needs)]
        wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if t is not None and need]
        x, *hx = inputs[:1 + len(hx)]
        w_ih, w_hh, b_ih, b_hh, w_hr = inputs[1 + len(hx):]
        output, h_n = reference.layer(cell, x, tuple(hx), w_ih, w_hh, b_ih, b_hh, lengths,
                                      reverse, w_hr)
    results = (output, *h_n)
    upstream = [torch.zeros_like(t) if g is None else g.to(t.dtype)
                for g, t in zip((grad_output, *grad_hy), results)]
    found = torch.autograd.grad(results, [inputs[i] for i in wanted], upstream,
                                create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    grads = [None] * len(inputs)
    for i, grad in zip(wanted, found):
        grads[i] = grad
    return grads


def _layer_gradients(cell, grad_output, grad_hy, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                     reverse):
    """``fastrnn::layer_gradients``: the gradients of the inputs that require
    grad through the reference loop (the C++ autograd node's backward under
    create_graph, differentiable, or batched by vmap)."""
    inputs = (x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr)
    needs = [t is not None and t.requires_grad for t in inputs]
    grads = _differentiable_gradients(cell, grad_output, grad_hy, x, hx, w_ih, w_hh, b_ih, b_hh,
                                      w_hr, lengths, reverse, needs)
    return [g for g, need in zip(grads, needs) if need]


_library = torch.library.Library("fastrnn", "IMPL")
_library.impl("layer_gradients", _layer_gradients, "CompositeImplicitAutograd")
# A batched backward (autograd.grad's is_grads_batched, vectorized Jacobians)
# runs it on vmap's batched tensors, whose own fallback cannot take an op
# returning a list: the same plain ops, each with its batching rule.
for _key in ("Batched", "FuncTorchBatched"):
    _library.impl("layer_gradients", _layer_gradients, _key)


def _batched(grads) -> bool:
    """Whether vmap batches any of ``grads`` (a batched backward), whose
    batching the engines' ops have no rule for. Not while torch.compile
    traces backward, which cannot trace the query (nor batch a backward)."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return any(g is not None and (functorch.is_legacy_batchedtensor(g)  # is_grads_batched's
                                  or functorch.is_batchedtensor(g))  # torch.func.vmap's
               for g in grads)


def _gradients(ctx, grad_output: Tensor | None, grad_hy: list) -> tuple:
    """(grad_x, [grad per state], grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr) of the
    layer ``ctx`` saved: the engine's sweep, or under create_graph or in a
    batched backward the reference loop's graph (the C++ node's choice too)."""
    if torch.is_grad_enabled() or _batched((grad_output, *grad_hy)):
        x, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, _, _, *hx = ctx.saved_tensors
        grads = _differentiable_gradients(ctx.cell, grad_output, grad_hy, x, hx, w_ih, w_hh,
                                          b_ih, b_hh, w_hr, lengths, ctx.reverse, ctx.needs)
        return _split(grads, len(hx))
    x, w_ih, w_hh, _, _, w_hr, lengths, output, workspace, *hx = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(output)
    grad_hy = [torch.zeros(h.shape, dtype=output.dtype, device=output.device) if g is None else g
               for g, h in zip(grad_hy, hx)]
    with _below_autograd():
        grad_x, grad_hx, *weights = _op(ctx.family[1])(
            ctx.cell, grad_output, grad_hy, x, hx, w_ih, w_hh, w_hr, output, workspace, lengths,
            ctx.reverse, ctx.needs[0], any(ctx.needs[1:1 + len(hx)]), ctx.strategy)
    grads = [g if need else None for g, need in zip((grad_x, *grad_hx, *weights), ctx.needs)]
    return _split(grads, len(hx))


def _save(ctx, cell, family, strategy, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
          output, workspace, needs) -> None:
    """Keeps what backward reads, for the Function and the ops' own registration alike."""
    ctx.mark_non_differentiable(workspace)
    ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, workspace, *hx)
    ctx.cell, ctx.family, ctx.strategy, ctx.reverse = cell, family, strategy, reverse
    # An input that is None gets no gradient, whatever autograd asks for (a
    # traced backward may ask for all).
    inputs = (x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr)
    ctx.needs = tuple(need and t is not None for need, t in zip(needs, inputs))
    ctx.states = len(hx)
    # Otherwise autograd would hand backward a zero gradient as large as the
    # workspace; the ones it needs are made in backward when unused.
    ctx.set_materialize_grads(False)


class LayerFunction(torch.autograd.Function):
    """One layer of any cell: ``apply(cell, family, strategy, x, w_ih, w_hh, b_ih, b_hh,
    w_hr, lengths, reverse, *hx)`` with ``family`` from ``family()``.

    x is (T, B, I) time-major, the states as many as the cell has (h (B,
    H_out), then (B, H) each); b_ih/b_hh may be None, and w_hr (P, H) is the
    projection of a cell that projects, else None; lengths is None or an
    int64 CPU tensor (B,);
    positions past a sequence's length must hold finite values and come out
    as zeros. Returns (output, workspace, *h_n), in x's dtype, or in float32
    for half-precision x on the Triton engine (the state it kept;
    ``fastrnn.functional`` narrows them); the workspace holds what backward
    reads and is not differentiable. Forward and ``setup_context`` are
    separate, as torch.func asks of a Function (torch.compile traces it).
    """

    # forward takes *inputs: Function.apply binds its arguments to forward's
    # signature on every call, which costs a few microseconds per named parameter.
    @staticmethod
    def forward(*inputs):
        """Runs the engine's time loop, keeping what backward reads."""
        cell, family, strategy, x, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, *hx = inputs
        with _below_autograd():
            output, h_n, workspace = _op(family[0])(cell, x, list(hx), w_ih, w_hh, b_ih, b_hh,
                                                    w_hr, lengths, reverse, True, strategy)
        return (output, workspace, *h_n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Saves what the backward sweep reads."""
        cell, family, strategy, x, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, *hx = inputs
        needs = ctx.needs_input_grad
        needs = (needs[X], *needs[STATES:], *needs[W_IH:W_HR + 1])
        _save(ctx, cell, family, strategy, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
              output[0], output[1], needs)

    @staticmethod
    def backward(ctx, grad_output, _grad_workspace, *grad_hy):
        """The engine's backward-through-time sweep, then the weight GEMMs
        (under create_graph: the reference loop's differentiable graph)."""
        grad_x, grad_hx, *grad_weights = _gradients(ctx, grad_output, grad_hy)
        return (None, None, None, grad_x, *grad_weights, None, None, *grad_hx)


# For that binding inspect.signature would rebuild forward's signature on
# every call, about 20 us, more than a small layer's whole step: built once here.
LayerFunction.forward.__signature__ = inspect.signature(LayerFunction.forward)


def _eager() -> bool:
    """Neither torch.compile nor a torch.func transform is tracing: the first
    traces ``LayerFunction`` and the ops by name; under the second the
    layers run the reference loop (``fastrnn.functional``)."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _records(x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih, b_hh,
             w_hr) -> bool:
    """Whether autograd records a layer over these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, w_ih, w_hh, b_ih, b_hh, w_hr, *hx))


def _cpp_forward(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
                 b_ih, b_hh, w_hr, lengths, reverse: bool, save_workspace: bool | None):
    """The C++ engine's forward op in eager mode: (output, h_n, workspace).
    Its C++ autograd kernel records the layer's node when an input requires
    grad, and passes other calls straight down. ``save_workspace`` None
    keeps the workspace where the node is recorded. Called through the
    extension's unboxed entry point unless a tensor or mode overrides
    ``__torch_function__``, which only torch.ops honours."""
    args = [cell, x, list(hx), w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save_workspace,
            settings.triton_strategy]
    if torch._C._has_torch_function((x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)):
        if save_workspace is None:
            args[10] = _records(x, hx, w_ih, w_hh, b_ih, b_hh, w_hr)
        return _op(ops.DISPATCHED[0])(*args)
    return cpp.layer_forward(*args)


def cpp_step(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor, ...] | None:
    """The states after one step of ``cell`` on a (B, I) input, from the C++
    engine's forward op over it as a length-1 sequence, in one call to the
    extension (its C++ node records the step where an input requires grad);
    None where that call does not serve: under torch.compile or torch.func,
    under autocast (``functional.layer`` casts), under a
    ``__torch_function__`` mode, or where the call is not a plain one
    (``fastrnn._C.plain_step``: plain tensors on the CPU, sized as the
    weights expect; a tensor subclass, which may override
    ``__torch_function__``, is not plain)."""
    if not plain_calls():
        return None
    return cpp.plain_step(cell, x, hx, w_ih, w_hh, b_ih, b_hh, settings.triton_strategy)


def cpp_layers(cell: str, x: Tensor, hx: tuple[Tensor, ...], weights, num_layers: int,
               bidirectional: bool, projects: bool) -> tuple[Tensor, tuple[Tensor, ...]] | None:
    """``functional.recurrent_layers`` without dropout or lengths in one call
    to the extension, each layer the forward op's call (and node) as
    ``run`` makes it: (output, final states); None where that call does not
    serve, as for ``cpp_step`` (``fastrnn._C.plain_layers``)."""
    if not plain_calls():
        return None
    return cpp.plain_layers(cell, x, hx, weights, num_layers, bidirectional, projects,
                            settings.triton_strategy)


def plain_calls() -> bool:
    """Whether the extension's checks of a plain call (``fastrnn._C.plain_step``,
    ``plain_states`` and ``plain_layers``) may stand for the callers' own: in
    eager mode, with no autocast (which changes dtypes and torch.nn's checks)
    and no ``__torch_function__`` mode (the extension honours none)."""
    return (_eager() and not torch._C._is_any_autocast_enabled()
            and not torch._C._is_torch_function_mode_enabled())


def run(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
        b_ih: Tensor | None, b_hh: Tensor | None, lengths: Tensor | None, reverse: bool,
        engine: str, w_hr: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(output, h_n) of one layer on ``engine``: ``layer`` where autograd
    records it, else ``inference``. On the C++ engine in eager mode both
    are one call of the forward op, whose C++ autograd kernel tells them
    apart."""
    if engine == "cpp" and _eager():
        output, h_n, _ = _cpp_forward(cell, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                      None)
        return output, tuple(h_n)
    if _records(x, hx, w_ih, w_hh, b_ih, b_hh, w_hr):
        return layer(cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, engine, w_hr)
    return inference(cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, engine, w_hr)


def layer(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
          b_ih: Tensor | None, b_hh: Tensor | None, lengths: Tensor | None, reverse: bool,
          engine: str | None = None, w_hr: Tensor | None = None
          ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(output, h_n) of one layer through ``LayerFunction`` on ``engine``
    (default: the one the backend setting picks for x's device), or in eager
    mode on the C++ engine through the forward op's own C++ autograd node
    (``csrc/autograd.cpp``), which computes the same at a fraction of the
    Python Function's cost per call."""
    engine = backends.resolve(x.device) if engine is None else engine
    if engine == "cpp" and _eager():
        output, h_n, _ = _cpp_forward(cell, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                      True)
        return output, tuple(h_n)
    output, _, *h_n = LayerFunction.apply(cell, family(engine, x.device), settings.triton_strategy,
                                          x, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, *hx)
    return output, tuple(h_n)


def inference(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None, b_hh: Tensor | None, lengths: Tensor | None, reverse: bool,
              engine: str, w_hr: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(output, h_n) of one layer that nothing will differentiate: the forward
    op alone, below its autograd kernels, saving no workspace (eager C++
    layers never come here: ``run`` calls the op itself)."""
    with _below_autograd():
        output, h_n, _ = _op(family(engine, x.device)[0])(
            cell, x, list(hx), w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, False,
            settings.triton_strategy)
    return output, tuple(h_n)


def _op_setup_context(ctx, inputs, output):
    cell, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save_workspace, strategy = inputs
    torch._check(save_workspace, lambda: "fastrnn: differentiating a layer op needs "
                 "save_workspace=True (the workspace is what its backward reads)")
    needs = ctx.needs_input_grad
    hx_needs = needs[2] if isinstance(needs[2], (list, tuple)) else [needs[2]] * len(hx)
    needs = (needs[1], *hx_needs, *needs[3:8])
    _save(ctx, cell, ctx.family_for_op, strategy, x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
          reverse, output[0], output[2], needs)


def _register(names: tuple[str, str]) -> None:
    """Gives the layer ops themselves the Function's gradients, for callers of
    ``torch.ops.fastrnn.*`` (the modules go through ``LayerFunction``, or
    on the CPU in eager mode through the op itself). On CPU tensors the C++
    engine's own autograd kernel (``csrc/autograd.cpp``) serves
    ``layer_forward`` instead: the dispatcher prefers it to this one."""

    def setup_context(ctx, inputs, output):
        ctx.family_for_op = names
        _op_setup_context(ctx, inputs, output)

    def forward_backward(ctx, grad_output, grad_hy, _grad_workspace):
        if grad_hy is None:
            grad_hy = [None] * ctx.states
        grad_x, grad_hx, *grad_weights = _gradients(ctx, grad_output, list(grad_hy))
        return (None, grad_x, list(grad_hx), *grad_weights, None, None, None, None)

    def backward_backward(ctx, *grads):
        raise RuntimeError(f"fastrnn::{names[1]} is not differentiable: differentiate the "
                           "layer's outputs with create_graph=True instead")

    torch.library.register_autograd("fastrnn::" + names[0], forward_backward,
                                    setup_context=setup_context)
    torch.library.register_autograd("fastrnn::" + names[1], backward_backward)


for _names in (ops.DISPATCHED, ops.INTERPRETED):
    _register(_names)
