"""Parity of fastrnn.RNNCell / GRUCell / LSTMCell with the torch.nn cells."""

import pytest
import torch
import torch.nn as nn

import fastrnn
import fastrnn.cells
from conftest import (BATCH, HIDDEN_SIZE, INPUT_SIZE, assert_results_close, dtype_id,
                      forward_backward, make_pair, make_state)
from conftest import ALL_CELL_KINDS as CELL_KINDS


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_cell_parity(kind, batched, hx_given, bias, dtype):
    torch_cls, fast_cls, extra = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, bias=bias, dtype=dtype, **extra)
    generator = torch.Generator().manual_seed(3)
    batch_shape = (BATCH,) if batched else ()
    x = torch.randn(*batch_shape, INPUT_SIZE, dtype=dtype, generator=generator)
    hx = make_state(kind, batch_shape, dtype, generator) if hx_given else None
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, dtype)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_type(kind):
    torch_cls, fast_cls, extra = CELL_KINDS[kind]
    cell = fast_cls(INPUT_SIZE, HIDDEN_SIZE, **extra)
    assert isinstance(cell, nn.RNNCellBase)
    if "nonlinearity" in extra:
        assert cell.nonlinearity == extra["nonlinearity"]
    assert fast_cls.__constants__ == torch_cls.__constants__


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_unrolled_sequence(kind):
    """Stepping a cell over a sequence gives the same states as torch.nn."""
    torch_cls, fast_cls, extra = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **extra)
    xs = torch.randn(6, BATCH, INPUT_SIZE, dtype=torch.float64)
    h_ref = h_new = None
    for x in xs:
        h_ref = reference(x, h_ref)
        h_new = candidate(x, h_new)
        torch.testing.assert_close(h_new, h_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("name", list(fastrnn.cells.CELLS))
def test_cpp_engine_agrees_with_the_cell_descriptions(name):
    # The C++ traits restate each description's sizes: the gates, the state
    # count and the workspace width must be the same on both sides.
    description = fastrnn.cells.CELLS[name]
    T, B, I, H = 3, 2, 4, 5
    G = description.gates * H
    x, w_ih, w_hh = torch.randn(T, B, I), torch.randn(G, I), torch.randn(G, H)
    states = [torch.randn(B, H) for _ in description.states]
    output, finals, workspace = torch.ops.fastrnn.layer_forward(
        name, x, states, w_ih, w_hh, None, None, None, None, False, True, "auto")
    assert output.shape == (T, B, H) and len(finals) == len(description.states)
    assert workspace.shape == (T, B, description.saved * H)
    with pytest.raises(RuntimeError, match="state tensor"):
        torch.ops.fastrnn.layer_forward(name, x, states + [states[0]], w_ih, w_hh, None, None,
                                        None, None, False, True, "auto")
