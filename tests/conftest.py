"""Shared utilities for the fastrnn test suite.

The parity tests build a ``torch.nn`` module and the matching ``fastrnn``
module with identical weights, feed both the same inputs and the same
upstream gradients, and compare every output and every gradient.
"""

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

# Without a GPU the Triton kernels run on CPU tensors under the interpreter,
# which must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastrnn  # noqa: E402
import fastrnn.autograd  # noqa: E402
import fastrnn.reference  # noqa: E402

# Small default sizes keep the whole suite fast on a couple of CPU cores.
INPUT_SIZE = 7
HIDDEN_SIZE = 13
BATCH = 5
SEQ_LEN = 9
# Unsorted on purpose: exercises the sort/unsort permutation of packed input.
LENGTHS = [9, 3, 7, 1, 5]

# Per-dtype comparison tolerances. Both implementations evaluate the same
# formulas; differences come only from the order of floating point
# reductions, so float64 results agree to a handful of ulps.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # Half types: inputs, outputs and the projection GEMM round to 8 (bf16)
    # or 11 (fp16) bits; the state and gradients stay float32.
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}

# Where the Triton engine's tests run: the GPU when there is one, else CPU
# tensors under the Triton interpreter.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if torch.cuda.is_available():
    # cuDNN's float32 RNNs would otherwise run their products in TF32, ten
    # bits of mantissa: no reference at float32 tolerances.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# Tests marked `cuda` run on a CUDA device when one is present (the device
# check, `make gpu-check`, selects them with `-m cuda`): those taking the
# `device` parameter run once per device, the CUDA case skipped without one;
# the Triton engine's (on TRITON_DEVICE) run on the GPU or the interpreter.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
on_cuda = [pytest.mark.cuda, needs_cuda]
device_param = pytest.mark.parametrize(
    "device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=on_cuda)])

# Module kinds under test: (torch.nn class, fastrnn class, extra constructor kwargs).
KINDS = {
    "RNN_tanh": (nn.RNN, fastrnn.RNN, {"nonlinearity": "tanh"}),
    "RNN_relu": (nn.RNN, fastrnn.RNN, {"nonlinearity": "relu"}),
    "GRU": (nn.GRU, fastrnn.GRU, {}),
}

# LSTMs, without and with a projection (h is PROJ_SIZE wide, c HIDDEN_SIZE).
PROJ_SIZE = 5
LSTM_KINDS = {
    "LSTM": (nn.LSTM, fastrnn.LSTM, {}),
    "LSTM_proj": (nn.LSTM, fastrnn.LSTM, {"proj_size": PROJ_SIZE}),
}
ALL_MODULE_KINDS = {**KINDS, **LSTM_KINDS}

# Cells with their constructor kwargs, like KINDS for the layered modules.
CELL_KINDS = {
    "RNNCell_tanh": (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "tanh"}),
    "RNNCell_relu": (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "relu"}),
    "GRUCell": (nn.GRUCell, fastrnn.GRUCell, {}),
}
LSTM_CELL_KINDS = {"LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell, {})}
ALL_CELL_KINDS = {**CELL_KINDS, **LSTM_CELL_KINDS}


def make_state(kind, leading, dtype, generator=None, fill=None, hidden=HIDDEN_SIZE):
    """A random initial state for a module or cell of ``kind`` (``fill``: of
    that value): one tensor of shape (*leading, hidden), or for an LSTM the
    tuple (h, c), h PROJ_SIZE wide with a projection."""
    def make(width):
        if fill is not None:
            return torch.full((*leading, width), float(fill), dtype=dtype)
        return torch.randn(*leading, width, dtype=dtype, generator=generator)
    if kind in LSTM_KINDS or kind in LSTM_CELL_KINDS:
        extra = {**LSTM_KINDS, **LSTM_CELL_KINDS}[kind][2]
        return make(extra.get("proj_size", 0) or hidden), make(hidden)
    return make(hidden)


def flatten_outputs(outputs):
    """A module's (output, h_n) or (output, (h_n, c_n)) as a flat list."""
    return _flatten(outputs)

DTYPE_IDS = {torch.float64: "float64", torch.float32: "float32"}


def dtype_id(dtype):
    return DTYPE_IDS[dtype]


def assert_close(actual, expected, dtype=None, msg=None):
    """``torch.testing.assert_close`` with the tolerance of ``dtype``.

    The absolute tolerance is scaled by the largest magnitude in ``expected``
    (when above 1): gradients are sums over time steps and batch entries, so
    an element that is small because of cancellation carries a rounding error
    proportional to the size of the terms, not to its own size.
    """
    dtype = expected.dtype if dtype is None else dtype
    tol = dict(TOLERANCES[dtype])
    if expected.numel() > 0 and expected.is_floating_point():
        tol["atol"] *= max(1.0, expected.detach().abs().max().item())
    kwargs = {}
    if msg is not None:
        kwargs["msg"] = lambda default: f"{msg}: {default}"
    torch.testing.assert_close(actual, expected, **tol, **kwargs)


def copy_weights(src, dst):
    """Load the parameters of ``src`` into ``dst`` (strict state_dict load)."""
    dst.load_state_dict(src.state_dict(), strict=True)
    return dst


def make_pair(torch_cls, fast_cls, *args, seed=0, **kwargs):
    """Build ``torch_cls(*args, **kwargs)`` and ``fast_cls(*args, **kwargs)``
    with identical parameters (the torch.nn ones)."""
    torch.manual_seed(seed)
    reference = torch_cls(*args, **kwargs)
    candidate = fast_cls(*args, **kwargs)
    copy_weights(reference, candidate)
    return reference, candidate


def random_like_shape(shape, dtype, generator):
    return torch.randn(shape, dtype=dtype, generator=generator)


def _flatten(outputs):
    if isinstance(outputs, (tuple, list)) and not isinstance(outputs, PackedSequence):
        return [t for out in outputs for t in _flatten(out)]
    return [outputs]


def forward_backward(module, x, hx=None, lengths=None, batch_first=False, grad_seed=1234,
                     upstream_dtype=None, only=None):
    """Run ``module`` forward and backward and collect everything of interest.

    ``x`` and ``hx`` are copied into fresh leaves on the module's device
    that require grad. When
    ``lengths`` is given, ``x`` is packed with
    ``pack_padded_sequence(..., enforce_sorted=False)`` before the call and
    the input gradient is taken with respect to the padded tensor.

    Random upstream gradients (drawn from a private generator seeded with
    ``grad_seed``, so the global RNG is untouched) are applied to every
    output, e.g. both ``output`` and ``h_n`` of an RNN; to the output named
    ``only`` alone when given.

    ``hx`` may be a tuple (an LSTM's (h_0, c_0)); the outputs' nested
    tuples are flattened: an LSTM's ``output``, ``h_n``, ``c_n`` (an
    LSTMCell's ``h``, ``c``).

    Returns a dict: ``output``/``h_n`` (or ``output`` for cells), packed
    metadata when relevant, ``grad_input``, ``grad_hx`` (``grad_h0`` and
    ``grad_c0`` for a tuple) when hx is given and ``grad_<name>`` for every
    named parameter.
    """
    device = next(module.parameters()).device
    x = x.detach().to(device).clone().requires_grad_(True)
    leaves = {"input": x}
    args = []
    if lengths is not None:
        lengths_t = torch.as_tensor(lengths, dtype=torch.int64)
        args.append(pack_padded_sequence(x, lengths_t, batch_first=batch_first, enforce_sorted=False))
    else:
        args.append(x)
    if isinstance(hx, tuple):
        hx = tuple(h.detach().to(device).clone().requires_grad_(True) for h in hx)
        leaves.update(zip(("h0", "c0"), hx))
        args.append(hx)
    elif hx is not None:
        hx = hx.detach().to(device).clone().requires_grad_(True)
        leaves["hx"] = hx
        args.append(hx)

    outputs = _flatten(module(*args))
    names = {1: ["output"], 2: ["output", "h_n"], 3: ["output", "h_n", "c_n"]}[len(outputs)]
    if isinstance(module, (nn.LSTMCell, fastrnn.LSTMCell)):
        names = ["h", "c"]

    result = {}
    tensors = []
    for name, out in zip(names, outputs):
        if isinstance(out, PackedSequence):
            result["batch_sizes"] = out.batch_sizes
            result["sorted_indices"] = out.sorted_indices
            result["unsorted_indices"] = out.unsorted_indices
            out = out.data
        assert isinstance(out, torch.Tensor), f"{name} is {type(out)!r}"
        result[name] = out.detach()
        tensors.append(out)

    generator = torch.Generator().manual_seed(grad_seed)
    # upstream_dtype: draw the upstream gradients as another run in that
    # dtype draws them (randn's values depend on the dtype).
    upstream = [random_like_shape(t.shape, upstream_dtype or t.dtype, generator).to(t)
                for t in tensors]
    if only is not None:
        kept = [i for i, name in enumerate(names) if name == only]
        assert kept, f"no output named {only!r} in {names}"
        tensors, upstream = [tensors[i] for i in kept], [upstream[i] for i in kept]

    params = dict(module.named_parameters())
    inputs = list(leaves.values()) + list(params.values())
    grads = torch.autograd.grad(tensors, inputs, grad_outputs=upstream, allow_unused=True, materialize_grads=True)
    names = ["grad_" + n for n in leaves] + ["grad_" + n for n in params]
    result.update(zip(names, grads))
    return result


def assert_results_close(actual, expected, dtype):
    """Compare two dicts produced by :func:`forward_backward`, on any devices."""
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        if value is None:
            assert got is None, key
            continue
        got, value = got.cpu(), value.cpu()
        if key in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert torch.equal(got, value), f"{key}: {got} != {value}"
            continue
        assert got.shape == value.shape, f"{key}: shape {tuple(got.shape)} != {tuple(value.shape)}"
        assert got.dtype == value.dtype, f"{key}: dtype {got.dtype} != {value.dtype}"
        assert_close(got, value, dtype, msg=key)


def count_graph_nodes(grad_fn):
    """Number of distinct autograd nodes reachable from ``grad_fn``."""
    seen = set()
    stack = [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def capture_exception(fn):
    """Call ``fn`` and return ``(exception type, message)``, or ``None`` if it
    did not raise."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type is part of the result
        return type(exc), str(exc)
    return None


def assert_same_exception(torch_fn, fast_fn):
    """Both callables must raise the same exception type with the same
    message. Returns the captured ``(type, message)``."""
    expected = capture_exception(torch_fn)
    assert expected is not None, "torch.nn did not raise for this case"
    got = capture_exception(fast_fn)
    assert got is not None, f"fastrnn did not raise; torch.nn raised {expected[0].__name__}: {expected[1]}"
    assert got[0] is expected[0], f"exception type {got[0].__name__} != {expected[0].__name__} ({got[1]!r} vs {expected[1]!r})"
    assert got[1] == expected[1]
    return expected


def capture_warnings(fn):
    """Call ``fn`` and return the list of ``(category, message)`` warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in caught]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


# The Triton engine is optional (`pip install fastrnn[gpu]`): its tests skip
# where triton is not installed, as in a wheel installed with torch alone.
requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is not installed")


# ---------------------------------------------------------------------------
# One layer in one direction: the autograd Functions and the reference loop
# ---------------------------------------------------------------------------

# (name, number of gate blocks, nonlinearity or None for GRU)
CELLS = [("RNN_tanh", 1, "tanh"), ("RNN_relu", 1, "relu"), ("GRU", 3, None)]
CELL_IDS = [c[0] for c in CELLS]


def make_args(gates, T, B, I, H, bias, lengths, dtype, seed, requires_grad=True):
    """Random (x, h0, w_ih, w_hh, b_ih, b_hh, lengths) for one layer of ``gates`` gate blocks."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, dtype=dtype, generator=generator) * 0.5
        return t.requires_grad_(requires_grad)

    x = rand(T, B, I)
    h0 = rand(B, H)
    w_ih = rand(gates * H, I)
    w_hh = rand(gates * H, H)
    b_ih = rand(gates * H) if bias else None
    b_hh = rand(gates * H) if bias else None
    lengths_t = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t


def cell_name(nonlinearity):
    """The ``fastrnn.cells`` name of a CELLS entry's cell (GRU for nonlinearity None)."""
    return "gru" if nonlinearity is None else f"rnn_{nonlinearity}"


def apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """(output, h_n) of the layer's autograd Function (GRU for nonlinearity None)."""
    output, (h_n,) = fastrnn.autograd.layer(cell_name(nonlinearity), x, (h0,), w_ih, w_hh, b_ih,
                                            b_hh, lengths, reverse)
    return output, h_n


def apply_reference(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """(output, h_n) of the same layer by the reference loop."""
    output, (h_n,) = fastrnn.reference.layer(cell_name(nonlinearity), x, (h0,), w_ih, w_hh, b_ih,
                                             b_hh, lengths, reverse)
    return output, h_n


# ---------------------------------------------------------------------------
# Shared by the files split from test_hardening.py (bad arguments, zero
# sizes, engine calls, extreme values, long sequences, non-contiguous
# inputs, tied and replaced parameters, torch.func, threads)
# ---------------------------------------------------------------------------

import signal  # noqa: E402

# The recurrent modules and cells by class name: (torch.nn class, fastrnn class).
MODULES = {
    "RNN": (nn.RNN, fastrnn.RNN),
    "GRU": (nn.GRU, fastrnn.GRU),
    "RNNCell": (nn.RNNCell, fastrnn.RNNCell),
    "GRUCell": (nn.GRUCell, fastrnn.GRUCell),
}


@pytest.fixture
def intra_op_threads():
    """One intra-op thread for the test; yields the usual count.

    The tensors of the tests that use it are small: no step is big enough
    for the engine to split, and one thread keeps the tiny per-step BLAS
    calls from stalling on a busy CPU. (Those files apply it to every test
    with ``pytestmark = pytest.mark.usefixtures("intra_op_threads")``.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


def describe_exit(returncode):
    """How a child process ended, for a failure message: the signal that killed it, or its exit status."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def tie(module):
    """Ties parameters of a 2-layer bidirectional RNN/GRU in place."""
    # Shared across directions and across layers (the shapes allow it).
    module.bias_ih_l0_reverse = module.bias_ih_l0
    module.weight_hh_l0_reverse = module.weight_hh_l0
    module.weight_hh_l1 = module.weight_hh_l0
    module.weight_ih_l1_reverse = module.weight_ih_l1
