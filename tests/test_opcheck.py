"""``torch.library.opcheck`` on every layer op and cell: schema (no mutation
or aliasing it does not declare), fake (meta) implementation against the
real one, autograd registration (forward inputs require grad, so the check
runs) and the traced forms, with and without per-sequence lengths.

The device-dispatched ops run on the CPU (the C++ kernel) and, where there
is one, the GPU (the Triton kernel); the interpreter's ops run the Triton
kernels on CPU tensors."""

import pytest
import torch

import fastrnn
from fastrnn.cells import CELLS
from fastrnn.ops import DISPATCHED, INTERPRETED

from conftest import on_cuda, requires_triton

T, B, I, H, P = 3, 2, 3, 4, 3

# (id, cell, projection size or 0) of every layer the ops run.
LAYERS = [(name, name, 0) for name in CELLS] + [("lstm_proj", "lstm", P)]


def layer_args(cell, proj, lengths, device, requires_grad, seed=0):
    """The forward op's arguments for one small layer of ``cell`` (with a
    projection of size ``proj`` if > 0)."""
    description = CELLS[cell]
    G = description.gates * H
    generator = torch.Generator().manual_seed(seed)
    K = proj or H
    states = [(B, K)] + [(B, H)] * (len(description.states) - 1)
    shapes = [(T, B, I), (G, I), (G, K), (G,), (G,), *([(P, H)] if proj else []), *states]

    def rand(shape):
        return torch.randn(shape, generator=generator).to(device).requires_grad_(requires_grad)

    x, w_ih, w_hh, b_ih, b_hh, *rest = [rand(s) for s in shapes]
    w_hr = rest.pop(0) if proj else None
    return (cell, x, rest, w_ih, w_hh, b_ih, b_hh, w_hr,
            None if lengths is None else torch.tensor(lengths), False, True, "auto")


def op_cases(names, device):
    """(id, op, args) for the forward and backward op of each cell."""
    forward, backward = (getattr(torch.ops.fastrnn, name).default for name in names)
    cases = []
    for name, cell, proj in LAYERS:
        for lengths in (None, [3, 1]):
            tag = f"{name}-{'lengths' if lengths else 'full'}"
            args = layer_args(cell, proj, lengths, device, requires_grad=True)
            cases.append((f"{names[0]}-{tag}", forward, args))
            plain = layer_args(cell, proj, lengths, device, requires_grad=False)
            output, h_n, workspace = forward(*plain)
            _, x, hx, w_ih, w_hh, _, _, w_hr, lens, reverse, _, strategy = plain
            upstream = [torch.randn_like(h) for h in h_n]
            # Every gradient, and (as when neither x nor the states require
            # grad) the weights' only.
            for wanted, needs in (("all", True), ("weights", False)):
                cases.append((f"{names[1]}-{tag}-{wanted}", backward,
                              (cell, torch.randn_like(output), upstream, x, hx, w_ih, w_hh, w_hr,
                               output, workspace, lens, reverse, needs, needs, strategy)))
        inference = layer_args(cell, proj, [3, 1], device, requires_grad=False)
        cases.append((f"{names[0]}-{name}-inference", forward, (*inference[:10], False, "auto")))
    return cases


def params(names, device, marks=()):
    return [pytest.param(op, args, id=f"{device}-{case}", marks=marks)
            for case, op, args in op_cases(names, device)]


def cases():
    found = []
    if fastrnn.cpp.available():
        found += params(DISPATCHED, "cpu")
    if fastrnn.backends.triton_unavailable_reason(torch.device("cpu")) is None:
        found += params(INTERPRETED, "cpu", marks=[pytest.mark.cuda])
    if torch.cuda.is_available():
        found += params(DISPATCHED, "cuda", marks=on_cuda)
    return found


@pytest.mark.parametrize("op,args", cases())
def test_op(op, args):
    torch.library.opcheck(op, args)


@requires_triton
def test_every_family_is_checked():
    # What the interpreter's ops check here, the GPU's Triton kernels check there.
    names = {p.id.split("-")[1] for p in cases()}
    expected = set(DISPATCHED) if fastrnn.cpp.available() else set()
    if fastrnn.backends.triton_unavailable_reason(torch.device("cpu")) is None:
        expected |= set(INTERPRETED)
    assert names == expected


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
def test_backward_op_is_not_differentiated_silently():
    # Second derivatives come from the reference loop (create_graph=True on
    # the layer's outputs); the backward op itself refuses, rather than
    # returning gradients with no graph behind them.
    plain = layer_args("gru", 0, None, "cpu", requires_grad=False)
    output, h_n, workspace = torch.ops.fastrnn.layer_forward(*plain)
    _, x, hx, w_ih, w_hh, _, _, w_hr, lengths, reverse, _, strategy = plain
    grad_output = torch.randn_like(output, requires_grad=True)
    grads = torch.ops.fastrnn.layer_backward("gru", grad_output, [torch.zeros_like(h_n[0])], x, hx,
                                             w_ih, w_hh, w_hr, output, workspace, lengths, reverse,
                                             True, True, strategy)
    with pytest.raises(RuntimeError, match="not differentiable"):
        grads[2].sum().backward()
