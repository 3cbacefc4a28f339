"""Property-based parity fuzzing of fastrnn against torch.nn.

Hypothesis draws a module configuration (kind, sizes, layers, directions,
bias, batch_first, dropout, train/eval, dtype; an LSTM's proj_size) and an
input form (unbatched, batched, packed with unsorted or sorted lengths, with
or without hx, in a contiguous or a permuted memory layout). Both modules get the same weights,
inputs and upstream gradients; outputs, h_n (an LSTM's c_n too) and every
gradient (input, hx, each parameter) must agree, on the default engine and
on the Triton engine.

In CI the examples are few and derandomized, so a run is reproducible. For a
longer, randomized hunt set

    FASTRNN_FUZZ_EXAMPLES=2000          (default engine, CPU)
    FASTRNN_FUZZ_TRITON_EXAMPLES=100    (Triton engine)

A failure prints the drawn ``Case`` and a ``@reproduce_failure`` blob.
"""

import dataclasses
import os
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
import fastrnn.backends
from conftest import (CELL_KINDS, KINDS, LSTM_CELL_KINDS, LSTM_KINDS, TRITON_DEVICE, assert_results_close,
                      forward_backward, make_pair)

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALL_KINDS = {**KINDS, **CELL_KINDS}
# An LSTM's proj_size is drawn, so one kind stands for both.
LSTM_FUZZ_KINDS = {"LSTM": LSTM_KINDS["LSTM"], **LSTM_CELL_KINDS}
FUZZ_KINDS = {**ALL_KINDS, **LSTM_FUZZ_KINDS}

CPP_EXAMPLES = os.environ.get("FASTRNN_FUZZ_EXAMPLES")
TRITON_EXAMPLES = os.environ.get("FASTRNN_FUZZ_TRITON_EXAMPLES")

# Each example builds its own modules and seeds its own generators, so the
# function-scoped autouse seeding fixture does not leak between examples.
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# CI: the same examples every run.
settings.register_profile("fastrnn-ci", derandomize=True, database=None, **_COMMON)
# Long hunts: new examples each run; failures are saved to .hypothesis/ and replayed first.
settings.register_profile("fastrnn-fuzz", derandomize=False, **_COMMON)


def fuzz_settings(env_value, ci_examples):
    if env_value:
        return settings(settings.get_profile("fastrnn-fuzz"), max_examples=int(env_value))
    return settings(settings.get_profile("fastrnn-ci"), max_examples=ci_examples)


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    dtype: torch.dtype
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    dropout: float
    training: bool
    # "unbatched", "batched", "packed" (enforce_sorted=False) or "packed_sorted".
    input_kind: str
    seq_len: int
    batch: int
    lengths: tuple | None
    hx_given: bool
    # Inputs stored with their dimensions in reverse order (dense, not contiguous).
    permuted: bool
    seed: int
    # An LSTM's projection (0: none), below hidden_size.
    proj_size: int = 0

    @property
    def is_cell(self):
        return self.kind in CELL_KINDS or self.kind in LSTM_CELL_KINDS

    @property
    def is_lstm(self):
        return self.kind in LSTM_FUZZ_KINDS


@st.composite
def cases(draw, kinds, max_seq_len, max_batch, max_size, max_layers):
    kind = draw(st.sampled_from(list(kinds)))
    is_cell = kind in CELL_KINDS or kind in LSTM_CELL_KINDS
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    input_size = draw(st.integers(1, max_size))
    hidden_size = draw(st.integers(1, max_size))
    bias = draw(st.booleans())
    hx_given = draw(st.booleans())
    training = draw(st.booleans())
    if is_cell:
        num_layers, bidirectional, batch_first, dropout, seq_len = 1, False, False, 0.0, 1
        input_kind = draw(st.sampled_from(["unbatched", "batched"]))
    else:
        num_layers = draw(st.sampled_from(range(1, max_layers + 1)))
        bidirectional = draw(st.booleans())
        batch_first = draw(st.booleans())
        dropout = draw(st.sampled_from([0.0, 0.4]))
        input_kind = draw(st.sampled_from(["unbatched", "batched", "packed", "packed_sorted"]))
        seq_len = draw(st.integers(1, max_seq_len))
    packed = input_kind.startswith("packed")
    if input_kind == "unbatched":
        batch = 1
    else:
        # Batch 0 works in torch.nn except with packing (which needs a sequence).
        batch = draw(st.integers(1 if packed else 0, max_batch))
    lengths = None
    if packed:
        lengths = draw(st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch))
        if input_kind == "packed_sorted":
            lengths = sorted(lengths, reverse=True)
        lengths = tuple(lengths)
    permuted = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    proj_size = 0
    if kind == "LSTM" and hidden_size > 1 and draw(st.booleans()):
        proj_size = draw(st.integers(1, hidden_size - 1))
    return Case(kind, dtype, input_size, hidden_size, num_layers, bidirectional, bias, batch_first,
                dropout, training, input_kind, seq_len, batch, lengths, hx_given, permuted, seed,
                proj_size)


class PackSorted(nn.Module):
    """Packs its padded input with enforce_sorted=True before the wrapped
    module (forward_backward packs with enforce_sorted=False)."""

    def __init__(self, rnn, lengths):
        super().__init__()
        self.rnn = rnn
        self.lengths = torch.tensor(lengths, dtype=torch.int64)

    def forward(self, x, hx=None):
        packed = pack_padded_sequence(x, self.lengths, batch_first=self.rnn.batch_first, enforce_sorted=True)
        return self.rnn(packed, hx)


def build_pair(case):
    torch_cls, fast_cls, extra = FUZZ_KINDS[case.kind]
    kwargs = dict(bias=case.bias, dtype=case.dtype, **extra)
    if case.proj_size:
        kwargs["proj_size"] = case.proj_size
    if not case.is_cell:
        kwargs.update(num_layers=case.num_layers, bidirectional=case.bidirectional,
                      batch_first=case.batch_first, dropout=case.dropout)
    with warnings.catch_warnings():
        # dropout > 0 with one layer: torch.nn warns that it does nothing.
        warnings.simplefilter("ignore", UserWarning)
        reference, candidate = make_pair(torch_cls, fast_cls, case.input_size, case.hidden_size,
                                         seed=case.seed, **kwargs)
    reference.train(case.training)
    candidate.train(case.training)
    if case.input_kind == "packed_sorted":
        reference, candidate = PackSorted(reference, case.lengths), PackSorted(candidate, case.lengths)
    return reference, candidate


def make_inputs(case):
    generator = torch.Generator().manual_seed(case.seed)
    I, H, B, T = case.input_size, case.hidden_size, case.batch, case.seq_len
    unbatched = case.input_kind == "unbatched"
    if case.is_cell:
        x_shape = (I,) if unbatched else (B, I)
        hx_shape = (H,) if unbatched else (B, H)
    else:
        states = case.num_layers * (2 if case.bidirectional else 1)
        if unbatched:
            x_shape, hx_shape = (T, I), (states, H)
        else:
            x_shape = (B, T, I) if case.batch_first else (T, B, I)
            hx_shape = (states, B, H)
    x = random_tensor(x_shape, case, generator)
    hx = None
    if case.hx_given and case.is_lstm:
        # (h, c): h is proj_size wide with a projection.
        h_shape = (*hx_shape[:-1], case.proj_size or H)
        hx = random_tensor(h_shape, case, generator), random_tensor(hx_shape, case, generator)
    elif case.hx_given:
        hx = random_tensor(hx_shape, case, generator)
    return x, hx


def random_tensor(shape, case, generator):
    if not case.permuted:
        return torch.randn(shape, dtype=case.dtype, generator=generator)
    # forward_backward's clone keeps these strides (dense, non-overlapping).
    return torch.randn(shape[::-1], dtype=case.dtype, generator=generator).permute(*reversed(range(len(shape))))


def run(module, case, x, hx, device=None):
    lengths = case.lengths if case.input_kind == "packed" else None
    if device is not None:
        x = x.to(device)
        if isinstance(hx, tuple):
            hx = tuple(h.to(device) for h in hx)
        elif hx is not None:
            hx = hx.to(device)
    # Same global RNG state for both modules: identical dropout masks in training.
    torch.manual_seed(case.seed)
    result = forward_backward(module, x, hx, lengths=lengths, batch_first=case.batch_first,
                              grad_seed=case.seed + 1)
    return {key: None if value is None else value.cpu() for key, value in result.items()}


def check_case(case, device=None):
    reference, candidate = build_pair(case)
    if device is not None:
        candidate.to(device)
    x, hx = make_inputs(case)
    expected = run(reference, case, x, hx)
    got = run(candidate, case, x, hx, device)
    assert_results_close(got, expected, case.dtype)


# Modules and cells apart, so each gets its share of the examples.
@fuzz_settings(CPP_EXAMPLES, ci_examples=200)
@given(case=cases(KINDS, max_seq_len=8, max_batch=6, max_size=12, max_layers=3))
def test_fuzz_modules_default_engine(case):
    check_case(case)


@fuzz_settings(CPP_EXAMPLES, ci_examples=50)
@given(case=cases(CELL_KINDS, max_seq_len=1, max_batch=6, max_size=12, max_layers=1))
def test_fuzz_cells_default_engine(case):
    check_case(case)


@fuzz_settings(CPP_EXAMPLES, ci_examples=100)
@given(case=cases({"LSTM": LSTM_KINDS["LSTM"]}, max_seq_len=8, max_batch=6, max_size=12,
                  max_layers=3))
def test_fuzz_lstm_default_engine(case):
    check_case(case)


@fuzz_settings(CPP_EXAMPLES, ci_examples=30)
@given(case=cases(LSTM_CELL_KINDS, max_seq_len=1, max_batch=6, max_size=12, max_layers=1))
def test_fuzz_lstm_cells_default_engine(case):
    check_case(case)


# The Triton interpreter is slow on CPU: tiny shapes, few examples.
@pytest.mark.skipif(fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None,
                    reason="the Triton engine cannot run here")
@fuzz_settings(TRITON_EXAMPLES, ci_examples=16)
@given(case=cases(FUZZ_KINDS, max_seq_len=4, max_batch=3, max_size=8, max_layers=2),
       strategy=st.sampled_from(["auto", "tile", "split", "stepwise"]))
def test_fuzz_triton_engine(case, strategy):
    import fastrnn.triton

    # Hidden sizes up to 8 fit every strategy, so each can be forced.
    with fastrnn.use_backend("triton"), fastrnn.triton.use_strategy(strategy):
        check_case(case, device=TRITON_DEVICE)
