"""Extreme values: weights and inputs scaled by 1e4, Inf and NaN in the input
and the initial state, states overflowing at the end of a packed sequence,
and an infinite initial state of a length-0 sequence.

Every result is compared with torch.nn's (with torch.nn's own accuracy for
the ill-conditioned cases), NaN and infinities where torch.nn has them, on
both engines and, for the Triton engine, every strategy; LSTM with and
without proj_size, with Inf and NaN in h_0 and in c_0 too.
"""

import copy
import importlib

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from conftest import (
    ALL_MODULE_KINDS,
    CELL_KINDS,
    KINDS,
    LSTM_CELL_KINDS,
    LSTM_KINDS,
    PROJ_SIZE,
    TOLERANCES,
    TRITON_DEVICE,
    assert_close,
    device_param,
    forward_backward,
    make_pair,
    make_state,
)

I, H, B, T = 5, 6, 3, 4
LAYERS = 2

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest


def assert_matches_torch(got, expected, dtype, exact=None):
    """Every entry of two forward_backward results equal within dtype's
    tolerance, NaN where torch.nn has NaN and nowhere else, same infinities.

    With ``exact`` (torch.nn's results in float64), ill-conditioned cases are
    judged against torch.nn's own accuracy: an entry may differ from
    torch.nn's float32 result by up to EXACT_ERROR_FACTOR times the largest
    error that result has. (Seen: the C++ engine within 1.9x of torch.nn's
    error, the Triton engine's GRU within 3.9x: its exp-based gates round
    differently where they saturate. A wrong formula is off by O(1).)
    Entries whose exact value lies beyond dtype's range are not compared:
    there both results are overflow artifacts (inf, NaN, or 0 after a ReLU)
    whose form depends on the order of the sums (seen: torch.nn NaN, the
    Triton tile kernel inf, where the exact value is 4e39). Where the exact
    forward itself leaves dtype's range, the gradients flow through those
    artifacts (a ReLU passes inf, blocks NaN) and only the outputs are
    compared.
    """
    assert sorted(got) == sorted(expected)
    keys = list(expected)
    # An LSTM's forward results include c_n.
    forward_keys = [k for k in ("output", "h_n", "c_n") if k in expected]
    if exact is not None and any(exact[k].abs().max() > torch.finfo(dtype).max for k in forward_keys):
        keys = forward_keys
    for key in keys:
        value = expected[key]
        tol = dict(TOLERANCES[dtype])
        finite = value[torch.isfinite(value)]
        if finite.numel():
            tol["atol"] *= max(1.0, finite.abs().max().item())
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        actual = got[key]
        if exact is not None:
            overflows = exact[key].abs() > torch.finfo(dtype).max
            actual = torch.where(overflows, value, actual)
            truth = exact[key].to(dtype)
            both = torch.isfinite(value) & torch.isfinite(truth)
            if both.any():
                torch_error = (value[both].double() - exact[key][both]).abs().max().item()
                tol["atol"] = max(tol["atol"], EXACT_ERROR_FACTOR * torch_error)
        torch.testing.assert_close(actual, value, equal_nan=True, **tol,
                                   msg=lambda default, key=key: f"{key}: {default}")


def scale_parameters(modules, pattern, factor):
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if pattern in name:
                    p.mul_(factor)


def put(t, index, value):
    t = t.clone()
    t[index] = value
    return t


INF, NAN = float("inf"), float("nan")

# case -> function (modules, x, hx) -> (x, hx), possibly scaling the modules' weights.
EXTREME_CASES = {
    "weight_ih_x1e4": lambda m, x, hx: (scale_parameters(m, "weight_ih", 1e4), (x, hx))[1],
    "weight_hh_x1e4": lambda m, x, hx: (scale_parameters(m, "weight_hh", 1e4), (x, hx))[1],
    "input_x1e4": lambda m, x, hx: (x * 1e4, hx),
    "input_minus_x1e4": lambda m, x, hx: (-x.abs() * 1e4, hx),
    "input_pos_inf": lambda m, x, hx: (put(x, (2, 1, 0), INF), hx),
    "input_neg_inf": lambda m, x, hx: (put(x, (3, 0, 2), -INF), hx),
    "input_nan": lambda m, x, hx: (put(x, (2, 1, 0), NAN), hx),
    "hx_pos_inf": lambda m, x, hx: (x, put(hx, (0, 1, 0), INF)),
    "hx_neg_inf": lambda m, x, hx: (x, put(hx, (1, 2, 3), -INF)),
    "hx_nan": lambda m, x, hx: (x, put(hx, (1, 2, 3), NAN)),
}


# Weights scaled by 1e4 amplify rounding by as much in the gradients: float32
# results there are compared as accurate as torch.nn's own (see
# assert_matches_torch).
ILL_CONDITIONED = {"weight_ih_x1e4", "weight_hh_x1e4"}
EXACT_ERROR_FACTOR = 8
# Each case's Inf/NaN positions lie inside every sequence of PACKED_LENGTHS.
PACKED_LENGTHS = [6, 4, 5]
LAYOUTS = {"stacked": {}, "bidirectional_packed": {"bidirectional": True}}
TRITON_STRATEGIES = ["tile", "split", "stepwise"]


def triton_strategy(name):
    """``fastrnn.triton.use_strategy(name)``, imported where triton is."""
    return importlib.import_module("fastrnn.triton").use_strategy(name)


def in_h(index, value):
    """An LSTM case: ``value`` at ``index`` of h_0."""
    return lambda m, x, hx: (x, (put(hx[0], index, value), hx[1]))


def in_c(index, value):
    """An LSTM case: ``value`` at ``index`` of c_0."""
    return lambda m, x, hx: (x, (hx[0], put(hx[1], index, value)))


# EXTREME_CASES for an LSTM, whose hx is (h_0, c_0): the hx cases in h_0 (its
# index 3 within the projection's 5), and the same in c_0.
LSTM_EXTREME_CASES = {
    **{name: case for name, case in EXTREME_CASES.items() if not name.startswith("hx_")},
    "hx_pos_inf": in_h((0, 1, 0), INF),
    "hx_neg_inf": in_h((1, 2, 3), -INF),
    "hx_nan": in_h((1, 2, 3), NAN),
    "cx_pos_inf": in_c((0, 1, 0), INF),
    "cx_neg_inf": in_c((1, 2, 3), -INF),
    "cx_nan": in_c((1, 2, 3), NAN),
}
# An LSTM's inputs scaled by 1e4 are ill-conditioned too: its weight_ih
# gradients sum terms 1e4 times their size (seen, LSTM_proj, packed: torch.nn
# float32 off the float64 result by 1.2e-3, the reference loop by 4e-5).
LSTM_ILL_CONDITIONED = ILL_CONDITIONED | {"input_x1e4", "input_minus_x1e4"}


def run_extreme_case(kind, dtype, case, layout, device="cpu"):
    torch_cls, fast_cls, kwargs = ALL_MODULE_KINDS[kind]
    extra = LAYOUTS[layout]
    directions = 2 if extra.get("bidirectional") else 1
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, dtype=dtype,
                                     **kwargs, **extra)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, B, I, dtype=dtype, generator=gen)
    hx = make_state(kind, (LAYERS * directions, B), dtype, gen, hidden=H)
    cases = LSTM_EXTREME_CASES if kind in LSTM_KINDS else EXTREME_CASES
    x, hx = cases[case]([reference, candidate], x, hx)
    lengths = PACKED_LENGTHS if layout == "bidirectional_packed" else None
    expected = forward_backward(reference, x, hx, lengths=lengths)
    got = on_cpu(forward_backward(candidate.to(device), x, hx, lengths=lengths))
    exact = None
    ill_conditioned = LSTM_ILL_CONDITIONED if kind in LSTM_KINDS else ILL_CONDITIONED
    if dtype == torch.float32 and case in ill_conditioned:
        hx = tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double()
        exact = forward_backward(copy.deepcopy(reference).double(), x.double(), hx,
                                 lengths=lengths, upstream_dtype=dtype)
    assert_matches_torch(got, expected, dtype, exact)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(EXTREME_CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@device_param
def test_extreme_values(kind, dtype, case, layout, device):
    run_extreme_case(kind, dtype, case, layout, device)


@pytest.mark.parametrize("kind", list(LSTM_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(LSTM_EXTREME_CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_lstm_extreme_values(kind, dtype, case, layout, backend):
    # On CPU tensors: the C++ engine and the reference loop.
    if backend == "cpp" and not fastrnn.cpp.available():
        pytest.skip("needs the C++ engine")
    with fastrnn.use_backend(backend):
        run_extreme_case(kind, dtype, case, layout)


def on_cpu(result):
    """A forward_backward result with every tensor moved to the CPU."""
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


@pytest.mark.cuda
@pytest.mark.skipif(fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None,
                    reason="the Triton engine cannot run here")
@pytest.mark.parametrize("kind,case", [(kind, case) for kind in KINDS for case in EXTREME_CASES]
                         + [(kind, case) for kind in LSTM_KINDS for case in LSTM_EXTREME_CASES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
def test_extreme_values_triton_engine(kind, case, layout, strategy):
    # Through the Triton interpreter on CPU (on the GPU where there is one),
    # against torch.nn itself, every strategy, packed and reversed too: its
    # exp-based tanh and sigmoid must saturate and propagate NaN as
    # torch.nn's do.
    with fastrnn.use_backend("triton"), triton_strategy(strategy):
        run_extreme_case(kind, torch.float32, case, layout, TRITON_DEVICE.type)


def overflow_at_end_case(dtype, bidirectional):
    """A ReLU RNN whose state overflows to inf at the last step of a shorter
    packed sequence (in each direction), and its input."""
    big = 1e30 if dtype == torch.float32 else 1e300
    reference, candidate = make_pair(nn.RNN, fastrnn.RNN, 1, 1, nonlinearity="relu", dtype=dtype,
                                     bidirectional=bidirectional)
    with torch.no_grad():
        for m in (reference, candidate):
            for name, p in m.named_parameters():
                p.fill_(1e9 if "weight_ih" in name else big if "weight_hh" in name else 0.0)
    x = torch.zeros(3, 2, 1, dtype=dtype)
    x[0, 1, 0], x[1, 1, 0] = 1.0, 1e-9  # state 1e9, then 1e9 * big = inf (forward; reverse alike)
    return reference, candidate, x


# Cells: (modules, x (B, I), hx (B, H)) -> (x, hx).
CELL_EXTREME_CASES = {
    "weight_hh_x1e4": lambda m, x, hx: (scale_parameters(m, "weight_hh", 1e4), (x, hx))[1],
    "input_x1e4": lambda m, x, hx: (x * 1e4, hx),
    "input_pos_inf": lambda m, x, hx: (put(x, (1, 0), INF), hx),
    "input_neg_inf": lambda m, x, hx: (put(x, (2, 3), -INF), hx),
    "input_nan": lambda m, x, hx: (put(x, (1, 0), NAN), hx),
    "hx_pos_inf": lambda m, x, hx: (x, put(hx, (0, 2), INF)),
    "hx_nan": lambda m, x, hx: (x, put(hx, (2, 5), NAN)),
}


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CELL_EXTREME_CASES))
@device_param
def test_cell_extreme_values(kind, dtype, case, device):
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, I, dtype=dtype, generator=gen)
    hx = torch.randn(B, H, dtype=dtype, generator=gen)
    x, hx = CELL_EXTREME_CASES[case]([reference, candidate], x, hx)
    assert_matches_torch(on_cpu(forward_backward(candidate.to(device), x, hx)),
                         forward_backward(reference, x, hx), dtype)


# LSTMCell: the same with (h, c), Inf and NaN in either.
LSTM_CELL_EXTREME_CASES = {
    **{name: case for name, case in CELL_EXTREME_CASES.items() if not name.startswith("hx_")},
    "hx_pos_inf": in_h((0, 2), INF),
    "hx_nan": in_h((2, 5), NAN),
    "cx_pos_inf": in_c((0, 2), INF),
    "cx_neg_inf": in_c((1, 4), -INF),
    "cx_nan": in_c((2, 5), NAN),
}


@pytest.mark.parametrize("kind", list(LSTM_CELL_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(LSTM_CELL_EXTREME_CASES))
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_lstm_cell_extreme_values(kind, dtype, case, backend):
    if backend == "cpp" and not fastrnn.cpp.available():
        pytest.skip("needs the C++ engine")
    torch_cls, fast_cls, kwargs = LSTM_CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, I, dtype=dtype, generator=gen)
    hx = make_state(kind, (B,), dtype, gen, hidden=H)
    x, hx = LSTM_CELL_EXTREME_CASES[case]([reference, candidate], x, hx)
    with fastrnn.use_backend(backend):
        got = forward_backward(candidate, x, hx)
    assert_matches_torch(got, forward_backward(reference, x, hx), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@device_param
def test_overflow_at_end_of_packed_sequence(dtype, device):
    # A ReLU state that overflows to inf at the last step of a shorter packed
    # sequence: torch.nn's gradients stay finite, so must fastrnn's (the
    # padded steps after it must not contribute 0 * inf).
    reference, candidate, x = overflow_at_end_case(dtype, bidirectional=False)
    expected = forward_backward(reference, x, lengths=[3, 2])
    assert torch.isinf(expected["output"]).any() and torch.isfinite(expected["grad_weight_hh_l0"]).all()
    got = on_cpu(forward_backward(candidate.to(device), x, lengths=[3, 2]))
    assert_matches_torch(got, expected, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None,
                    reason="the Triton engine cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
def test_overflow_at_end_of_packed_sequence_triton_engine(dtype, bidirectional, strategy):
    reference, candidate, x = overflow_at_end_case(dtype, bidirectional)
    expected = forward_backward(reference, x, lengths=[3, 2])
    assert torch.isinf(expected["output"]).any()
    assert all(torch.isfinite(v).all() for k, v in expected.items() if "weight_hh" in k)
    with fastrnn.use_backend("triton"), triton_strategy(strategy):
        got = on_cpu(forward_backward(candidate.to(TRITON_DEVICE), x, lengths=[3, 2]))
    assert_matches_torch(got, expected, dtype)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_zero_length_sequence_in_a_layer(backend, reverse):
    """A length-0 entry (the layer functions accept one; packing does not):
    zero outputs, h_n = h0, the gradient into h0 passed straight through,
    the other sequences untouched. Its h0 is infinite: nothing may multiply
    it into the weight gradient (0 * inf = NaN)."""
    if backend == "triton" and fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None:
        pytest.skip("the Triton engine cannot run here")
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(9)
    x, h0 = torch.randn(T, 3, I, generator=gen, dtype=torch.float64), torch.randn(3, H, generator=gen,
                                                                                   dtype=torch.float64)
    w_ih, w_hh = torch.randn(H, I, generator=gen, dtype=torch.float64), torch.randn(H, H, generator=gen,
                                                                                    dtype=torch.float64)
    h0[1] = float("inf")
    leaves = [t.to(device).requires_grad_() for t in (x, h0, w_ih, w_hh)]
    lengths = torch.tensor([T, 0, 2])
    with fastrnn.use_backend(backend):
        output, h_n = fastrnn.functional.rnn_layer(*leaves, lengths=lengths, reverse=reverse)
    assert torch.equal(output[:, 1].cpu(), torch.zeros(T, H, dtype=torch.float64))
    assert torch.equal(h_n[1].cpu(), h0[1])
    grads = torch.autograd.grad(output.sum() + h_n.sum(), leaves)
    assert torch.equal(grads[1][1].cpu(), torch.ones(H, dtype=torch.float64))
    # the other two sequences as a batch of their own
    keep = torch.tensor([0, 2])
    alone = [leaves[0].detach()[:, keep].requires_grad_(), leaves[1].detach()[keep].requires_grad_(),
             *(t.detach().requires_grad_() for t in leaves[2:])]
    expected_output, expected_h = fastrnn.reference.rnn_layer(*(t.cpu() for t in alone), lengths=lengths[keep],
                                                               reverse=reverse)
    assert_close(output[:, keep].cpu(), expected_output)
    assert_close(h_n[keep].cpu(), expected_h)
    expected_grads = torch.autograd.grad(expected_output.sum() + expected_h.sum(), alone)
    for got, expected in zip(grads[2:], expected_grads[2:]):
        assert_close(got.cpu(), expected)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("proj", [0, PROJ_SIZE], ids=["no_proj", "proj"])
def test_lstm_zero_length_sequence_in_a_layer(backend, reverse, proj):
    """An LSTM layer with a length-0 entry whose h_0 and c_0 are infinite:
    zero outputs, (h_n, c_n) = (h_0, c_0), their gradients passed straight
    through, no NaN in the weight gradients, and the other sequences as
    torch.nn's."""
    if backend == "cpp" and not fastrnn.cpp.available():
        pytest.skip("needs the C++ engine")
    gen = torch.Generator().manual_seed(9)
    K = proj or H

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, h0, c0 = rand(T, 3, I), rand(3, K), rand(3, H)
    weights = [rand(4 * H, I), rand(4 * H, K), rand(4 * H), rand(4 * H)]
    w_hr = rand(proj, H) if proj else None
    h0[1], c0[1] = INF, INF
    leaves = [t.requires_grad_() for t in (x, h0, c0, *weights)]
    if proj:
        leaves.append(w_hr.requires_grad_())
    lengths = torch.tensor([T, 0, 2])
    with fastrnn.use_backend(backend):
        output, (h_n, c_n) = fastrnn.functional.layer("lstm", x, (h0, c0), *weights, lengths=lengths,
                                                      reverse=reverse, w_hr=w_hr)
    assert torch.equal(output[:, 1], torch.zeros(T, K, dtype=torch.float64))
    assert torch.equal(h_n[1], h0[1]) and torch.equal(c_n[1], c0[1])
    grads = torch.autograd.grad(output.sum() + h_n.sum() + c_n.sum(), leaves)
    assert torch.equal(grads[1][1], torch.ones(K, dtype=torch.float64))
    assert torch.equal(grads[2][1], torch.ones(H, dtype=torch.float64))
    assert all(torch.isfinite(g).all() for g in grads[3:])

    # torch.nn over the other two sequences (packed, reversed by flipping
    # each sequence in time), with the same weights.
    keep = torch.tensor([0, 2])
    module = nn.LSTM(I, H, proj_size=proj, dtype=torch.float64)
    with torch.no_grad():
        for name, value in zip(["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                "weight_hr_l0"], [*weights, w_hr]):
            if value is not None:
                getattr(module, name).copy_(value)
    kept_lengths = lengths[keep]
    xs = x.detach()[:, keep]
    if reverse:
        xs = torch.stack([torch.cat([xs[:n, b].flip(0), xs[n:, b]]) for b, n in
                          enumerate(kept_lengths.tolist())], 1)
    xs.requires_grad_()
    states = (h0.detach()[keep].unsqueeze(0).requires_grad_(),
              c0.detach()[keep].unsqueeze(0).requires_grad_())
    packed_out, (ref_h, ref_c) = module(pack_padded_sequence(xs, kept_lengths), states)
    ref_out, _ = pad_packed_sequence(packed_out, total_length=T)
    if reverse:
        ref_out = torch.stack([torch.cat([ref_out[:n, b].flip(0), ref_out[n:, b]]) for b, n in
                               enumerate(kept_lengths.tolist())], 1)
    assert_close(output[:, keep], ref_out)
    assert_close(h_n[keep], ref_h[0])
    assert_close(c_n[keep], ref_c[0])
    expected_grads = torch.autograd.grad(ref_out.sum() + ref_h.sum() + ref_c.sum(),
                                         [*states, *module.parameters()])
    assert_close(grads[1][keep], expected_grads[0][0])
    assert_close(grads[2][keep], expected_grads[1][0])
    for got, expected in zip(grads[3:], expected_grads[2:], strict=True):
        assert_close(got, expected)
