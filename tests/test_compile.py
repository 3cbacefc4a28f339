"""torch.compile(fullgraph=True) over fastrnn modules: no graph break, same numbers.

torch.nn's RNN, GRU and LSTM break the graph; fastrnn's engine ops are custom
operators with fake implementations, so tracing needs no data and the whole
model, forward and backward, is one graph. Each compiled module is compared
with the eager torch.nn module, forward and every gradient.
"""

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import (
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    KINDS,
    LSTM_KINDS,
    LENGTHS,
    SEQ_LEN,
    TRITON_DEVICE,
    assert_results_close,
    forward_backward,
    make_pair,
    make_state,
    requires_triton,
)

CELLS = {"RNNCell": (nn.RNNCell, fastrnn.RNNCell), "GRUCell": (nn.GRUCell, fastrnn.GRUCell),
         "LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell)}
MODULES = {**KINDS, **LSTM_KINDS}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(module, backend="aot_eager", dynamic=None):
    """``module`` compiled in place (its parameter names stay the same)."""
    module.compile(fullgraph=True, backend=backend, dynamic=dynamic)
    return module


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_compiles_to_one_graph(kind, batch_first):
    torch_cls, fast_cls, extra = MODULES[kind]
    reference, fast = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, num_layers=2,
                                bidirectional=True, batch_first=batch_first, **extra)
    shape = (BATCH, SEQ_LEN, INPUT_SIZE) if batch_first else (SEQ_LEN, BATCH, INPUT_SIZE)
    x = torch.randn(shape)
    hx = make_state(kind, (4, BATCH), torch.float32)
    expected = forward_backward(reference, x, hx)
    assert_results_close(forward_backward(compiled(fast), x, hx), expected, torch.float32)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cell_compiles_to_one_graph(kind):
    reference, fast = make_pair(*CELLS[kind], INPUT_SIZE, HIDDEN_SIZE)
    x, hx = torch.randn(BATCH, INPUT_SIZE), make_state(kind, (BATCH,), torch.float32)
    assert_results_close(forward_backward(compiled(fast), x, hx),
                         forward_backward(reference, x, hx), torch.float32)


def test_unbatched_and_default_state_compile():
    reference, fast = make_pair(nn.GRU, fastrnn.GRU, INPUT_SIZE, HIDDEN_SIZE)
    x = torch.randn(SEQ_LEN, INPUT_SIZE)
    assert_results_close(forward_backward(compiled(fast), x), forward_backward(reference, x),
                         torch.float32)


def test_new_sequence_lengths_reuse_a_dynamic_graph():
    reference, fast = make_pair(nn.RNN, fastrnn.RNN, INPUT_SIZE, HIDDEN_SIZE)
    compiled(fast, dynamic=True)
    for steps in (3, 8, 21):
        x = torch.randn(steps, BATCH, INPUT_SIZE)
        assert_results_close(forward_backward(fast, x), forward_backward(reference, x),
                             torch.float32)


def test_whole_model_with_inductor():
    """The default compiler, generating code for the layers around the RNN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(INPUT_SIZE, 8), nn.Tanh())
    rnn_pair = make_pair(nn.GRU, fastrnn.GRU, 8, HIDDEN_SIZE, num_layers=2)
    head = nn.Linear(HIDDEN_SIZE, 3)

    def full(rnn):
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.rnn, self.head = model, rnn, head

            def forward(self, x):
                output, _ = self.rnn(self.embed(x))
                return self.head(output[-1])
        return Model()

    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    expected = forward_backward(full(rnn_pair[0]), x)
    actual = forward_backward(compiled(full(rnn_pair[1]), backend="inductor"), x)
    assert_results_close(actual, expected, torch.float32)


@requires_triton
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["RNN_tanh", "GRU", "LSTM", "LSTM_proj"])
def test_triton_engine_compiles_to_one_graph(kind):
    """The Triton layer ops are custom operators too (on CPU: the interpreter)."""
    torch_cls, fast_cls, extra = MODULES[kind]
    reference, fast = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, bidirectional=True,
                                device=TRITON_DEVICE, **extra)
    x = torch.randn(SEQ_LEN, 3, INPUT_SIZE, device=TRITON_DEVICE)
    with fastrnn.use_backend("triton"):
        actual = forward_backward(compiled(fast), x)
    assert_results_close(actual, forward_backward(reference, x), torch.float32)


def test_packed_input_runs_compiled_with_graph_breaks():
    """PackedSequence sizes are data (batch_sizes), so like torch.nn it breaks the graph."""
    reference, fast = make_pair(nn.GRU, fastrnn.GRU, INPUT_SIZE, HIDDEN_SIZE)
    fast.compile(backend="aot_eager")
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    assert_results_close(forward_backward(fast, x, lengths=LENGTHS),
                         forward_backward(reference, x, lengths=LENGTHS), torch.float32)


def engine_ops_called(fn):
    """The fastrnn layer ops that ``fn()`` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events() if event.name.startswith("fastrnn::")}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_compiled_module_follows_a_backend_change(kind):
    """The engine is the one in force at each call, not the one at tracing:
    the compiled function guards on the backend setting."""
    _, fast_cls, extra = MODULES[kind]
    module = compiled(fast_cls(INPUT_SIZE, HIDDEN_SIZE, **extra))
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    with fastrnn.use_backend("reference"):
        assert engine_ops_called(lambda: module(x)) == set()
    assert "fastrnn::layer_forward" in engine_ops_called(lambda: module(x))
    with fastrnn.use_backend("reference"):
        assert engine_ops_called(lambda: module(x)) == set()


@requires_triton
@pytest.mark.cuda
def test_compiled_module_follows_a_strategy_change(monkeypatch):
    import fastrnn.triton.engine as engine

    planned = []
    plan = engine.plan

    def spy(*args):
        chosen = plan(*args)
        planned.append(chosen.strategy)
        return chosen

    monkeypatch.setattr(engine, "plan", spy)
    reference, fast = make_pair(nn.RNN, fastrnn.RNN, INPUT_SIZE, HIDDEN_SIZE, device=TRITON_DEVICE)
    module = compiled(fast)
    x = torch.randn(SEQ_LEN, 3, INPUT_SIZE, device=TRITON_DEVICE)
    expected = reference(x)[0]
    with fastrnn.use_backend("triton"):
        for strategy in ("tile", "stepwise", "tile"):
            planned.clear()
            with fastrnn.triton.use_strategy(strategy):
                torch.testing.assert_close(module(x)[0], expected, rtol=1e-5, atol=1e-5)
            assert planned == [strategy]


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("name", sorted(CELLS))
def test_parametrized_cell_compiles_to_one_graph(name):
    # A parametrized weight is not in the cell's parameter dict under its
    # name: the cell reads it as an attribute, inside the graph as well.
    # Without hx: the cell's zero states (an LSTMCell's two) made in the graph.
    torch_cls, fast_cls = CELLS[name]
    reference, fast = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE)
    for m in (reference, fast):
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh", _Doubled())
    x = torch.randn(BATCH, INPUT_SIZE)
    expected = forward_backward(reference, x)
    assert_results_close(forward_backward(compiled(fast), x), expected, torch.float32)
