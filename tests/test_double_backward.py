"""Second derivatives (``create_graph=True``): gradient penalties, Hessian-vector
products, ``gradgradcheck``.

torch.nn's RNN, GRU and cells are twice differentiable on the CPU; fastrnn's
must give the same second derivatives with respect to the input, the
initial state and every parameter, on both engines (the Triton one through
the interpreter without a GPU), and never a silent zero or ``None``.
"""

import pytest
import torch
import torch.nn as nn

import fastrnn
import fastrnn.autograd
from conftest import (BATCH, CELL_IDS, CELL_KINDS, CELLS, HIDDEN_SIZE, INPUT_SIZE, KINDS, LENGTHS, SEQ_LEN,
                      TRITON_DEVICE, apply_function, device_param, flatten_outputs, make_args, make_pair,
                      requires_triton)
from conftest import LSTM_CELL_KINDS, LSTM_KINDS, make_state

# Engines the Functions and modules run on here: (backend, device).
ENGINES = [pytest.param("cpp", "cpu", id="cpp"),
           pytest.param("triton", TRITON_DEVICE.type, id="triton", marks=[requires_triton, pytest.mark.cuda])]


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("lengths", [None, [2, 4, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("backend,device", ENGINES)
def test_function_gradgradcheck(cell, lengths, reverse, bias, backend, device):
    _, gates, nonlinearity = cell
    tensors = make_args(gates, T=4, B=3, I=3, H=4, bias=bias, lengths=lengths, dtype=torch.float64, seed=7)
    *inputs, lengths_t = tensors
    inputs = [None if t is None else t.detach().to(device).requires_grad_() for t in inputs]

    def fn(x, h0, w_ih, w_hh, b_ih, b_hh):
        return apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t, reverse)

    # Under the interpreter every forward takes a while: check random
    # projections of the Jacobians there (fast mode) instead of all of them.
    fast = backend == "triton" and device == "cpu"
    with fastrnn.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


def second_derivatives(module, x, hx, lengths=None, seed=5):
    """d/d(x, hx, params) of <w, d(<u, output> + <v, h_n>)/d(x, hx, params)>
    for fixed random u, v, w: a Hessian-vector product of the module."""
    device = next(module.parameters()).device
    x = x.detach().to(device).requires_grad_()
    states = hx if isinstance(hx, tuple) else (hx,)  # an LSTM's (h, c)
    states = tuple(h.detach().to(device).requires_grad_() for h in states)
    leaves = [x, *states, *module.parameters()]
    inputs = x if lengths is None else nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    result = module(inputs, states if isinstance(hx, tuple) else states[0])
    outputs = flatten_outputs(result)
    outputs = [o.data if isinstance(o, nn.utils.rnn.PackedSequence) else o for o in outputs]
    generator = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.randn(t.shape, dtype=t.dtype, generator=generator).to(t.device)  # noqa: E731
    loss = sum((o * rand(o)).sum() for o in outputs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    assert all(g.requires_grad for g in first), "a first derivative came back without a graph"
    penalty = sum((g * rand(g)).sum() for g in first)
    second = torch.autograd.grad(penalty, leaves, allow_unused=True)
    assert all(s is not None for s in second), "a second derivative came back as None"
    return [g.detach().cpu() for g in first], [s.cpu() for s in second]


def assert_same_derivatives(got, expected):
    for order, (got_order, expected_order) in enumerate(zip(got, expected), start=1):
        for i, (a, b) in enumerate(zip(got_order, expected_order)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * max(1.0, b.abs().max().item()),
                                       msg=lambda m, i=i, order=order: f"order {order}, leaf {i}: {m}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)], ids=["1layer", "2layers-bidir"])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("backend,device", ENGINES)
def test_module_second_derivatives_match_torch_nn(kind, num_layers, bidirectional, packed, backend, device):
    torch_cls, fast_cls, extra = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, num_layers=num_layers,
                                     bidirectional=bidirectional, dtype=torch.float64, **extra)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64, generator=generator)
    hx = torch.randn(num_layers * (1 + bidirectional), BATCH, HIDDEN_SIZE, dtype=torch.float64,
                     generator=generator)
    lengths = LENGTHS if packed else None
    expected = second_derivatives(reference, x, hx, lengths)
    with fastrnn.use_backend(backend):
        got = second_derivatives(candidate.to(device), x, hx, lengths)
    assert_same_derivatives(got, expected)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("backend,device", ENGINES)
def test_cell_second_derivatives_match_torch_nn(kind, backend, device):
    torch_cls, fast_cls, extra = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **extra)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, INPUT_SIZE, dtype=torch.float64, generator=generator)
    hx = torch.randn(BATCH, HIDDEN_SIZE, dtype=torch.float64, generator=generator)
    expected = second_derivatives(reference, x, hx)
    with fastrnn.use_backend(backend):
        got = second_derivatives(candidate.to(device), x, hx)
    assert_same_derivatives(got, expected)


@pytest.mark.parametrize("kind", list(LSTM_KINDS))
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)], ids=["1layer", "2layers-bidir"])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("backend,device", ENGINES)
def test_lstm_second_derivatives_match_torch_nn(kind, num_layers, bidirectional, packed, backend,
                                                device):
    torch_cls, fast_cls, extra = LSTM_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, num_layers=num_layers,
                                     bidirectional=bidirectional, dtype=torch.float64, **extra)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64, generator=generator)
    hx = make_state(kind, (num_layers * (1 + bidirectional), BATCH), torch.float64, generator)
    lengths = LENGTHS if packed else None
    expected = second_derivatives(reference, x, hx, lengths)
    with fastrnn.use_backend(backend):
        got = second_derivatives(candidate.to(device), x, hx, lengths)
    assert_same_derivatives(got, expected)


def test_lstm_cell_second_derivatives_match_torch_nn():
    reference, candidate = make_pair(*LSTM_CELL_KINDS["LSTMCell"][:2], INPUT_SIZE, HIDDEN_SIZE,
                                     dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, INPUT_SIZE, dtype=torch.float64, generator=generator)
    hx = make_state("LSTMCell", (BATCH,), torch.float64, generator)
    expected = second_derivatives(reference, x, hx)
    with fastrnn.use_backend("cpp"):
        got = second_derivatives(candidate, x, hx)
    assert_same_derivatives(got, expected)


@pytest.mark.parametrize("kind", ["RNN_relu", "GRU"])
@device_param
def test_module_gradgradcheck(kind, device):
    _, fast_cls, extra = KINDS[kind]
    torch.manual_seed(4)
    module = fast_cls(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64, device=device, **extra)
    x = torch.randn(4, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(4, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    params = list(module.parameters())

    def fn(x, hx, *weights):
        output, h_n = torch.func.functional_call(module, dict(zip(dict(module.named_parameters()), weights)),
                                                 (x, hx))
        return output, h_n

    assert torch.autograd.gradgradcheck(fn, (x, hx, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["RNN_tanh", "GRU"])
@device_param
def test_gradient_penalty_training_step_matches_torch_nn(kind, device):
    """A WGAN-GP critic step: loss + 10 * (|d critic / d x| - 1)^2, one SGD step."""
    torch_cls, fast_cls, extra = KINDS[kind]

    def critic(rnn_cls):
        torch.manual_seed(6)
        return nn.Sequential(rnn_cls(INPUT_SIZE, HIDDEN_SIZE, batch_first=True, dtype=torch.float64, **extra),
                             Last(), nn.Linear(HIDDEN_SIZE, 1, dtype=torch.float64))

    generator = torch.Generator().manual_seed(8)
    x = torch.randn(BATCH, SEQ_LEN, INPUT_SIZE, dtype=torch.float64, generator=generator)
    results = []
    for model, on in ((critic(torch_cls), "cpu"), (critic(fast_cls).to(device), device)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            real = x.to(on).requires_grad_()
            score = model(real)
            grad, = torch.autograd.grad(score.sum(), real, create_graph=True)
            penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss = -score.mean() + 10 * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


class Last(nn.Module):
    """The last step's output of a batch-first recurrent layer."""

    def forward(self, result):
        return result[0][:, -1]


@pytest.mark.parametrize("kind", list(KINDS))
def test_first_order_backward_keeps_the_engine_sweep(kind, monkeypatch):
    # Without create_graph the engine's fused backward runs, never the
    # reference loop's graph.
    _, fast_cls, extra = KINDS[kind]
    module = fast_cls(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **extra)
    called = []
    monkeypatch.setattr(fastrnn.autograd, "_differentiable_gradients",
                        lambda *args: called.append(args) or pytest.fail("reference path taken"))
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64, requires_grad=True)
    output, h_n = module(x)
    torch.autograd.grad(output.sum() + h_n.sum(), [x, *module.parameters()])
    assert not called


@pytest.mark.parametrize("engine", ["cpp", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("kind", ["GRU", "LSTM_proj", "GRUCell", "LSTMCell"])
def test_batched_backward_as_torch_nn(kind, engine):
    # A batched backward runs the layer's backward under vmap:
    # autograd.grad's is_grads_batched, autograd.functional's vectorized
    # Jacobians and Hessians, gradcheck's check_batched_grad. The engines'
    # ops have no batching rule; the gradients come from the reference
    # loop's plain ops, torch.nn's (on the CPU) in float64. On the C++
    # engine its own autograd node takes that path, on the Triton engine
    # the Python Function.
    table = {**KINDS, **LSTM_KINDS, **CELL_KINDS, **LSTM_CELL_KINDS}
    torch_cls, fast_cls, kwargs = table[kind]
    reference, model = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64,
                                 **kwargs)
    device = TRITON_DEVICE if engine == "triton" else torch.device("cpu")
    model.to(device)
    shape = (BATCH, INPUT_SIZE) if kind.endswith("Cell") else (SEQ_LEN, BATCH, INPUT_SIZE)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def first(m):
        return lambda x: flatten_outputs(m(x.to(next(m.parameters()).device)))[0]

    results = []
    with fastrnn.use_backend(engine):
        for m in (reference, model):
            leaf = x.clone().requires_grad_()
            out = first(m)(leaf)
            upstream = torch.randn((2, *out.shape), dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(4)).to(out.device)
            grads = torch.autograd.grad(out, [leaf, *m.parameters()], upstream,
                                        is_grads_batched=True)
            jacobian = torch.autograd.functional.jacobian(first(m), x, vectorize=True)
            hessian = torch.autograd.functional.hessian(lambda x: first(m)(x).square().sum(), x,
                                                        vectorize=True)
            results.append([*grads, jacobian, hessian])
        for got, expected in zip(results[1], results[0], strict=True):
            assert not got.requires_grad
            torch.testing.assert_close(got.cpu(), expected)
        if engine == "cpp":  # (gradcheck's numerical Jacobian is slow in the interpreter)
            assert torch.autograd.gradcheck(first(model), x.clone().requires_grad_(),
                                            check_batched_grad=True)
