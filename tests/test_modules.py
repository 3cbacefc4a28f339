"""Parity of fastrnn.RNN / GRU / LSTM with torch.nn.RNN / GRU / LSTM."""

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import (
    ALL_MODULE_KINDS as KINDS,
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    LENGTHS,
    SEQ_LEN,
    assert_results_close,
    count_graph_nodes,
    device_param,
    dtype_id,
    forward_backward,
    flatten_outputs,
    make_pair,
    make_state,
)


INPUT_KINDS = ["unbatched", "batched", "packed"]


def make_inputs(input_kind, batch_first, hx_given, num_layers, bidirectional, dtype, seed=1,
                kind="RNN_tanh"):
    """Input tensor, initial state of a ``kind`` module (or None) and packed
    lengths (or None)."""
    generator = torch.Generator().manual_seed(seed)
    num_states = num_layers * (2 if bidirectional else 1)
    if input_kind == "unbatched":
        x = torch.randn(SEQ_LEN, INPUT_SIZE, dtype=dtype, generator=generator)
        leading = (num_states,)
    else:
        shape = (BATCH, SEQ_LEN, INPUT_SIZE) if batch_first else (SEQ_LEN, BATCH, INPUT_SIZE)
        x = torch.randn(shape, dtype=dtype, generator=generator)
        leading = (num_states, BATCH)
    hx = make_state(kind, leading, dtype, generator) if hx_given else None
    lengths = LENGTHS if input_kind == "packed" else None
    return x, hx, lengths


def check_parity(kind, num_layers, bidirectional, batch_first, bias, input_kind, hx_given, dtype,
                 device="cpu"):
    """fastrnn on ``device`` against torch.nn on the CPU and, on a GPU, against
    torch.nn (cuDNN) on the same device."""
    torch_cls, fast_cls, extra = KINDS[kind]
    reference, candidate = make_pair(
        torch_cls,
        fast_cls,
        INPUT_SIZE,
        HIDDEN_SIZE,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        dropout=0.0,
        bidirectional=bidirectional,
        dtype=dtype,
        **extra,
    )
    x, hx, lengths = make_inputs(input_kind, batch_first, hx_given, num_layers, bidirectional, dtype,
                                 kind=kind)
    expected = forward_backward(reference, x, hx, lengths=lengths, batch_first=batch_first)
    got = forward_backward(candidate.to(device), x, hx, lengths=lengths, batch_first=batch_first)
    assert_results_close(got, expected, dtype)
    if device != "cpu":
        on_device = forward_backward(reference.to(device), x, hx, lengths=lengths, batch_first=batch_first)
        assert_results_close(got, on_device, dtype)


kind_param = pytest.mark.parametrize("kind", list(KINDS))
layers_param = pytest.mark.parametrize("num_layers", [1, 2, 3], ids=lambda n: f"layers{n}")
bidir_param = pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
batch_first_param = pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
bias_param = pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
input_param = pytest.mark.parametrize("input_kind", INPUT_KINDS)
hx_param = pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])


@kind_param
@layers_param
@bidir_param
@batch_first_param
@bias_param
@input_param
@hx_param
@device_param
def test_parity_float64(kind, num_layers, bidirectional, batch_first, bias, input_kind, hx_given, device):
    check_parity(kind, num_layers, bidirectional, batch_first, bias, input_kind, hx_given, torch.float64,
                 device)


@kind_param
@bidir_param
@batch_first_param
@bias_param
@input_param
@hx_param
@device_param
def test_parity_float32(kind, bidirectional, batch_first, bias, input_kind, hx_given, device):
    check_parity(kind, 2, bidirectional, batch_first, bias, input_kind, hx_given, torch.float32, device)


@kind_param
@bidir_param
@input_param
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@device_param
def test_parity_auto_backend(kind, bidirectional, input_kind, dtype, device):
    with fastrnn.use_backend("auto"):
        check_parity(kind, 2, bidirectional, False, True, input_kind, True, dtype, device)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@kind_param
@bidir_param
@batch_first_param
@input_param
def test_parity_forced_backend(backend, kind, bidirectional, batch_first, input_kind):
    with fastrnn.use_backend(backend):
        check_parity(kind, 2, bidirectional, batch_first, True, input_kind, True, torch.float64)


@pytest.mark.parametrize("kind", ["RNN_tanh", "GRU", "LSTM_proj"])
def test_autograd_graph_does_not_grow_with_sequence_length(kind):
    _, fast_cls, extra = KINDS[kind]
    module = fast_cls(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    counts = {}
    for seq_len in (5, 50):
        x = torch.randn(seq_len, BATCH, INPUT_SIZE, dtype=torch.float64, requires_grad=True)
        output, h_n = module(x)
        assert output.grad_fn is not None
        counts[seq_len] = count_graph_nodes(output.grad_fn)
    assert counts[5] == counts[50], f"autograd graph size depends on the sequence length: {counts}"


@kind_param
def test_module_type(kind):
    torch_cls, fast_cls, extra = KINDS[kind]
    module = fast_cls(INPUT_SIZE, HIDDEN_SIZE, **extra)
    assert isinstance(module, nn.RNNBase)
    assert not isinstance(module, torch_cls)
    assert module.mode == torch_cls(INPUT_SIZE, HIDDEN_SIZE, **extra).mode


@kind_param
def test_explicit_none_hx_equals_omitted_hx(kind):
    _, fast_cls, extra = KINDS[kind]
    module = fast_cls(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, dtype=torch.float64, **extra)
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    omitted = flatten_outputs(module(x))
    none = flatten_outputs(module(x, None))
    zeros = flatten_outputs(module(x, make_state(kind, (2, BATCH), torch.float64, fill=0)))
    for a, b, c in zip(omitted, none, zeros):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batch_split_over_threads_with_packed_lengths(kind):
    """Large enough that the engine splits each step's sequences over threads
    (the suite's other shapes are too small to); unsorted lengths make the
    active rows shrink (forward) and grow (reverse) from step to step."""
    assert torch.get_num_threads() >= 2 or pytest.skip("needs 2 intra-op threads")
    torch_cls, fast_cls, extra = KINDS[kind]
    reference, fast = make_pair(torch_cls, fast_cls, 6, 48, bidirectional=True,
                                dtype=torch.float64, **extra)
    lengths = [30, 4, 17, 1, 30, 9, 22, 2, 12]
    x = torch.randn(30, len(lengths), 6, dtype=torch.float64)
    hx = make_state(kind, (2, len(lengths)), torch.float64, hidden=48)
    assert_results_close(forward_backward(fast, x, hx, lengths=lengths),
                         forward_backward(reference, x, hx, lengths=lengths), torch.float64)


INFERENCE_MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "frozen": None,  # grad enabled, but nothing requires it
}


@pytest.mark.parametrize("mode", list(INFERENCE_MODES))
@pytest.mark.parametrize("input_kind", ["batched", "packed"])
@pytest.mark.parametrize("kind", list(KINDS))
@device_param
def test_inference_matches_torch_nn(kind, input_kind, mode, device):
    # Without autograd the GRU skips saving its gates: same outputs as torch.nn.
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, num_layers=2,
                                     bidirectional=True, dtype=torch.float64, **kwargs)
    candidate.to(device)
    x, hx, lengths = make_inputs(input_kind, False, True, 2, True, torch.float64, kind=kind)
    if lengths is not None:
        x = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    context = INFERENCE_MODES[mode]
    if context is None:
        candidate.requires_grad_(False)
    on_device = tuple(h.to(device) for h in hx) if isinstance(hx, tuple) else hx.to(device)
    with context() if context else torch.enable_grad():
        got = flatten_outputs(candidate(x.to(device), on_device))
    with torch.no_grad():
        expected = flatten_outputs(reference(x, hx))
    if lengths is not None:
        got[0], expected[0] = got[0].data, expected[0].data
    assert not got[0].requires_grad
    names = [f"out{i}" for i in range(len(got))]
    assert_results_close(dict(zip(names, got)), dict(zip(names, expected)), torch.float64)


@pytest.mark.parametrize("lengths", [None, [3, 5, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gru_op_without_workspace(lengths, reverse):
    # The engine op's inference form: the same output and state, no workspace.
    generator = torch.Generator().manual_seed(2)
    T, B, I, H = 5, 3, 4, 6
    args = [torch.randn(shape, generator=generator)
            for shape in [(T, B, I), (B, H), (3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]]
    lengths = None if lengths is None else torch.tensor(lengths)
    x, h0, *weights = args
    output, h_n, workspace = torch.ops.fastrnn.layer_forward("gru", x, [h0], *weights, None,
                                                             lengths, reverse, True, "auto")
    bare = torch.ops.fastrnn.layer_forward("gru", x, [h0], *weights, None, lengths, reverse,
                                           False, "auto")
    assert workspace.shape == (T, B, 4 * H) and bare[2].numel() == 0
    assert torch.equal(bare[0], output) and torch.equal(bare[1][0], h_n[0])


@pytest.mark.parametrize("used", ["output", "h_n"])
@pytest.mark.parametrize("kind", list(KINDS))
@device_param
def test_gradients_through_one_output(kind, used, device):
    # A loss on output alone (or h_n alone): the other output gets no
    # gradient, which backward must treat as zero.
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, num_layers=2,
                                     bidirectional=True, dtype=torch.float64, **kwargs)
    candidate.to(device)
    x, _, _ = make_inputs("batched", False, False, 2, True, torch.float64)
    grads = []
    for module in (reference, candidate):
        leaf = x.clone().to(next(module.parameters()).device).requires_grad_(True)
        output, h_n = module(leaf)
        h_n = flatten_outputs(h_n)[0]  # an LSTM's h_n (its c_n: test_lstm.py)
        loss = (output if used == "output" else h_n).sin().sum()
        grads.append(torch.autograd.grad(loss, [leaf, *module.parameters()]))
    for expected, got in zip(*grads):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-12)


def _classes(kind):
    """(torch.nn class, fastrnn class, constructor kwargs) of a KINDS kind or a cell's name."""
    if kind.endswith("Cell"):
        return getattr(nn, kind), getattr(fastrnn, kind), {}
    return KINDS[kind]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("kind", list(KINDS) + ["RNNCell", "GRUCell", "LSTMCell"])
def test_complex_dtypes_as_torch_nn(kind, dtype):
    # torch.nn's modules and cells run complex inputs and weights (the ReLU
    # RNN raises, as clamp has no complex kernel); the engines do not, so
    # fastrnn's run them through the reference loop.
    torch_cls, fast_cls, kwargs = _classes(kind)
    reference, model = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, dtype=dtype, **kwargs)
    shape = (BATCH, INPUT_SIZE) if kind.endswith("Cell") else (SEQ_LEN, BATCH, INPUT_SIZE)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    if kwargs.get("nonlinearity") == "relu":
        for m in (reference, model):
            with pytest.raises(NotImplementedError, match="clamp is not supported for complex"):
                m(x)
        return
    results = []
    for m in (reference, model):
        outputs = flatten_outputs(m(x))
        sum(o.abs().sum() for o in outputs).backward()
        results.append([*outputs, *(p.grad for p in m.parameters())])
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.complex64 else {}
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("grads", ["all", "weights_only", "with_hx"])
@pytest.mark.parametrize("kind", list(KINDS) + ["RNNCell", "GRUCell", "LSTMCell"])
def test_flop_counter_counts_as_torch_nn(kind, grads):
    # torch.utils.flop_counter counts the engines' ops by formulas over their
    # shapes: the FLOPs it counts for torch.nn's float64 layers (whose float32
    # LSTM, oneDNN's, it cannot count), forward and backward.
    from torch.utils.flop_counter import FlopCounterMode

    is_cell = kind.endswith("Cell")
    torch_cls, fast_cls, kwargs = _classes(kind)
    extra = {} if is_cell else {"num_layers": 2, "bidirectional": True}
    reference, model = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64,
                                 **kwargs, **extra)
    leading = (BATCH,) if is_cell else (SEQ_LEN, BATCH)
    x = torch.randn(*leading, INPUT_SIZE, dtype=torch.float64).requires_grad_(grads != "weights_only")
    hx = None
    if grads == "with_hx":
        hx = make_state(kind, (BATCH,) if is_cell else (4, BATCH), torch.float64, hidden=HIDDEN_SIZE)
    if hx is not None:
        hx = tuple(h.requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.requires_grad_()
    counts = []
    for m in (reference, model):
        with FlopCounterMode(display=False) as counter:
            outputs = flatten_outputs(m(x) if hx is None else m(x, hx))
            forward = counter.get_total_flops()
            sum(o.sum() for o in outputs).backward()
        counts.append((forward, counter.get_total_flops()))
    assert counts[1] == counts[0] and counts[0][0] > 0


def test_fx_symbolic_trace_records_calls_as_for_torch_nn():
    # torch.fx records torch.nn's modules as calls (leaves) instead of
    # tracing into them; fastrnn's are recorded the same way, so FX tools
    # (symbolic_trace, FX quantization) take models that hold them.
    class Net(nn.Module):
        def __init__(self, lib):
            super().__init__()
            self.gru = lib.GRU(INPUT_SIZE, HIDDEN_SIZE, num_layers=2)
            self.lstm = lib.LSTM(HIDDEN_SIZE, HIDDEN_SIZE, proj_size=2)
            self.cell = lib.LSTMCell(INPUT_SIZE, HIDDEN_SIZE)

        def forward(self, x, h):
            y, _ = self.gru(x)
            y, (h_n, c_n) = self.lstm(y)
            h_c, c_c = self.cell(x[0], (h, h))
            return y.sum() + h_n.sum() + c_n.sum() + h_c.sum() + c_c.sum()

    torch.manual_seed(0)
    reference, model = Net(nn).double(), Net(fastrnn).double()
    model.load_state_dict(reference.state_dict())
    traced = [torch.fx.symbolic_trace(m) for m in (reference, model)]
    calls = [[n.target for n in t.graph.nodes if n.op == "call_module"] for t in traced]
    assert calls[1] == calls[0] == ["gru", "lstm", "cell"]
    assert type(traced[1].gru) is fastrnn.GRU
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    h = torch.randn(BATCH, HIDDEN_SIZE, dtype=torch.float64)
    torch.testing.assert_close(traced[1](x, h), reference(x, h))
