"""Every float product kernel of the C++ engine (csrc/cpu/panels.h) against
torch.nn in float64: the micro-kernels this CPU runs (AVX-512, AVX2) and the
BLAS calls, forward and every gradient.

The shapes put the kernels' edges to work: hidden sizes that fill no panel
(5), end in a partial one (33, 96 over two threads' blocks), batches that
fill no register block (7), end in a partial one (9), that the engine
splits by rows across threads (70), and of one row (1), with a projection,
both directions and lengths. A sweep of two steps or more walks its packed
weights' panels in both orders (PanelOrder), so each order meets every case.
"""

import sys

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import assert_results_close, forward_backward, make_pair
from fastrnn import _C

KERNELS = _C.product_kernels()

CASES = [
    # cls, (T, B, I, H), kwargs, lengths. A weight is packed once its
    # products take min(256, 24 sqrt(B)) rows in all (csrc/cpu/layer.h): a
    # sweep's from T * B >= 24 at B=1, the input projection's and dx's from
    # T * B >= 256. Below that, a forward product of at least 16 rows runs
    # the kernels over the weight as it is; the others call the BLAS. The
    # fixture below puts every product on its kernel, including those that
    # by default run on MKL (large_products_on_blas).
    ("RNN", (80, 7, 5, 5), dict(), None),
    ("RNN", (8, 70, 9, 33), dict(nonlinearity="relu"), None),
    ("GRU", (60, 9, 11, 96), dict(bidirectional=True), [60, 1, 30, 60, 20, 45, 60, 1, 12]),
    ("GRU", (600, 1, 3, 33), dict(num_layers=2), None),
    ("LSTM", (60, 9, 8, 96), dict(), None),
    ("LSTM", (80, 7, 6, 33), dict(proj_size=17, bidirectional=True), [80, 2, 40, 1, 33, 80, 7]),
    ("LSTM", (8, 70, 4, 40), dict(proj_size=35), None),
    ("LSTM", (600, 1, 5, 5), dict(bidirectional=True), None),
    # Sweeps packed, the input projection over the weight as it is, dx on the BLAS.
    ("GRU", (30, 1, 7, 33), dict(), None),
    ("LSTM", (16, 4, 6, 40), dict(proj_size=17), [16, 3, 9, 16]),
    # Too few rows to pack, at least 16 a product: the forward's products on
    # the kernel over the weights as they are (rows laid out in panels of 32:
    # one partly filled, two, and split by rows across threads).
    ("GRU", (3, 20, 7, 33), dict(bidirectional=True), [3, 1, 2, 3, 3, 1, 2, 3, 3, 3, 1, 2, 3, 3, 3,
                                                      2, 1, 3, 3, 3]),
    ("LSTM", (2, 40, 6, 40), dict(proj_size=17), None),
    ("RNN", (1, 70, 5, 5), dict(), None),
    # ... and with enough work to share across threads (csrc/cpu/team.h,
    # kMinParallelWork): the columns split between them.
    ("GRU", (2, 48, 130, 130), dict(), [2, 1] * 24),
    # Every forward product under 16 rows: the BLAS beside a chosen kernel.
    ("LSTM", (3, 4, 6, 40), dict(proj_size=17), None),
    # A single step with its input projection on the kernel, inside the
    # sweep: its bias there (GRU), and in training into the workspace's
    # strided rows.
    ("GRU", (1, 40, 7, 33), dict(), None),
    ("LSTM", (1, 48, 130, 130), dict(proj_size=17), None),
    # Weight gradients of 128 columns or more, whole panels, by G >= 256
    # (csrc/cpu/layer_common.cpp, weight_grads; csrc/cpu/panels.cpp,
    # multiply_transposed): over more rows than
    # one chunk of 1024 copies, with a last chunk of whole transpose blocks
    # (1120 and 1104 rows) or not (1030); from d's columns in partial
    # transpose blocks and kernel rows (GRU: G = 258, its grad W_ih); over
    # the previous states read in place (no lengths: the output shifted,
    # then hx) and gathered (lengths).
    ("LSTM", (70, 16, 128, 160), dict(bidirectional=True), None),
    ("GRU", (40, 28, 128, 86), dict(), [40, 3, 17, 40, 1, 39, 22] * 4),
    ("LSTM", (103, 10, 128, 128), dict(), [103, 50, 1, 103, 77, 12, 103, 99, 64, 2]),
    # Where grad_ih and grad_hh are the same (RNN, LSTM), grad W_ih, grad W_hh
    # and the bias's gradient come from the same passes over d, the two
    # weights' 64 + 64 (or 32 + 96, 32 + 256) columns together: in both
    # directions, the rows past the first step in chunks of 1024 and a last
    # one of 98 (a sum's partial vector), then the first step's 17 rows
    # against hx; the states gathered (lengths), in one direction and in
    # both; a single step (the states are hx); a first step of more than one
    # chunk (B = 1100); an empty batch (sums over no rows). GRU: the bias's
    # gradient from the pass of W_hh alone.
    ("LSTM", (67, 17, 64, 64), dict(bidirectional=True), None),
    ("LSTM", (50, 23, 32, 96), dict(), [50, 49, 1, 50, 20, 33] * 3 + [50] * 5),
    ("LSTM", (40, 30, 64, 64), dict(bidirectional=True), [40, 7, 39, 1, 25] * 6),
    ("LSTM", (1, 300, 64, 64), dict(), None),
    ("LSTM", (2, 1100, 64, 64), dict(), None),
    ("RNN", (9, 130, 32, 256), dict(), None),
    ("LSTM", (5, 0, 64, 64), dict(), None),
    ("GRU", (37, 29, 32, 128), dict(bidirectional=True), None),
]


@pytest.fixture(params=KERNELS)
def product_kernel(request):
    _C.set_product_kernel(request.param)  # every product, large ones included
    yield request.param
    _C.reset_product_kernel()


@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def test_kernels_listed():
    assert KERNELS[-1] == "blas" and len(set(KERNELS)) == len(KERNELS)
    assert _C.product_kernel() == KERNELS[0]
    with pytest.raises(RuntimeError, match="unknown or unsupported CPU product kernel 'sse'"):
        _C.set_product_kernel("sse")


def intel_cpu():
    with open("/proc/cpuinfo") as info:
        return any(line.split(":")[-1].strip() == "GenuineIntel"
                   for line in info if line.startswith("vendor_id"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_large_products_on_blas_by_default_with_mkl_on_intel():
    expected = torch.backends.mkl.is_available() and intel_cpu()
    assert _C.large_products_on_blas() == expected
    try:
        _C.set_product_kernel(KERNELS[0])
        assert not _C.large_products_on_blas()  # the chosen kernel runs every product
    finally:
        _C.reset_product_kernel()
    assert _C.product_kernel() == KERNELS[0] and _C.large_products_on_blas() == expected


CASE_IDS = [f"{c[0]}-{'x'.join(map(str, c[1]))}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("cls, sizes, kwargs, lengths", CASES, ids=CASE_IDS)
def test_against_torch_nn_float64(product_kernel, threads, cls, sizes, kwargs, lengths):
    check_against_torch_nn_float64(cls, sizes, kwargs, lengths)


@pytest.mark.parametrize("cls, sizes, kwargs, lengths", [
    ("RNN", (4, 70, 256, 256), dict(), None),
    ("LSTM", (2, 130, 256, 256), dict(), None),
], ids=["RNN", "LSTM"])
def test_default_choice_against_torch_nn_float64(threads, cls, sizes, kwargs, lengths):
    """The default: on an Intel CPU with MKL, these layers' input projections
    and dx (256 rows or more, by weights of 256 rows and columns or more) run
    on MKL, their per-step products on the best kernel."""
    assert _C.product_kernel() == KERNELS[0]
    check_against_torch_nn_float64(cls, sizes, kwargs, lengths)


@pytest.mark.parametrize("cls", ["RNNCell", "LSTMCell"])
def test_cell_without_input_features(product_kernel, threads, cls):
    """A cell of input_size 0: grad W_ih has no columns, so grad W_hh (G >=
    256 columns of whole panels) takes the weight gradients' pass alone."""
    reference, candidate = make_pair(getattr(nn, cls), getattr(fastrnn, cls), 0, 256)
    assert_matches_float64(reference, candidate, torch.randn(40, 0))


@pytest.mark.parametrize("cls, kwargs", [("RNN", {}), ("GRU", {}), ("LSTM", dict(proj_size=17))],
                         ids=["RNN", "GRU", "LSTM"])
def test_single_step_without_grad(product_kernel, threads, cls, kwargs):
    """Without grad, a single step's input projection goes to the output (a
    one-gate cell) or to a buffer of its own instead of the workspace."""
    reference, candidate = make_pair(getattr(nn, cls), getattr(fastrnn, cls), 7, 33, **kwargs)
    x = torch.randn(1, 40, 7)
    with torch.no_grad():
        expected = reference.double()(x.double())
        actual = candidate(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, check_dtype=False)


def check_against_torch_nn_float64(cls, sizes, kwargs, lengths):
    T, B, I, H = sizes
    reference, candidate = make_pair(getattr(nn, cls), getattr(fastrnn, cls), I, H, **kwargs)
    assert_matches_float64(reference, candidate, torch.randn(T, B, I), lengths)


def assert_matches_float64(reference, candidate, x, lengths=None):
    """The float32 candidate's outputs and gradients on x against the
    torch.nn reference's in float64, to float32's tolerances."""
    expected = forward_backward(reference.double(), x.double(), lengths=lengths,
                                upstream_dtype=torch.float32)
    actual = forward_backward(candidate, x, lengths=lengths)
    expected = {k: v.float() if v.is_floating_point() else v for k, v in expected.items()}
    assert_results_close(actual, expected, torch.float32)


def test_kernels_agree_closely(threads):
    """The micro-kernels and the BLAS differ only in rounding."""
    reference, candidate = make_pair(nn.LSTM, fastrnn.LSTM, 64, 64, proj_size=40)
    x = torch.randn(40, 16, 64)
    results = {}
    try:
        for kernel in KERNELS:
            _C.set_product_kernel(kernel)
            results[kernel] = forward_backward(candidate, x)
    finally:
        _C.reset_product_kernel()
    for kernel in KERNELS[:-1]:
        for key, value in results["blas"].items():
            torch.testing.assert_close(results[kernel][key], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{kernel} {key}: {m}")
