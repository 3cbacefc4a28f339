"""bfloat16 and float16 modules: the C++ engine computes them in float32.

The result must therefore sit within one low-precision rounding of the
float32 computation with the same weights (torch.nn, which rounds after
every operation, is no tighter reference here).
"""

import pytest
import torch

import fastrnn
from conftest import ALL_MODULE_KINDS as KINDS
from conftest import PROJ_SIZE, flatten_outputs, forward_backward

CELLS = [(torch.nn.RNN, fastrnn.RNN), (torch.nn.GRU, fastrnn.GRU)]
# LSTMs: (classes, constructor kwargs)
LSTMS = {"LSTM": ((torch.nn.LSTM, fastrnn.LSTM), {}),
         "LSTM_proj": ((torch.nn.LSTM, fastrnn.LSTM), {"proj_size": PROJ_SIZE})}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("classes", CELLS, ids=["RNN", "GRU"])
def test_low_precision_tracks_float32(classes, dtype):
    torch_cls, fast_cls = classes
    torch.manual_seed(0)
    exact = torch_cls(6, 16, num_layers=2, bidirectional=True)
    low = fast_cls(6, 16, num_layers=2, bidirectional=True)
    low.load_state_dict(exact.state_dict())
    low.to(dtype)
    x = torch.randn(12, 3, 6)
    x_low = x.to(dtype).requires_grad_()
    output, h_n = low(x_low)
    assert output.dtype == dtype and h_n.dtype == dtype
    (output.float().sum() + h_n.float().sum()).backward()

    # float32 on the weights and input as rounded to the low precision
    exact.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x_exact = x_low.detach().float().requires_grad_()
    ref_output, ref_h_n = exact(x_exact)
    (ref_output.sum() + ref_h_n.sum()).backward()

    rounding = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(output.float(), ref_output, rtol=rounding, atol=rounding)
    torch.testing.assert_close(h_n.float(), ref_h_n, rtol=rounding, atol=rounding)
    torch.testing.assert_close(x_low.grad.float(), x_exact.grad, rtol=rounding, atol=rounding)
    for (name, p), q in zip(low.named_parameters(), exact.parameters()):
        assert p.grad.dtype == dtype, name
        torch.testing.assert_close(p.grad.float(), q.grad, rtol=rounding, atol=rounding * 10,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", list(LSTMS))
def test_low_precision_lstm_tracks_float32(kind, dtype):
    # As above, for an LSTM's output, h_n and c_n, given (h_0, c_0) too.
    (torch_cls, fast_cls), kwargs = LSTMS[kind]
    torch.manual_seed(0)
    exact = torch_cls(6, 16, num_layers=2, bidirectional=True, **kwargs)
    low = fast_cls(6, 16, num_layers=2, bidirectional=True, **kwargs)
    low.load_state_dict(exact.state_dict())
    low.to(dtype)
    x = torch.randn(12, 3, 6)
    hx = (torch.randn(4, 3, kwargs.get("proj_size", 0) or 16), torch.randn(4, 3, 16))
    x_low = x.to(dtype).requires_grad_()
    hx_low = tuple(h.to(dtype).requires_grad_() for h in hx)
    outputs = flatten_outputs(low(x_low, hx_low))
    assert [t.dtype for t in outputs] == [dtype] * 3
    sum(t.float().sum() for t in outputs).backward()

    exact.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x_exact = x_low.detach().float().requires_grad_()
    hx_exact = tuple(h.detach().float().requires_grad_() for h in hx_low)
    expected = flatten_outputs(exact(x_exact, hx_exact))
    sum(t.sum() for t in expected).backward()

    rounding = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=rounding, atol=rounding)
    for got, want in zip([x_low, *hx_low], [x_exact, *hx_exact]):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=rounding, atol=rounding)
    for (name, p), q in zip(low.named_parameters(), exact.parameters(), strict=True):
        assert p.grad.dtype == dtype, name
        torch.testing.assert_close(p.grad.float(), q.grad, rtol=rounding, atol=rounding * 10,
                                   msg=name)


@pytest.mark.usefixtures("intra_op_threads")  # see conftest
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_long_sequence_does_not_drift(kind, dtype):
    # The state stays float32 over 2000 steps: each output is the float32
    # computation rounded once (within one rounding of it, 1 eps relative),
    # where a state rounded every step would stray by several eps.
    torch_cls, fast_cls, kwargs = KINDS[kind]
    steps, batch, input_size, hidden = 2000, 2, 4, 8
    torch.manual_seed(0)
    reference = torch_cls(input_size, hidden, **kwargs)
    candidate = fast_cls(input_size, hidden, dtype=dtype, **kwargs)
    rounded = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    candidate.load_state_dict(rounded)
    reference.load_state_dict({k: v.float() for k, v in rounded.items()})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, input_size, generator=gen).to(dtype)
    if torch_cls is torch.nn.LSTM:  # (h_0, c_0); h_0 proj_size wide with a projection
        width = kwargs.get("proj_size", 0) or hidden
        hx = (torch.randn(1, batch, width, generator=gen).to(dtype),
              torch.randn(1, batch, hidden, generator=gen).to(dtype))
    else:
        hx = torch.randn(1, batch, hidden, generator=gen).to(dtype)
    got = forward_backward(candidate, x, hx)
    # The same upstream gradients as the half-precision run draws.
    hx_float = tuple(h.float() for h in hx) if isinstance(hx, tuple) else hx.float()
    expected = forward_backward(reference, x.float(), hx_float, upstream_dtype=dtype)
    eps = torch.finfo(dtype).eps
    for key, value in expected.items():
        assert got[key].dtype == dtype, key
        # Outputs: elementwise. Gradients are float32 sums over 2000 steps,
        # rounded once: relative to their largest entry.
        atol = 1e-5 if key in ("output", "h_n", "c_n") else eps * value.abs().max().item()
        torch.testing.assert_close(got[key].float(), value, rtol=eps, atol=atol,
                                   msg=lambda default, key=key: f"{key}: {default}")
