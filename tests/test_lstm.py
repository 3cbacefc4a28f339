"""What is particular to the LSTM: two states, the projection, its errors.

The module and cell grids of test_modules.py and test_cells.py cover LSTM
and LSTMCell (with and without ``proj_size``) against torch.nn; here are
gradcheck and gradgradcheck of its layer Function on the C++ engine (the
Triton engine's are in test_triton.py), each of its three outputs alone on
both engines, the projection's own checks and messages, and its state_dict.
"""

import pytest
import torch
import torch.nn as nn

import fastrnn
import fastrnn.autograd
import fastrnn.reference
from conftest import (BATCH, HIDDEN_SIZE, INPUT_SIZE, LSTM_KINDS, SEQ_LEN, TRITON_DEVICE,
                      assert_results_close, assert_same_exception, forward_backward, make_pair,
                      make_state, requires_triton)

needs_cpp = pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
lstm_kind = pytest.mark.parametrize("kind", list(LSTM_KINDS))


def layer_args(proj, bias, lengths, seed=5, T=4, B=3, I=3, H=4):
    """float64 leaves (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) of one LSTM layer."""
    generator = torch.Generator().manual_seed(seed)
    K = proj or H

    def rand(*shape):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * 0.5).requires_grad_()

    tensors = [rand(T, B, I), rand(B, K), rand(B, H), rand(4 * H, I), rand(4 * H, K),
               rand(4 * H) if bias else None, rand(4 * H) if bias else None,
               rand(proj, H) if proj else None]
    return tensors, None if lengths is None else torch.tensor(lengths)


def run(engine, lengths, reverse):
    """fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) -> (output, h_n, c_n) on ``engine``."""
    def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        if engine == "reference":
            output, (h, c) = fastrnn.reference.layer("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh,
                                                     lengths, reverse, w_hr)
        else:
            output, (h, c) = fastrnn.autograd.layer("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh,
                                                    lengths, reverse, engine, w_hr)
        return output, h, c
    return fn


layer_grid = [pytest.mark.parametrize("proj", [0, 2], ids=["no_proj", "proj"]),
              pytest.mark.parametrize("lengths", [None, [2, 4, 1]], ids=["full", "lengths"]),
              pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"]),
              pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])]


def grid(test):
    for mark in layer_grid:
        test = mark(test)
    return test


@needs_cpp
@grid
def test_gradcheck(proj, lengths, reverse, bias):
    tensors, lengths = layer_args(proj, bias, lengths)
    assert torch.autograd.gradcheck(run("cpp", lengths, reverse), tensors, eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


@needs_cpp
@grid
def test_gradgradcheck(proj, lengths, reverse, bias):
    tensors, lengths = layer_args(proj, bias, lengths, I=2, H=3)
    assert torch.autograd.gradgradcheck(run("cpp", lengths, reverse), tensors, eps=1e-6,
                                        atol=1e-7, rtol=1e-5)


@needs_cpp
@grid
def test_engine_matches_reference(proj, lengths, reverse, bias):
    tensors, lengths = layer_args(proj, bias, lengths, T=7, B=3, I=5, H=6)
    results = []
    for engine in ("cpp", "reference"):
        outputs = run(engine, lengths, reverse)(*tensors)
        upstream = [torch.full_like(t, 0.1).add_(t.detach()) for t in outputs]
        leaves = [t for t in tensors if t is not None]
        results.append(dict(zip(["output", "h_n", "c_n"], [t.detach() for t in outputs]))
                       | {f"grad{i}": g for i, g in enumerate(
                           torch.autograd.grad(outputs, leaves, upstream))})
    assert_results_close(results[0], results[1], torch.float64)


@lstm_kind
@pytest.mark.parametrize("only", ["output", "h_n", "c_n"])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("backend,device", [
    pytest.param("auto", "cpu", id="default"),
    pytest.param("triton", TRITON_DEVICE.type, id="triton", marks=[requires_triton, pytest.mark.cuda])])
def test_each_output_alone(kind, only, packed, backend, device):
    # A loss on one of output, h_n and c_n: the others' gradients are None
    # in backward, which must count as zero.
    torch_cls, fast_cls, extra = LSTM_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, num_layers=2,
                                     bidirectional=True, dtype=torch.float64, **extra)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64, generator=generator)
    hx = make_state(kind, (4, BATCH), torch.float64, generator)
    lengths = [9, 3, 7, 1, 5] if packed else None
    expected = forward_backward(reference, x, hx, lengths=lengths, only=only)
    with fastrnn.use_backend(backend):
        got = forward_backward(candidate.to(device), x.to(device),
                               tuple(h.to(device) for h in hx), lengths=lengths, only=only)
    assert_results_close({k: v.cpu() for k, v in got.items()}, expected, torch.float64)


@lstm_kind
def test_state_dict_both_ways(kind):
    torch_cls, fast_cls, extra = LSTM_KINDS[kind]
    torch.manual_seed(0)
    theirs = torch_cls(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, **extra)
    ours = fast_cls(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, **extra)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, **extra)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    for a, b in zip((ours(x)[0], *ours(x)[1]), (back(x)[0], *back(x)[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if extra:
        assert "weight_hr_l1_reverse" in ours.state_dict()


def test_initialisation_as_torch_nn():
    # Same draws in the same order: equal parameters from the same seed.
    torch.manual_seed(3)
    theirs = nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    torch.manual_seed(3)
    ours = fastrnn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), name
    assert repr(ours).replace("fastrnn.", "") == repr(theirs).replace("torch.nn.", "")


@pytest.mark.parametrize("kwargs", [{"proj_size": -1}, {"proj_size": 6}, {"proj_size": 7},
                                    {"proj_size": 1.5}])
def test_constructor_errors(kwargs):
    assert_same_exception(lambda: nn.LSTM(4, 6, **kwargs), lambda: fastrnn.LSTM(4, 6, **kwargs))


def _bad_states():
    """id: (input, states) a 2-layer LSTM with proj_size 3 over 4 features rejects.

    (Without a projection, torch.nn on CPU runs oneDNN, whose dtype errors
    name its own internals; with one, its messages are those of ATen.)
    """
    x, h, c = torch.zeros(5, 2, 4), torch.zeros(2, 2, 3), torch.zeros(2, 2, 6)
    return {
        "h_width": (x, (torch.zeros(2, 2, 6), c)),
        "c_width": (x, (h, torch.zeros(2, 2, 3))),
        "h_batch": (x, (torch.zeros(2, 3, 3), c)),
        "c_layers": (x, (h, torch.zeros(1, 2, 6))),
        "h_rank": (x, (torch.zeros(2, 3), c)),
        "c_rank": (x, (h, torch.zeros(2, 6))),
        "h_dtype": (x, (h.double(), c)),
        "c_dtype": (x, (h, c.double())),
        "unbatched_h_rank": (x[:, 0], (h, c[:, 0])),
        "unbatched_c_rank": (x[:, 0], (h[:, 0], c)),
        "unbatched_h_width": (x[:, 0], (torch.zeros(2, 6), c[:, 0])),
        "unbatched_c_dtype": (x[:, 0], (h[:, 0], c[:, 0].double())),
    }


@pytest.mark.parametrize("case", list(_bad_states()))
def test_state_errors(case):
    x, states = _bad_states()[case]
    torch.manual_seed(0)
    theirs = nn.LSTM(4, 6, num_layers=2, proj_size=3)
    ours = copy_of(theirs)
    assert_same_exception(lambda: theirs(x, states), lambda: ours(x, states))


def copy_of(module):
    ours = fastrnn.LSTM(module.input_size, module.hidden_size, num_layers=module.num_layers,
                        proj_size=module.proj_size, bidirectional=module.bidirectional)
    ours.load_state_dict(module.state_dict())
    return ours


@pytest.mark.parametrize("case", ["h_batch", "c_batch", "h_width", "c_width", "input_size",
                                  "h_rank", "c_rank"])
def test_cell_errors(case):
    x, h, c = torch.zeros(3, 4), torch.zeros(3, 6), torch.zeros(3, 6)
    bad = {"h_batch": (x, (torch.zeros(2, 6), c)), "c_batch": (x, (h, torch.zeros(2, 6))),
           "h_width": (x, (torch.zeros(3, 5), c)), "c_width": (x, (h, torch.zeros(3, 7))),
           "input_size": (torch.zeros(3, 5), (h, c)),
           "h_rank": (x, (torch.zeros(1, 3, 6), c)), "c_rank": (x, (h, torch.zeros(1, 3, 6)))}
    theirs, ours = make_pair(nn.LSTMCell, fastrnn.LSTMCell, 4, 6)
    assert_same_exception(lambda: theirs(*bad[case]), lambda: ours(*bad[case]))


def test_cell_returns_a_tuple_of_both_states():
    theirs, ours = make_pair(nn.LSTMCell, fastrnn.LSTMCell, 4, 6, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    for state in (None, (torch.randn(3, 6, dtype=torch.float64),) * 2):
        got, expected = ours(x, state), theirs(x, state)
        assert isinstance(got, tuple) and len(got) == 2
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    got, expected = ours(x[0]), theirs(x[0])
    assert got[0].shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cell_state_of_a_wider_dtype(batched, autocast):
    # torch.nn's LSTMCell runs a float32 h with a float64 c: the update of c
    # promotes, and both states come out float64. Gradients too.
    theirs, ours = make_pair(nn.LSTMCell, fastrnn.LSTMCell, 4, 6)
    generator = torch.Generator().manual_seed(3)
    lead = (3,) if batched else ()
    x, h = (torch.randn(*lead, n, generator=generator, requires_grad=True) for n in (4, 6))
    c = torch.randn(*lead, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    results = []
    for module in (theirs, ours):
        with torch.autocast("cpu", enabled=autocast):
            states = module(x, (h, c))
        loss = sum((s * torch.linspace(-1, 1, 6, dtype=s.dtype)).sum() for s in states)
        grads = torch.autograd.grad(loss, (x, h, c, *module.parameters()))
        results.append((*states, *grads))
    expected, got = results
    assert [t.dtype for t in got[:2]] == [torch.float64, torch.float64]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_projection_sizes():
    module = fastrnn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    output, (h, c) = module(torch.randn(5, 2, 4))
    assert output.shape == (5, 2, 6) and h.shape == (4, 2, 3) and c.shape == (4, 2, 6)
    assert module.weight_ih_l1.shape == (24, 6) and module.weight_hh_l0.shape == (24, 3)


def test_rnn_and_gru_reject_proj_size():
    for theirs, ours in ((nn.RNN, fastrnn.RNN), (nn.GRU, fastrnn.GRU)):
        assert_same_exception(lambda: theirs(4, 6, proj_size=2), lambda: ours(4, 6, proj_size=2))


def test_layer_op_rejects_a_projection_for_other_cells():
    x, h0, w = torch.zeros(2, 1, 3), torch.zeros(1, 3), torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="takes no weight_hr"):
        torch.ops.fastrnn.layer_forward("rnn_tanh", x, [h0], w, w, None, None, w, None, False,
                                        False, "auto")
