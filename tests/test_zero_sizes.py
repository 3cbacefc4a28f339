"""Zero sizes: cells with input or hidden size 0, and batch 0 through
backward, giving torch.nn's outputs and (empty or zero) gradients; RNN, GRU,
LSTM (with and without proj_size) and their cells.

Zero-batch forward shapes (and the sizes torch.nn refuses) are in test_errors.
"""

import pytest
import torch

from conftest import ALL_CELL_KINDS as CELL_KINDS
from conftest import ALL_MODULE_KINDS as KINDS
from conftest import assert_results_close, forward_backward, make_pair, make_state

I, H, B, T = 5, 6, 3, 4
LAYERS = 2

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("sizes", [(I, 0), (0, H), (0, 0)], ids=["hidden_0", "input_0", "both_0"])
@pytest.mark.parametrize("call", ["batched", "batched_hx", "unbatched", "batch_0"])
def test_cell_zero_sizes(kind, sizes, call):
    # torch.nn's cells accept zero sizes (unlike RNN/GRU); so must fastrnn's,
    # with the same outputs and gradients.
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    input_size, hidden_size = sizes
    reference, candidate = make_pair(torch_cls, fast_cls, input_size, hidden_size, **kwargs)
    assert [(n, p.shape) for n, p in candidate.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()]
    batch = 0 if call == "batch_0" else B
    x = torch.randn(input_size) if call == "unbatched" else torch.randn(batch, input_size)
    hx = None
    if call in ("batched_hx", "batch_0"):
        hx = make_state(kind, (batch,), torch.float32, hidden=hidden_size)
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, torch.float32)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
def test_zero_batch_backward(kind, batch_first, hx_given):
    # Zero-batch forward shapes are covered in test_errors; backward must work
    # too and give torch.nn's (empty or zero) gradients.
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS,
                                     bidirectional=True, batch_first=batch_first, **kwargs)
    x = torch.randn(0, T, I) if batch_first else torch.randn(T, 0, I)
    hx = make_state(kind, (2 * LAYERS, 0), torch.float32, hidden=H) if hx_given else None
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, torch.float32)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_zero_batch_backward(kind):
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, **kwargs)
    hx = make_state(kind, (0,), torch.float32, hidden=H)
    expected = forward_backward(reference, torch.randn(0, I), hx)
    got = forward_backward(candidate, torch.randn(0, I), hx)
    assert_results_close(got, expected, torch.float32)
