"""Parameters, state_dict, initialisation, pickling and module attributes."""

import io
import pickle

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import BATCH, HIDDEN_SIZE, INPUT_SIZE, SEQ_LEN, assert_close

# (id, torch.nn class, fastrnn class, kwargs)
MODULES = [
    ("RNN_tanh", nn.RNN, fastrnn.RNN, dict(num_layers=2, bidirectional=True)),
    ("RNN_relu", nn.RNN, fastrnn.RNN, dict(num_layers=2, bidirectional=True, nonlinearity="relu")),
    ("GRU", nn.GRU, fastrnn.GRU, dict(num_layers=2, bidirectional=True)),
    ("RNNCell_tanh", nn.RNNCell, fastrnn.RNNCell, dict()),
    ("RNNCell_relu", nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="relu")),
    ("GRUCell", nn.GRUCell, fastrnn.GRUCell, dict()),
]
MODULE_IDS = [m[0] for m in MODULES]
RECURRENT = [m for m in MODULES if "Cell" not in m[0]]
RECURRENT_IDS = [m[0] for m in RECURRENT]

module_param = pytest.mark.parametrize("spec", MODULES, ids=MODULE_IDS)
recurrent_param = pytest.mark.parametrize("spec", RECURRENT, ids=RECURRENT_IDS)
bias_param = pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])


def is_cell(spec):
    return "Cell" in spec[0]


def sample_input(spec, dtype=torch.float64):
    generator = torch.Generator().manual_seed(21)
    if is_cell(spec):
        return torch.randn(BATCH, INPUT_SIZE, dtype=dtype, generator=generator)
    return torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=dtype, generator=generator)


def run(module, x):
    out = module(x)
    return out if isinstance(out, tuple) else (out,)


def build(spec, which, bias=True, seed=0, **overrides):
    _, torch_cls, fast_cls, kwargs = spec
    cls = torch_cls if which == "torch" else fast_cls
    torch.manual_seed(seed)
    return cls(INPUT_SIZE, HIDDEN_SIZE, bias=bias, **{**kwargs, **overrides})


@module_param
@bias_param
def test_parameter_names_and_shapes(spec, bias):
    reference = build(spec, "torch", bias)
    candidate = build(spec, "fast", bias)
    assert [n for n, _ in candidate.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert {n: p.shape for n, p in candidate.named_parameters()} == {
        n: p.shape for n, p in reference.named_parameters()
    }
    assert list(candidate.state_dict()) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert candidate.state_dict()[name].shape == tensor.shape, name
    assert [n for n, _ in candidate.named_buffers()] == [n for n, _ in reference.named_buffers()]


@module_param
@bias_param
def test_same_initialisation(spec, bias):
    """With the same seed, the constructors draw identical parameters."""
    reference = build(spec, "torch", bias, seed=1234)
    candidate = build(spec, "fast", bias, seed=1234)
    for (name, p_ref), (_, p_new) in zip(reference.named_parameters(), candidate.named_parameters()):
        assert p_new.dtype == p_ref.dtype, name
        assert torch.equal(p_new, p_ref), name
    # Both consumed the same amount of randomness.
    torch.manual_seed(1234)
    build(spec, "torch", bias, seed=1234)
    after_torch = torch.rand(3)
    build(spec, "fast", bias, seed=1234)
    after_fast = torch.rand(3)
    assert torch.equal(after_fast, after_torch)


@module_param
@bias_param
def test_state_dict_torch_to_fastrnn(spec, bias):
    reference = build(spec, "torch", bias, seed=1, dtype=torch.float64)
    candidate = build(spec, "fast", bias, seed=2, dtype=torch.float64)
    result = candidate.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in reference.state_dict().items():
        assert torch.equal(candidate.state_dict()[name], tensor), name
    x = sample_input(spec)
    for got, expected in zip(run(candidate, x), run(reference, x)):
        assert_close(got, expected)


@module_param
@bias_param
def test_state_dict_fastrnn_to_torch(spec, bias):
    candidate = build(spec, "fast", bias, seed=3, dtype=torch.float64)
    reference = build(spec, "torch", bias, seed=4, dtype=torch.float64)
    result = reference.load_state_dict(candidate.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in candidate.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor), name
    x = sample_input(spec)
    for got, expected in zip(run(candidate, x), run(reference, x)):
        assert_close(got, expected)


@module_param
@pytest.mark.parametrize("method", ["pickle", "torch.save"])
def test_pickle_round_trip(spec, method):
    module = build(spec, "fast", seed=5, dtype=torch.float64)
    if method == "pickle":
        restored = pickle.loads(pickle.dumps(module))
    else:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
    assert type(restored) is type(module)
    assert repr(restored) == repr(module)
    for (name, p), (name_r, p_r) in zip(module.named_parameters(), restored.named_parameters()):
        assert name == name_r
        assert torch.equal(p, p_r), name
    x = sample_input(spec)
    for got, expected in zip(run(restored, x), run(module, x)):
        assert_close(got, expected)


@module_param
def test_state_dict_torch_save_load(spec):
    module = build(spec, "fast", seed=6, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    other = build(spec, "fast", seed=7, dtype=torch.float64)
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = sample_input(spec)
    for got, expected in zip(run(other, x), run(module, x)):
        assert_close(got, expected)


@module_param
def test_meta_device(spec):
    module = build(spec, "fast", device="meta")
    params = list(module.parameters())
    assert params
    assert all(p.is_meta for p in params)
    reference = build(spec, "torch", device="meta")
    assert [(n, p.shape) for n, p in module.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()
    ]


@module_param
def test_meta_to_empty_then_load(spec):
    module = build(spec, "fast", device="meta", dtype=torch.float64)
    module = module.to_empty(device="cpu")
    reference = build(spec, "torch", seed=8, dtype=torch.float64)
    module.load_state_dict(reference.state_dict(), strict=True)
    x = sample_input(spec)
    for got, expected in zip(run(module, x), run(reference, x)):
        assert_close(got, expected)


REPR_CASES = [
    ("GRU", (3, 4), dict(num_layers=2, bidirectional=True)),
    ("GRU", (3, 4), dict()),
    ("GRU", (3, 4), dict(bias=False, batch_first=True, dropout=0.25, num_layers=3)),
    ("RNN", (3, 4), dict()),
    ("RNN", (3, 4), dict(nonlinearity="relu", num_layers=2, bidirectional=True, batch_first=True)),
    ("RNN", (5, 6), dict(bias=False, dropout=0.5, num_layers=2)),
    ("RNNCell", (3, 4), dict()),
    ("RNNCell", (3, 4), dict(nonlinearity="relu", bias=False)),
    ("GRUCell", (3, 4), dict()),
    ("GRUCell", (3, 4), dict(bias=False)),
]


def repr_case_id(case):
    name, args, kwargs = case
    return "-".join([name, *map(str, args), *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.mark.parametrize("case", REPR_CASES, ids=repr_case_id)
def test_repr(case):
    name, args, kwargs = case
    expected = repr(getattr(nn, name)(*args, **kwargs))
    got = repr(getattr(fastrnn, name)(*args, **kwargs))
    # Same class name, so the representation must match exactly.
    assert got == expected


@recurrent_param
@bias_param
def test_flatten_parameters(spec, bias):
    module = build(spec, "fast", bias, dtype=torch.float64)
    x = sample_input(spec)
    before = run(module, x)
    assert module.flatten_parameters() is None
    after = run(module, x)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


@recurrent_param
@bias_param
def test_all_weights(spec, bias):
    reference = build(spec, "torch", bias)
    candidate = build(spec, "fast", bias)
    shapes = lambda m: [[tuple(w.shape) for w in layer] for layer in m.all_weights]
    assert shapes(candidate) == shapes(reference)
    params = dict(candidate.named_parameters())
    for layer in candidate.all_weights:
        for w in layer:
            assert any(w is p for p in params.values())


@recurrent_param
@bias_param
def test_flat_weights(spec, bias):
    reference = build(spec, "torch", bias)
    candidate = build(spec, "fast", bias)
    assert hasattr(candidate, "_flat_weights")
    assert [tuple(w.shape) for w in candidate._flat_weights] == [tuple(w.shape) for w in reference._flat_weights]
    assert list(candidate._flat_weights_names) == list(reference._flat_weights_names)
    for name, w in zip(candidate._flat_weights_names, candidate._flat_weights):
        assert torch.equal(w, getattr(candidate, name)), name


@recurrent_param
def test_attributes(spec):
    reference = build(spec, "torch", batch_first=True, dropout=0.25)
    candidate = build(spec, "fast", batch_first=True, dropout=0.25)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(candidate, attr) == getattr(reference, attr), attr
    if spec[1] is nn.RNN:
        assert candidate.nonlinearity == reference.nonlinearity


@module_param
def test_to_dtype(spec):
    """``.double()`` / ``.float()`` convert parameters and the module runs."""
    reference = build(spec, "torch", seed=9).double()
    candidate = build(spec, "fast", seed=9).double()
    assert all(p.dtype == torch.float64 for p in candidate.parameters())
    x = sample_input(spec)
    for got, expected in zip(run(candidate, x), run(reference, x)):
        assert_close(got, expected)
    candidate = candidate.float()
    reference = reference.float()
    x = x.float()
    for got, expected in zip(run(candidate, x), run(reference, x)):
        assert_close(got, expected)
