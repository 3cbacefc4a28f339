"""Accuracy of the engine's float32 tanh and sigmoid (csrc/cpu/math.h).

The C++ engine evaluates these without libm so that its loops vectorise; a
one-step layer with identity weights exposes them directly, and they are
held to a few float32 ulps of the float64 truth over a dense grid.
"""

import math

import pytest
import torch

from fastrnn.autograd import layer

ULP = 2.0 ** -23  # float32 spacing at 1
# Besides zeros, tiny values and saturation: where tanh's reduction of 2|x|
# by ln2 steps to the next n ((k + 1/2) ln2 / 2), and its clamp at 9.5.
SEAMS = [(k + 0.5) * math.log(2) / 2 for k in range(4)]
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 1e-3, 9.0, 9.5, 20.0, 87.0, 89.0, 100.0,
           -100.0, 1e4, -1e4, math.inf, -math.inf] + [
           x * (1 + d) * sign for x in SEAMS for d in (-1e-7, 0, 1e-7) for sign in (1, -1)]


def grid():
    return torch.cat([torch.linspace(-20, 20, 200_001), torch.tensor(SPECIAL)])


def relative_error(actual, expected):
    return ((actual.double() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()


def one_step_tanh(x):
    # output = tanh(x * 1 + h0 * 0)
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    out, _ = layer("rnn_tanh", x.view(1, -1, 1), (torch.zeros(x.numel(), 1),), ones, zeros, None,
                   None, None, False)
    return out.view(-1)


def one_step_sigmoid(x):
    # r = σ(0), z = σ(x), n = tanh(0) = 0, so h' = (h0 - n) z + n = σ(x) for h0 = 1
    # (finite x only: the zero weight rows would turn an infinite x into NaN)
    w_ih = torch.tensor([[0.0], [1.0], [0.0]])
    out, _ = layer("gru", x.view(1, -1, 1), (torch.ones(x.numel(), 1),), w_ih, torch.zeros(3, 1),
                   None, None, None, False)
    return out.view(-1)


@pytest.mark.parametrize("function, truth", [(one_step_tanh, torch.tanh),
                                             (one_step_sigmoid, torch.sigmoid)],
                         ids=["tanh", "sigmoid"])
def test_float32_accuracy(function, truth):
    x = grid()
    if function is one_step_sigmoid:
        x = x[x.isfinite()]
    actual = function(x)
    expected = truth(x.double())
    # Saturated sigmoid values below float32's normal range only need to be tiny.
    normal = expected.abs() > 1e-30
    assert relative_error(actual[normal], expected[normal]) <= 4 * ULP
    assert actual[~normal].abs().max().item() < 1e-30


@pytest.mark.parametrize("function", [one_step_tanh, one_step_sigmoid], ids=["tanh", "sigmoid"])
def test_nan_propagates(function):
    out = function(torch.tensor([math.nan, 0.0]))
    assert math.isnan(out[0].item()) and not math.isnan(out[1].item())
