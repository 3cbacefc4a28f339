"""Invalid arguments raise exactly what torch.nn raises (type and message).

LSTM (with and without proj_size) and LSTMCell take the same cases with
(h_0, c_0) for hx; where fastrnn's exception differs from torch.nn's the case
is an expected failure (strict) that says how.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from conftest import (
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    LENGTHS,
    MODULES,
    PROJ_SIZE,
    SEQ_LEN,
    assert_results_close,
    assert_same_exception,
    capture_warnings,
    flatten_outputs,
    forward_backward,
    make_pair,
)

I, H, B, T = INPUT_SIZE, HIDDEN_SIZE, BATCH, SEQ_LEN

RECURRENT = {"RNN": (nn.RNN, fastrnn.RNN), "GRU": (nn.GRU, fastrnn.GRU)}
CELLS = {"RNNCell": (nn.RNNCell, fastrnn.RNNCell), "GRUCell": (nn.GRUCell, fastrnn.GRUCell)}

# ---------------------------------------------------------------------------
# Constructor
# ---------------------------------------------------------------------------

CONSTRUCTOR_CASES = {
    "nonlinearity_x": ("RNN", (I, H), dict(nonlinearity="x")),
    "rnn_proj_size": ("RNN", (I, H), dict(proj_size=2)),
    "gru_proj_size": ("GRU", (I, H), dict(proj_size=2)),
    "dropout_2": (None, (I, H), dict(dropout=2)),
    "dropout_negative": (None, (I, H), dict(dropout=-0.1)),
    "dropout_true": (None, (I, H), dict(dropout=True)),
    "hidden_size_0": (None, (I, 0), dict()),
    "input_size_0": (None, (0, H), dict()),
    "num_layers_0": (None, (I, H), dict(num_layers=0)),
    "hidden_size_float": (None, (I, 3.5), dict()),
    "bias_int": (None, (I, H), dict(bias=1)),
    "num_layers_str": (None, (I, H), dict(num_layers="2")),
}


def constructor_params():
    for case_id, (only, args, kwargs) in CONSTRUCTOR_CASES.items():
        for name in RECURRENT:
            if only is None or only == name:
                yield pytest.param(name, args, kwargs, id=f"{name}-{case_id}")


@pytest.mark.parametrize("name, args, kwargs", list(constructor_params()))
def test_constructor_errors(name, args, kwargs):
    torch_cls, fast_cls = RECURRENT[name]
    assert_same_exception(lambda: torch_cls(*args, **kwargs), lambda: fast_cls(*args, **kwargs))


@pytest.mark.parametrize("name", list(RECURRENT))
@pytest.mark.parametrize("num_layers, dropout", [(1, 0.5), (1, 1.0), (2, 0.5), (1, 0.0)])
def test_dropout_warning_parity(name, num_layers, dropout):
    torch_cls, fast_cls = RECURRENT[name]
    expected = capture_warnings(lambda: torch_cls(I, H, num_layers=num_layers, dropout=dropout))
    got = capture_warnings(lambda: fast_cls(I, H, num_layers=num_layers, dropout=dropout))
    assert got == expected
    if num_layers == 1 and dropout > 0:
        assert expected and expected[0][0] is UserWarning


# ---------------------------------------------------------------------------
# Forward of RNN / GRU
# ---------------------------------------------------------------------------


def packed(x, batch_first=False):
    return pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False)


# Each case: (module kwargs, function building the call arguments).
# Modules are float32 with num_layers=2 unless overridden.
FORWARD_CASES = {
    "input_1d": ({}, lambda: (torch.randn(I),)),
    "input_4d": ({}, lambda: (torch.randn(2, T, B, I),)),
    "input_0d": ({}, lambda: (torch.tensor(1.0),)),
    "wrong_feature_size": ({}, lambda: (torch.randn(T, B, I - 1),)),
    "wrong_feature_size_unbatched": ({}, lambda: (torch.randn(T, I + 1),)),
    "wrong_feature_size_batch_first": ({"batch_first": True}, lambda: (torch.randn(B, T, I - 1),)),
    "hx_wrong_batch": ({}, lambda: (torch.randn(T, B, I), torch.randn(2, B - 1, H))),
    "hx_wrong_hidden": ({}, lambda: (torch.randn(T, B, I), torch.randn(2, B, H + 1))),
    "hx_wrong_num_states": ({}, lambda: (torch.randn(T, B, I), torch.randn(1, B, H))),
    "hx_wrong_num_states_bidirectional": (
        {"bidirectional": True},
        lambda: (torch.randn(T, B, I), torch.randn(2, B, H)),
    ),
    "hx_wrong_batch_batch_first": ({"batch_first": True}, lambda: (torch.randn(B, T, I), torch.randn(2, B + 1, H))),
    "hx_2d_with_batched_input": ({}, lambda: (torch.randn(T, B, I), torch.randn(B, H))),
    "hx_3d_with_unbatched_input": ({}, lambda: (torch.randn(T, I), torch.randn(2, 1, H))),
    "hx_wrong_hidden_unbatched": ({}, lambda: (torch.randn(T, I), torch.randn(2, H - 1))),
    "hx_wrong_num_states_unbatched": ({}, lambda: (torch.randn(T, I), torch.randn(3, H))),
    "input_float64_module_float32": ({}, lambda: (torch.randn(T, B, I, dtype=torch.float64),)),
    "input_float32_module_float64": ({"dtype": torch.float64}, lambda: (torch.randn(T, B, I),)),
    "hx_float64_module_float32": ({}, lambda: (torch.randn(T, B, I), torch.randn(2, B, H, dtype=torch.float64))),
    "hx_float64_unbatched": ({}, lambda: (torch.randn(T, I), torch.randn(2, H, dtype=torch.float64))),
    "integer_input": ({}, lambda: (torch.ones(T, B, I, dtype=torch.int64),)),
    "empty_sequence": ({}, lambda: (torch.randn(0, B, I),)),
    "empty_sequence_batch_first": ({"batch_first": True}, lambda: (torch.randn(B, 0, I),)),
    "empty_sequence_unbatched": ({}, lambda: (torch.randn(0, I),)),
    "packed_hx_wrong_hidden": ({}, lambda: (packed(torch.randn(T, B, I)), torch.randn(2, B, H + 1))),
    "packed_hx_wrong_num_states": ({}, lambda: (packed(torch.randn(T, B, I)), torch.randn(3, B, H))),
    "packed_hx_batch_too_small": ({}, lambda: (packed(torch.randn(T, B, I)), torch.randn(2, B - 1, H))),
    "packed_hx_2d": ({}, lambda: (packed(torch.randn(T, B, I)), torch.randn(B, H))),
    "packed_float64_module_float32": ({}, lambda: (packed(torch.randn(T, B, I, dtype=torch.float64)),)),
}


@pytest.mark.parametrize("name", list(RECURRENT))
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_errors(name, case):
    kwargs, make_args = FORWARD_CASES[case]
    kwargs = {"num_layers": 2, **kwargs}
    torch_cls, fast_cls = RECURRENT[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, **kwargs)
    torch.manual_seed(0)
    args = make_args()
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


@pytest.mark.parametrize("call", ["too_many", "no_input", "unknown_keyword"])
@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell"])
def test_wrong_call_signature(name, call):
    # Python's TypeError names the class that defines forward.
    args, kwargs = {"too_many": ((torch.randn(T, B, I), None, 1), {}), "no_input": ((), {}),
                    "unknown_keyword": ((torch.randn(T, B, I),), {"h": None})}[call]
    reference, candidate = make_pair(getattr(nn, name), getattr(fastrnn, name), I, H)
    assert_same_exception(lambda: reference(*args, **kwargs), lambda: candidate(*args, **kwargs))


@pytest.mark.parametrize("packed_input", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("weight", ["bias_hh_l0", "bias_ih_l1_reverse", "weight_hh_l0"])
@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
def test_layer_weight_set_to_none(name, weight, packed_input):
    # torch.nn's op takes the flat weights as a list of tensors, and refuses a None in it.
    pair = make_pair(getattr(nn, name), getattr(fastrnn, name), I, H, num_layers=2,
                     bidirectional=True)
    for m in pair:
        setattr(m, weight, None)
    x = torch.randn(T, B, I)
    x = packed(x) if packed_input else x
    assert_same_exception(lambda: pair[0](x), lambda: pair[1](x))


@pytest.mark.parametrize("packed_input", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", [(1, B, H), (2, 1, B, H)], ids=["3d", "4d"])
def test_lstm_state_given_as_one_tensor(shape, packed_input):
    # torch.nn's op takes an LSTM's (h_0, c_0) only as a tuple; yet its
    # module makes one of a (2, ...) tensor where it permutes the states of
    # an unsorted packed input, and then runs.
    pair = make_pair(nn.LSTM, fastrnn.LSTM, I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    x = packed(x) if packed_input else x
    hx = torch.randn(shape, dtype=torch.float64)
    if packed_input and len(shape) == 4:
        expected, got = (flatten_outputs(m(x, hx)) for m in pair)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    else:
        assert_same_exception(lambda: pair[0](x, hx), lambda: pair[1](x, hx))


class _Counted(nn.Module):
    """A parametrization that counts its evaluations."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def forward(self, weight):
        self.count += 1
        return weight


def test_packed_lstm_runs_a_cell_state_of_batch_one_as_torch_nn():
    # torch.nn's LSTM checks no state of a packed input, and its op
    # broadcasts a c_0 of batch 1; fastrnn leaves such a call to it, reading
    # a parametrized weight as often as torch.nn does.
    pair = make_pair(nn.LSTM, fastrnn.LSTM, I, H, dtype=torch.float64)
    counters = [_Counted(), _Counted()]
    for m, counter in zip(pair, counters):
        nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", counter)
    lengths = sorted(LENGTHS, reverse=True)
    x = pack_padded_sequence(torch.randn(max(lengths), B, I, dtype=torch.float64), lengths)
    hx = (torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, 1, H, dtype=torch.float64))
    expected, got = (flatten_outputs(m(x, hx)) for m in pair)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert counters[1].count == counters[0].count


@pytest.mark.parametrize("c_0", [None, 1.0, "c"], ids=["none", "float", "str"])
def test_packed_lstm_cell_state_not_a_tensor(c_0):
    pair = make_pair(nn.LSTM, fastrnn.LSTM, I, H)
    x = pack_padded_sequence(torch.randn(T, B, I), [T] * B)
    hx = (torch.zeros(1, B, H), c_0)
    assert_same_exception(lambda: pair[0](x, hx), lambda: pair[1](x, hx))


@pytest.mark.parametrize("wrong", ["input", "h"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell"])
def test_float32_tensor_meets_float64_weights(name, bias, wrong):
    # ATen words the mismatch by its product: addmm with a bias, mm without.
    pair = make_pair(getattr(nn, name), getattr(fastrnn, name), I, H, bias=bias,
                     dtype=torch.float64)
    lead = (B,) if name.endswith("Cell") else (T, B)
    x = torch.randn(*lead, I, dtype=torch.float32 if wrong == "input" else torch.float64)
    state = torch.randn(B, H) if name.endswith("Cell") else torch.randn(1, B, H)
    if wrong == "input":
        args = (x,)
    else:  # h float32; an LSTM's c float64
        args = (x, (state, state.double()) if "LSTM" in name else state)
    assert_same_exception(lambda: pair[0](*args), lambda: pair[1](*args))


@pytest.mark.parametrize("weight", ["weight_ih", "weight_hh"])
@pytest.mark.parametrize("name, kwargs", [("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}),
                                          ("GRUCell", {}), ("LSTMCell", {})])
def test_cell_weight_set_to_none(name, kwargs, weight):
    pair = make_pair(getattr(nn, name), getattr(fastrnn, name), I, H, **kwargs)
    for m in pair:
        setattr(m, weight, None)
    x = torch.randn(B, I)
    assert_same_exception(lambda: pair[0](x), lambda: pair[1](x))


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cell_bias_set_to_none_runs_as_torch_nn(name):
    # torch.nn's cells take their biases as optional: a None one is left out.
    pair = make_pair(getattr(nn, name), getattr(fastrnn, name), I, H, dtype=torch.float64)
    for m in pair:
        m.bias_hh = None
    x = torch.randn(B, I, dtype=torch.float64)
    assert_results_close(forward_backward(pair[1], x), forward_backward(pair[0], x), torch.float64)


@pytest.mark.parametrize("name", list(RECURRENT))
def test_packed_input_with_oversized_hx_behaves_like_torch(name):
    # torch.nn permutes hx with the packed sequence's sorted_indices before
    # validating it, so an hx with extra batch rows is accepted (the extra rows
    # are ignored). A drop-in replacement must do the same.
    torch_cls, fast_cls = RECURRENT[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=2, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = torch.randn(2, B + 1, H, dtype=torch.float64)
    expected = forward_backward(reference, x, hx, lengths=LENGTHS)
    got = forward_backward(candidate, x, hx, lengths=LENGTHS)
    assert_results_close(got, expected, torch.float64)


@pytest.mark.parametrize("name", list(RECURRENT))
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
def test_zero_batch(name, batch_first, bidirectional, hx_given):
    torch_cls, fast_cls = RECURRENT[name]
    reference, candidate = make_pair(
        torch_cls, fast_cls, I, H, num_layers=2, batch_first=batch_first, bidirectional=bidirectional
    )
    x = torch.randn(0, T, I) if batch_first else torch.randn(T, 0, I)
    args = (x,)
    if hx_given:
        args = (x, torch.randn(2 * (2 if bidirectional else 1), 0, H))
    expected_out, expected_h = reference(*args)
    out, h_n = candidate(*args)
    assert out.shape == expected_out.shape
    assert h_n.shape == expected_h.shape
    assert out.dtype == expected_out.dtype and h_n.dtype == expected_h.dtype


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------

CELL_CASES = {
    "input_3d": ({}, lambda: (torch.randn(2, B, I),)),
    "input_0d": ({}, lambda: (torch.tensor(1.0),)),
    "hx_3d": ({}, lambda: (torch.randn(B, I), torch.randn(1, B, H))),
    "wrong_input_size": ({}, lambda: (torch.randn(B, I - 1),)),
    "wrong_input_size_unbatched": ({}, lambda: (torch.randn(I + 1),)),
    "hx_wrong_batch": ({}, lambda: (torch.randn(B, I), torch.randn(B - 1, H))),
    "hx_wrong_size": ({}, lambda: (torch.randn(B, I), torch.randn(B, H - 1))),
    "hx_2d_with_unbatched_input": ({}, lambda: (torch.randn(I), torch.randn(1, H))),
    "hx_1d_with_batched_input": ({}, lambda: (torch.randn(B, I), torch.randn(H))),
    "input_float64_module_float32": ({}, lambda: (torch.randn(B, I, dtype=torch.float64), torch.randn(B, H))),
    "input_float64_no_hx": ({}, lambda: (torch.randn(B, I, dtype=torch.float64),)),
    "hx_float64_module_float32": ({}, lambda: (torch.randn(B, I), torch.randn(B, H, dtype=torch.float64))),
    "input_and_hx_float64": (
        {},
        lambda: (torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)),
    ),
    "integer_input": ({}, lambda: (torch.ones(B, I, dtype=torch.int64),)),
}


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_errors(name, case):
    kwargs, make_args = CELL_CASES[case]
    torch_cls, fast_cls = CELLS[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, **kwargs)
    torch.manual_seed(0)
    args = make_args()
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
def test_cell_zero_batch(name, hx_given):
    torch_cls, fast_cls = CELLS[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H)
    args = (torch.randn(0, I),) + ((torch.randn(0, H),) if hx_given else ())
    expected = reference(*args)
    got = candidate(*args)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype


# ---------------------------------------------------------------------------
# Arguments of the wrong type, dtype or device (the meta device standing in
# for a second one); everything on the meta device
# ---------------------------------------------------------------------------

# Sizes of the calls in this section: input, hidden, batch, steps, layers.
ARG_I, ARG_H, ARG_B, ARG_T, ARG_LAYERS = 5, 6, 3, 4, 2


def shapes(name, batched=True):
    """(input shape, hx shape) of a valid call to module ``name`` (a MODULES key)."""
    if name in CELLS:
        return ((ARG_B, ARG_I), (ARG_B, ARG_H)) if batched else ((ARG_I,), (ARG_H,))
    if batched:
        return (ARG_T, ARG_B, ARG_I), (ARG_LAYERS, ARG_B, ARG_H)
    return (ARG_T, ARG_I), (ARG_LAYERS, ARG_H)


def make_module_pair(name, dtype=torch.float32):
    torch_cls, fast_cls = MODULES[name]
    kwargs = {} if name in CELLS else {"num_layers": ARG_LAYERS}
    return make_pair(torch_cls, fast_cls, ARG_I, ARG_H, dtype=dtype, **kwargs)


# Each case: (module dtype, module device, batched, builder of the call's
# arguments from the valid input and hx shapes).
BAD_INPUT_CASES = {
    "input_list": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs).tolist(),)),
    "input_numpy": (torch.float32, "cpu", True, lambda xs, hs: (np.zeros(xs, dtype=np.float32),)),
    "input_none": (torch.float32, "cpu", True, lambda xs, hs: (None,)),
    "input_int": (torch.float32, "cpu", True, lambda xs, hs: (7,)),
    "hx_list": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs), torch.randn(hs).tolist())),
    "hx_numpy": (torch.float32, "cpu", True,
                 lambda xs, hs: (torch.randn(xs), np.zeros(hs, dtype=np.float32))),
    "hx_tuple": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs), (torch.randn(hs),))),
    "input_int32_unbatched": (torch.float32, "cpu", False,
                              lambda xs, hs: (torch.ones(xs, dtype=torch.int32),)),
    "input_bool": (torch.float32, "cpu", True, lambda xs, hs: (torch.ones(xs, dtype=torch.bool),)),
    "input_float16_module_float32": (torch.float32, "cpu", True,
                                     lambda xs, hs: (torch.randn(xs, dtype=torch.float16),)),
    "hx_float32_module_float64": (
        torch.float64, "cpu", True,
        lambda xs, hs: (torch.randn(xs, dtype=torch.float64), torch.randn(hs))),
    "hx_float16_unbatched": (torch.float32, "cpu", False,
                             lambda xs, hs: (torch.randn(xs), torch.randn(hs, dtype=torch.float16))),
    # The meta device stands in for a second device.
    "hx_on_meta": (torch.float32, "cpu", True,
                   lambda xs, hs: (torch.randn(xs), torch.randn(hs, device="meta"))),
    "hx_on_meta_unbatched": (torch.float32, "cpu", False,
                             lambda xs, hs: (torch.randn(xs), torch.randn(hs, device="meta"))),
    "input_on_meta": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs, device="meta"),)),
    "input_on_meta_hx_on_cpu": (torch.float32, "cpu", True,
                                lambda xs, hs: (torch.randn(xs, device="meta"), torch.randn(hs))),
    "module_on_meta": (torch.float32, "meta", True, lambda xs, hs: (torch.randn(xs),)),
    "module_on_meta_unbatched": (torch.float32, "meta", False, lambda xs, hs: (torch.randn(xs),)),
    "module_on_meta_hx_on_cpu": (torch.float32, "meta", True,
                                 lambda xs, hs: (torch.randn(xs), torch.randn(hs))),
}


@pytest.mark.usefixtures("intra_op_threads")
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("case", list(BAD_INPUT_CASES))
def test_bad_input(name, case):
    dtype, device, batched, build = BAD_INPUT_CASES[case]
    reference, candidate = make_module_pair(name, dtype)
    reference.to(device)
    candidate.to(device)
    args = build(*shapes(name, batched))
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cell_checks_states_before_weights(name):
    # A 3-D state fails torch.nn's rank check before any weight is read, even
    # one set to None (the cells test their common call first, in shapes).
    torch_cls, fast_cls = getattr(nn, name), getattr(fastrnn, name)
    reference, candidate = make_pair(torch_cls, fast_cls, ARG_I, ARG_H)
    for module in (reference, candidate):
        module.weight_ih = None
    h = torch.randn(1, 2, ARG_H)
    hx = (h, h.clone()) if name == "LSTMCell" else h
    x = torch.randn(2, ARG_I)
    assert_same_exception(lambda: reference(x, hx), lambda: candidate(x, hx))


@pytest.mark.usefixtures("intra_op_threads")
@pytest.mark.parametrize("name", list(MODULES))
def test_all_on_meta_gives_torch_shapes(name):
    # Everything on one (meta) device is valid: same shapes and dtypes as torch.nn.
    reference, candidate = make_module_pair(name)
    reference.to("meta")
    candidate.to("meta")
    xs, hs = shapes(name)
    args = (torch.randn(xs, device="meta"), torch.randn(hs, device="meta"))

    def described(outputs):
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return [(t.shape, t.dtype, t.device) for t in outputs]

    assert described(candidate(*args)) == described(reference(*args))


# ---------------------------------------------------------------------------
# LSTM and LSTMCell: the cases above with (h_0, c_0) for hx
# ---------------------------------------------------------------------------

# name -> (torch.nn class, fastrnn class, projection size)
LSTMS = {"LSTM": (nn.LSTM, fastrnn.LSTM, 0), "LSTM_proj": (nn.LSTM, fastrnn.LSTM, PROJ_SIZE)}
LSTM_CELLS = {"LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell, 0)}


def lstm_state(hx, proj=0, hidden=H):
    """The (h, c) an LSTM is given where the cases above give ``hx``: c is
    ``hx``, h the same with a projection's width (P + hx's excess over the
    hidden size); lists and arrays paired with a copy, anything else as it is."""
    if isinstance(hx, torch.Tensor):
        h = hx if not proj else torch.randn(*hx.shape[:-1], hx.shape[-1] - hidden + proj,
                                            dtype=hx.dtype, device=hx.device)
        return h, hx.clone()
    if isinstance(hx, np.ndarray):
        return hx, hx.copy()
    if isinstance(hx, list):
        return hx, list(hx)
    return hx


def lstm_call(args, proj=0, hidden=H):
    """A case's call arguments with its hx (the second) as an LSTM's state."""
    return args[:1] + tuple(lstm_state(h, proj, hidden) for h in args[1:])


ONEDNN = ("without a projection torch.nn's CPU LSTM runs oneDNN, whose dtype errors name its "
          "own internals ('get_mkldnn_dtype: unsupported data type', 'could not create a "
          "primitive descriptor'); fastrnn raises ATen's matmul dtype error")
# (kind, case) -> why fastrnn's exception differs from torch.nn's
LSTM_FORWARD_DIFFERENCES = {
    ("LSTM", "hx_float64_module_float32"): ONEDNN,
    ("LSTM", "hx_float64_unbatched"): ONEDNN,
}


def with_differences(pairs, differences):
    for pair in pairs:
        reason = differences.get(pair)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(*pair, marks=marks, id="-".join(pair))


def lstm_constructor_params():
    for case_id, (only, args, kwargs) in CONSTRUCTOR_CASES.items():
        if only is None:
            for name in LSTMS:
                yield pytest.param(name, args, kwargs, id=f"{name}-{case_id}")


@pytest.mark.parametrize("name, args, kwargs", list(lstm_constructor_params()))
def test_lstm_constructor_errors(name, args, kwargs):
    torch_cls, fast_cls, proj = LSTMS[name]
    kwargs = {**kwargs, "proj_size": proj} if proj else kwargs
    assert_same_exception(lambda: torch_cls(*args, **kwargs), lambda: fast_cls(*args, **kwargs))


@pytest.mark.parametrize("name", list(LSTMS))
@pytest.mark.parametrize("num_layers, dropout", [(1, 0.5), (1, 1.0), (2, 0.5), (1, 0.0)])
def test_lstm_dropout_warning_parity(name, num_layers, dropout):
    torch_cls, fast_cls, proj = LSTMS[name]
    kwargs = dict(num_layers=num_layers, dropout=dropout, proj_size=proj)
    expected = capture_warnings(lambda: torch_cls(I, H, **kwargs))
    got = capture_warnings(lambda: fast_cls(I, H, **kwargs))
    assert got == expected
    if num_layers == 1 and dropout > 0:
        assert expected and expected[0][0] is UserWarning


@pytest.mark.parametrize("name, case", list(with_differences(
    [(name, case) for name in LSTMS for case in FORWARD_CASES], LSTM_FORWARD_DIFFERENCES)))
def test_lstm_forward_errors(name, case):
    kwargs, make_args = FORWARD_CASES[case]
    torch_cls, fast_cls, proj = LSTMS[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=2, proj_size=proj,
                                     **kwargs)
    torch.manual_seed(0)
    args = lstm_call(make_args(), proj)
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


# hx given as something else than (h, c): case -> (states leading shape, hx builder)
STATE_COUNT_CASES = {
    "bare_tensor_2_states": lambda s: torch.randn(2, *s),
    "bare_tensor_1_state": lambda s: torch.randn(1, *s),
    "bare_tensor_3_states": lambda s: torch.randn(3, *s),
    "one_tuple": lambda s: (torch.randn(s),),
    "three_tuple": lambda s: (torch.randn(s),) * 3,
}
@pytest.mark.parametrize("name", ["LSTM", "LSTMCell"])
@pytest.mark.parametrize("case", list(STATE_COUNT_CASES))
def test_lstm_state_count_errors(name, case):
    # A 2-layer LSTM's state is (2, B, H) per tensor; an LSTMCell's (B, H).
    torch_cls, fast_cls, _ = {**LSTMS, **LSTM_CELLS}[name]
    cell = name == "LSTMCell"
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, **({} if cell else {"num_layers": 2}))
    torch.manual_seed(0)
    x = torch.randn(B, I) if cell else torch.randn(T, B, I)
    hx = STATE_COUNT_CASES[case]((B, H) if not cell else (H,))
    if cell and isinstance(hx, tuple):
        hx = tuple(torch.randn(B, H) for _ in hx)
    assert_same_exception(lambda: reference(x, hx), lambda: candidate(x, hx))


@pytest.mark.parametrize("name", list(LSTMS))
def test_lstm_packed_input_with_oversized_hx_behaves_like_torch(name):
    torch_cls, fast_cls, proj = LSTMS[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=2, proj_size=proj,
                                     dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = lstm_state(torch.randn(2, B + 1, H, dtype=torch.float64), proj)
    expected = forward_backward(reference, x, hx, lengths=LENGTHS)
    got = forward_backward(candidate, x, hx, lengths=LENGTHS)
    assert_results_close(got, expected, torch.float64)


@pytest.mark.parametrize("name", list(LSTMS))
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
def test_lstm_zero_batch(name, batch_first, bidirectional, hx_given):
    torch_cls, fast_cls, proj = LSTMS[name]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=2, proj_size=proj,
                                     batch_first=batch_first, bidirectional=bidirectional)
    x = torch.randn(0, T, I) if batch_first else torch.randn(T, 0, I)
    args = (x,)
    if hx_given:
        args = (x, lstm_state(torch.randn(2 * (2 if bidirectional else 1), 0, H), proj))
    expected = flatten_outputs(reference(*args))
    got = flatten_outputs(candidate(*args))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_lstm_cell_errors(case):
    kwargs, make_args = CELL_CASES[case]
    reference, candidate = make_pair(nn.LSTMCell, fastrnn.LSTMCell, I, H, **kwargs)
    torch.manual_seed(0)
    args = lstm_call(make_args())
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
def test_lstm_cell_zero_batch(hx_given):
    reference, candidate = make_pair(nn.LSTMCell, fastrnn.LSTMCell, I, H)
    args = (torch.randn(0, I),) + ((lstm_state(torch.randn(0, H)),) if hx_given else ())
    expected = reference(*args)
    got = candidate(*args)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]


ARG_LSTMS = {"LSTM": (nn.LSTM, fastrnn.LSTM, 0), "LSTM_proj": (nn.LSTM, fastrnn.LSTM, 4),
             **LSTM_CELLS}
BAD_INPUT_DIFFERENCES = {("LSTM", "hx_float16_unbatched"): ONEDNN}


def make_lstm_pair(name, dtype=torch.float32):
    torch_cls, fast_cls, proj = ARG_LSTMS[name]
    kwargs = {} if name == "LSTMCell" else {"num_layers": ARG_LAYERS, "proj_size": proj}
    return make_pair(torch_cls, fast_cls, ARG_I, ARG_H, dtype=dtype, **kwargs)


def lstm_shapes(name, batched=True):
    return shapes("GRUCell" if name == "LSTMCell" else "GRU", batched)


@pytest.mark.usefixtures("intra_op_threads")
@pytest.mark.parametrize("name, case", list(with_differences(
    [(name, case) for name in ARG_LSTMS for case in BAD_INPUT_CASES], BAD_INPUT_DIFFERENCES)))
def test_lstm_bad_input(name, case):
    dtype, device, batched, build = BAD_INPUT_CASES[case]
    reference, candidate = make_lstm_pair(name, dtype)
    reference.to(device)
    candidate.to(device)
    args = lstm_call(build(*lstm_shapes(name, batched)), ARG_LSTMS[name][2], ARG_H)
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


@pytest.mark.usefixtures("intra_op_threads")
@pytest.mark.parametrize("name", list(ARG_LSTMS))
def test_lstm_all_on_meta_gives_torch_shapes(name):
    reference, candidate = make_lstm_pair(name)
    reference.to("meta")
    candidate.to("meta")
    xs, hs = lstm_shapes(name)
    x = torch.randn(xs, device="meta")
    hx = lstm_state(torch.randn(hs, device="meta"), ARG_LSTMS[name][2], ARG_H)

    def described(outputs):
        return [(t.shape, t.dtype, t.device) for t in flatten_outputs(outputs)]

    assert described(candidate(x, hx)) == described(reference(x, hx))
