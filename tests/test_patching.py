"""fastrnn.patch / unpatch / convert: speeding up code without editing it."""

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import BATCH, HIDDEN_SIZE, INPUT_SIZE, SEQ_LEN, assert_results_close, forward_backward

NAMES = ("RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell")
ORIGINALS = {name: getattr(nn, name) for name in NAMES}


@pytest.fixture(autouse=True)
def _restore_torch_nn():
    yield
    fastrnn.unpatch()
    assert all(getattr(nn, name) is ORIGINALS[name] for name in NAMES)


def test_plain_call_patches_until_unpatch():
    fastrnn.patch()
    assert fastrnn.is_patched()
    for name in NAMES:
        assert getattr(nn, name) is getattr(fastrnn, name)
        assert isinstance(getattr(nn, name)(3, 4), getattr(fastrnn, name))
    fastrnn.unpatch()
    assert not fastrnn.is_patched()
    assert all(getattr(nn, name) is ORIGINALS[name] for name in NAMES)


def test_context_manager_restores_what_was_there():
    with fastrnn.patch():
        assert type(nn.GRU(3, 4)) is fastrnn.GRU
    assert nn.GRU is ORIGINALS["GRU"]
    # Entered while already patched: leaving keeps the patch.
    fastrnn.patch()
    with fastrnn.patch():
        pass
    assert fastrnn.is_patched()


def test_patched_model_gives_torch_nn_numbers():
    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(INPUT_SIZE, 8), nn.GRU(8, HIDDEN_SIZE, num_layers=2))

    reference = build()
    with fastrnn.patch():
        fast = build()
    assert type(fast[1]) is fastrnn.GRU
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    assert_results_close(forward_backward(fast, x), forward_backward(reference, x), torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_patched_classes_run_and_check_as_torch_nn(name):
    """Under the patch torch.nn's names are fastrnn's; what fastrnn borrows from
    torch.nn's classes must still be torch.nn's own (no recursion into itself)."""
    torch.manual_seed(0)
    reference = ORIGINALS[name](INPUT_SIZE, HIDDEN_SIZE)
    x = torch.randn(BATCH, INPUT_SIZE) if name.endswith("Cell") else torch.randn(
        SEQ_LEN, BATCH, INPUT_SIZE)
    expected = forward_backward(reference, x)
    with fastrnn.patch():
        fast = getattr(nn, name)(INPUT_SIZE, HIDDEN_SIZE)
        fast.load_state_dict(reference.state_dict())
        assert_results_close(forward_backward(fast, x), expected, torch.float32)
        if not name.endswith("Cell"):
            with pytest.raises(RuntimeError, match="Expected hidden"):
                hx = torch.zeros(1, BATCH + 1, HIDDEN_SIZE)
                fast(x, (hx, hx) if name == "LSTM" else hx)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(INPUT_SIZE, HIDDEN_SIZE, nonlinearity="relu", bidirectional=True)
        self.cell = nn.GRUCell(2 * HIDDEN_SIZE, HIDDEN_SIZE)
        self.lstm = nn.LSTM(HIDDEN_SIZE, HIDDEN_SIZE, proj_size=3)
        self.lstm_cell = nn.LSTMCell(3, HIDDEN_SIZE)

    def forward(self, x):
        output, _ = self.rnn(x)
        h = self.cell(output[-1])
        output, _ = self.lstm(h[None].expand(4, -1, -1))
        return self.lstm_cell(output[-1])[1]


def test_convert_keeps_parameters_hooks_and_numbers():
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    expected = forward_backward(model, x)
    params = dict(model.named_parameters())
    calls = []
    model.rnn.register_forward_hook(lambda *args: calls.append(1))
    model.eval()

    assert fastrnn.convert(model) is model
    assert type(model.rnn) is fastrnn.RNN and type(model.cell) is fastrnn.GRUCell
    assert type(model.lstm) is fastrnn.LSTM and type(model.lstm_cell) is fastrnn.LSTMCell
    assert all(p is params[name] for name, p in model.named_parameters())
    assert not model.training and not model.rnn.training
    assert_results_close(forward_backward(model, x), expected, torch.float32)
    assert calls, "the forward hook survived the conversion"


def test_convert_module_itself_and_leaves_subclasses():
    class Custom(nn.GRU):
        pass

    gru, custom = nn.GRU(3, 4), Custom(3, 4)
    assert type(fastrnn.convert(gru)) is fastrnn.GRU
    assert type(fastrnn.convert(custom)) is Custom


@pytest.mark.parametrize("name", NAMES)
def test_converted_classes_have_torch_nn_attributes(name):
    """The class swap in convert is complete only if both classes set the same attributes."""
    original = ORIGINALS[name](3, 4, device="meta")
    replacement = getattr(fastrnn, name)(3, 4, device="meta")
    assert set(vars(original)) == set(vars(replacement))
