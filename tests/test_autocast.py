"""Modules under torch.autocast run in the low-precision dtype, like cuDNN's.

Inputs, state and weights are rounded to the autocast dtype, the engines
keep float32 state and accumulation, and the outputs come back in that
dtype while the parameters and their gradients stay float32. The reference
is the float32 torch.nn module on the same rounded weights and input, so
the results must agree within the rounding of the autocast dtype (each
layer's output is rounded once more before the next layer reads it).
"""

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import PROJ_SIZE, TOLERANCES, TRITON_DEVICE, flatten_outputs, needs_cuda, requires_triton

MODULES = {"RNN": (nn.RNN, fastrnn.RNN), "GRU": (nn.GRU, fastrnn.GRU)}
# The LSTMs: (classes, constructor kwargs).
LSTMS = {"LSTM": ((nn.LSTM, fastrnn.LSTM), {}),
         "LSTM_proj": ((nn.LSTM, fastrnn.LSTM), {"proj_size": PROJ_SIZE})}
# Every layered module, as LSTMS.
ALL_MODULES = {**{kind: (classes, {}) for kind, classes in MODULES.items()}, **LSTMS}
CELLS = {"RNNCell": (nn.RNNCell, fastrnn.RNNCell), "GRUCell": (nn.GRUCell, fastrnn.GRUCell),
         "LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell)}


def _leaves(hx, convert=lambda t: t):
    """Fresh leaves of ``convert(hx)``: one tensor, or a tuple's (an LSTM's (h, c))."""
    if isinstance(hx, tuple):
        return tuple(convert(h).clone().requires_grad_() for h in hx)
    return convert(hx).clone().requires_grad_()


def _check(classes, args, x, device_type, dtype, hx=None, **kwargs):
    torch_cls, fast_cls = classes
    torch.manual_seed(0)
    fast = fast_cls(*args, **kwargs).to(x.device)
    exact = torch_cls(*args, **kwargs).to(x.device)
    exact.load_state_dict({k: v.to(dtype).float() for k, v in fast.state_dict().items()})

    # A float32 initial state given under autocast is rounded like the input.
    hx_fast = None if hx is None else _leaves(hx)
    x_fast = x.clone().requires_grad_()
    with torch.autocast(device_type, dtype=dtype):
        outputs = flatten_outputs(fast(x_fast, hx_fast))
    assert all(out.dtype == dtype for out in outputs)
    sum(out.float().sum() for out in outputs).backward()

    x_exact = x.to(dtype).float().requires_grad_()
    hx_exact = None if hx is None else _leaves(hx, lambda h: h.to(dtype).float())
    expected = flatten_outputs(exact(x_exact, hx_exact))
    sum(out.sum() for out in expected).backward()

    tol = TOLERANCES[dtype]
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(x_fast.grad, x_exact.grad, **tol)
    if hx is not None:
        for got, want in zip(flatten_outputs(hx_fast), flatten_outputs(hx_exact), strict=True):
            assert got.grad.dtype == torch.float32
            torch.testing.assert_close(got.grad, want.grad, **tol)
    for (name, p), q in zip(fast.named_parameters(), exact.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        # Weight gradients sum over every step and sequence.
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=name)


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_cpu_bfloat16_modules(kind, hx_given):
    hx = torch.randn(4, 3, 16) if hx_given else None
    _check(MODULES[kind], (6, 16), torch.randn(12, 3, 6), "cpu", torch.bfloat16, hx=hx,
           num_layers=2, bidirectional=True)


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("kind", sorted(LSTMS))
def test_cpu_bfloat16_lstm(kind, hx_given):
    classes, kwargs = LSTMS[kind]
    width = kwargs.get("proj_size", 0) or 16
    hx = (torch.randn(4, 3, width), torch.randn(4, 3, 16)) if hx_given else None
    _check(classes, (6, 16), torch.randn(12, 3, 6), "cpu", torch.bfloat16, hx=hx,
           num_layers=2, bidirectional=True, **kwargs)


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cpu_bfloat16_cells(kind, hx_given):
    hx = torch.randn(3, 16) if hx_given else None
    if hx_given and kind == "LSTMCell":
        hx = (hx, torch.randn(3, 16))
    _check(CELLS[kind], (6, 16), torch.randn(3, 6), "cpu", torch.bfloat16, hx=hx)


def test_cpu_gru_differs_from_torch_nn_as_documented():
    # On CPU torch.nn's GRU, GRUCell and LSTMCell stay float32 under autocast
    # while its RNN, RNNCell and LSTM run in bfloat16; fastrnn runs all of
    # them in bfloat16 (README, "Notes and limits"). This pins the
    # difference the README states.
    x = torch.randn(4, 2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, torch_dtype in [("GRU", torch.float32), ("RNN", torch.bfloat16),
                                  ("LSTM", torch.bfloat16), ("GRUCell", torch.float32),
                                  ("LSTMCell", torch.float32), ("RNNCell", torch.bfloat16)]:
            inputs = x[0] if name.endswith("Cell") else x
            assert flatten_outputs(getattr(nn, name)(6, 8)(inputs))[0].dtype == torch_dtype
            assert flatten_outputs(getattr(fastrnn, name)(6, 8)(inputs))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", sorted(ALL_MODULES) + sorted(CELLS))
def test_float64_stays_float64_and_mixed_dtypes_fail_as_torch_nn(kind, bias):
    # Autocast never casts float64: a float64 model runs in float64 with
    # torch.nn's numbers. Where a float64 tensor meets a float32 one that
    # autocast rounds, torch.nn's first product fails (x W_ih^T, then
    # h W_hh^T; addmm with a bias, mm without); so does fastrnn's layer,
    # with the same message.
    is_cell = kind in CELLS
    torch_cls, fast_cls = CELLS[kind] if is_cell else ALL_MODULES[kind][0]
    kwargs = {"bias": bias, **({} if is_cell else ALL_MODULES[kind][1])}
    torch.manual_seed(0)
    reference = torch_cls(6, 8, dtype=torch.float64, **kwargs)
    model = fast_cls(6, 8, dtype=torch.float64, **kwargs)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(*(() if is_cell else (4,)), 2, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = flatten_outputs(model(x)), flatten_outputs(reference(x))
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])

    width = kwargs.get("proj_size", 0) or 8
    state = torch.randn(*(() if is_cell else (1,)), 2, width)  # float32, rounded by autocast
    hx = (state, torch.randn(state.shape[:-1] + (8,))) if "LSTM" in kind else state
    for m in (model, reference):
        m.float()
    # A float64 input to a float32 model; a float64 initial state with a float32 input.
    cases = [(x, None), (x.float(), (hx[0].double(), hx[1]) if isinstance(hx, tuple) else hx.double())]
    for inputs in cases:
        messages = []
        for m in (model, reference):
            with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as error:
                m(*[t for t in inputs if t is not None])
            messages.append(str(error.value))
        if "LSTM" not in kind:  # torch.nn's LSTM fails in oneDNN, with messages of its own
            assert messages[0] == messages[1]


def test_autocast_off_inside_keeps_float32():
    torch.manual_seed(0)
    gru = fastrnn.GRU(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            output, h_n = gru(torch.randn(4, 2, 6))
    assert output.dtype == h_n.dtype == torch.float32


@pytest.mark.parametrize("proj_size", [0, PROJ_SIZE], ids=["LSTM", "LSTM_proj"])
def test_autocast_off_inside_keeps_float32_lstm(proj_size):
    torch.manual_seed(0)
    lstm = fastrnn.LSTM(6, 16, proj_size=proj_size)
    x = torch.randn(4, 2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for t in flatten_outputs(lstm(x)))
        with torch.autocast("cpu", enabled=False):
            outputs = flatten_outputs(lstm(x))
    assert [t.dtype for t in outputs] == [torch.float32] * 3
    # and the float32 numbers are torch.nn's
    reference = nn.LSTM(6, 16, proj_size=proj_size)
    reference.load_state_dict(lstm.state_dict())
    for got, want in zip(outputs, flatten_outputs(reference(x)), strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@requires_triton
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "LSTM_proj"])
def test_triton_engine_bfloat16(kind):
    """The Triton engine under autocast (on CPU: the interpreter)."""
    classes, kwargs = ALL_MODULES[kind]
    x = torch.randn(7, 3, 6, device=TRITON_DEVICE)
    with fastrnn.use_backend("triton"):
        _check(classes, (6, 16), x, TRITON_DEVICE.type, torch.bfloat16, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(ALL_MODULES))
@pytest.mark.cuda
@needs_cuda
def test_cuda_modules(kind, dtype):
    classes, kwargs = ALL_MODULES[kind]
    _check(classes, (6, 64), torch.randn(50, 8, 6, device="cuda"), "cuda", dtype,
           num_layers=2, bidirectional=True, **kwargs)
