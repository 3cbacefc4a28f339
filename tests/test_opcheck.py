"""``torch.library.opcheck`` on every engine op: schema (no mutation or
aliasing it does not declare), fake (meta) implementation against the real
one, and autograd registration, with and without per-sequence lengths."""

import pytest
import torch

import fastrnn
from conftest import TRITON_DEVICE, requires_triton

T, B, I, H = 3, 2, 3, 4


def layer_args(gates, lengths, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(T, B, I), (B, H), (gates * H, I), (gates * H, H), (gates * H,), (gates * H,)]
    tensors = [torch.randn(s, dtype=torch.float32, generator=generator).to(device) for s in shapes]
    return (*tensors, None if lengths is None else torch.tensor(lengths), False)


def op_cases(ops, device, settings):
    """(name, op, args) for each forward and backward op of both cells."""
    cases = []
    for lengths in (None, [3, 1]):
        tag = "lengths" if lengths else "full"
        rnn = layer_args(1, lengths, device)
        output, h_n = ops.rnn_forward(*rnn, False, *settings)
        upstream = (torch.randn_like(output), torch.randn_like(h_n))
        x, h0, w_ih, w_hh, _, _, lens, reverse = rnn
        cases += [(f"rnn_forward-{tag}", ops.rnn_forward, (*rnn, False, *settings)),
                  (f"rnn_backward-{tag}", ops.rnn_backward,
                   (*upstream, x, h0, w_ih, w_hh, output, lens, reverse, False, True, *settings))]
        gru = layer_args(3, lengths, device, seed=1)
        output, h_n, workspace = ops.gru_forward(*gru, *settings)
        x, h0, w_ih, w_hh, _, _, lens, reverse = gru
        cases += [(f"gru_forward-{tag}", ops.gru_forward, (*gru, *settings)),
                  (f"gru_backward-{tag}", ops.gru_backward,
                   (torch.randn_like(output), torch.randn_like(h_n), x, h0, w_ih, w_hh, output, workspace,
                    lens, reverse, True, *settings))]
    return cases


def cpp_cases():
    if not fastrnn.cpp.available():
        return []
    return op_cases(torch.ops.fastrnn, "cpu", ())


def triton_cases():
    if fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None:
        return []
    import fastrnn.triton.engine as engine

    return op_cases(engine, TRITON_DEVICE, ("auto",))


@pytest.mark.parametrize("name,op,args", [pytest.param(*c, id=c[0]) for c in cpp_cases()])
def test_cpp_op(name, op, args):
    torch.library.opcheck(op, args)


@requires_triton
@pytest.mark.cuda
@pytest.mark.parametrize("name,op,args", [pytest.param(*c, id=c[0]) for c in triton_cases()])
def test_triton_op(name, op, args):
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
def test_cpp_gru_forward_without_workspace():
    torch.library.opcheck(torch.ops.fastrnn.gru_forward, layer_args(3, [3, 1], "cpu"),
                          {"save_workspace": False})
