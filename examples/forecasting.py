"""Probabilistic forecasting: an LSTM with projections predicts a distribution
for the next value of many related series (DeepAR-style).

Each series is a daily-looking signal: a level, a weekly season, a slow trend
and noise, all drawn per series. At every step the model reads the current
value and the day of the week and outputs the mean and the scale of a
Gaussian for the next value; it is trained on the Gaussian negative
log-likelihood of every next value (teacher forcing). The recurrent part is a
2-layer ``LSTM`` with ``proj_size``: its hidden state is projected to a
smaller size at every step, as in speech and forecasting models that keep
the recurrent state cheap.

The model is built twice, with ``torch.nn.LSTM`` and with ``fastrnn.LSTM``,
from the same weights, and trained on the same batches; the script prints
both loss curves side by side.

Run it with::

    python examples/forecasting.py                 # default sizes
    python examples/forecasting.py --short         # a few seconds
    python examples/forecasting.py --hidden-size 64 --proj-size 16 --device cpu
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import common


# torch.nn's CPU LSTM says, once, that its oneDNN path has no projections.
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")


class Forecaster(nn.Module):
    """``lstm_cls`` (torch.nn.LSTM or fastrnn.LSTM) with a Gaussian head."""

    def __init__(self, lstm_cls, hidden_size: int, proj_size: int, num_layers: int = 2):
        super().__init__()
        # Inputs per step: the value and the day of the week as (sin, cos).
        self.lstm = lstm_cls(input_size=3, hidden_size=hidden_size, num_layers=num_layers,
                             proj_size=proj_size, batch_first=True)
        self.head = nn.Linear(proj_size, 2)

    def forward(self, x):                        # x: (batch, time, 3)
        output, _ = self.lstm(x)
        mean, raw_scale = self.head(output).unbind(-1)
        return mean, nn.functional.softplus(raw_scale) + 1e-3


def make_data(count: int, seq_len: int, generator: torch.Generator):
    """``count`` series of ``seq_len + 1`` steps: inputs (count, seq_len, 3) and
    the next value at every step (count, seq_len)."""
    def draw(*shape):
        return torch.rand(*shape, generator=generator)

    t = torch.arange(seq_len + 1, dtype=torch.float32)
    level = 2 * draw(count, 1) - 1
    season = (0.3 + 0.7 * draw(count, 1)) * torch.sin(2 * math.pi * (t / 7 + draw(count, 1)))
    trend = (draw(count, 1) - 0.5) * t / seq_len
    noise = 0.1 * torch.randn(count, seq_len + 1, generator=generator)
    series = level + season + trend + noise
    weekday = 2 * math.pi * (t[:-1] % 7) / 7
    x = torch.stack([series[:, :-1], weekday.sin().expand(count, -1),
                     weekday.cos().expand(count, -1)], dim=-1)
    return x, series[:, 1:]


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=15, help="passes over the training set")
    parser.add_argument("--samples", type=int, default=1024, help="training series")
    parser.add_argument("--seq-len", type=int, default=56, help="steps per series")
    parser.add_argument("--hidden-size", type=int, default=48, help="LSTM hidden (cell) units")
    parser.add_argument("--proj-size", type=int, default=16, help="LSTM projection size")
    parser.add_argument("--batch-size", type=int, default=64, help="series per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    return common.parse_args(parser, argv, epochs=6, samples=192, seq_len=21, hidden_size=12,
                             proj_size=4, batch_size=32)


def main(argv=None) -> common.Losses:
    """Train both models; returns ``{"fastrnn": [...], "torch.nn": [...]}``,
    the mean training loss of every epoch."""
    args = parse_args(argv)
    device = common.setup_device(args.device)

    data_generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(args.samples, args.seq_len, data_generator)
    x_test, y_test = make_data(args.samples // 4, args.seq_len, data_generator)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_test, y_test = x_test.to(device), y_test.to(device)

    models = common.build_models(
        lambda namespace: Forecaster(namespace.LSTM, args.hidden_size, args.proj_size),
        device, args.seed)

    def nll(model, x, y):
        mean, scale = model(x)
        return nn.functional.gaussian_nll_loss(mean, y, scale ** 2)

    def train(model, generator):
        return common.train_minibatches(
            model, generator, args.samples,
            lambda model, batch: nll(model, x_train[batch], y_train[batch]),
            args.epochs, args.batch_size, args.lr)

    print(f"LSTM forecasting: {args.samples} series of {args.seq_len} steps, hidden "
          f"{args.hidden_size}, projection {args.proj_size}, {args.epochs} epochs on {device}")
    losses, seconds = common.train_each(models, train, args.seed)
    common.print_losses(losses, seconds)
    with torch.no_grad():
        tests = ", ".join(f"{name} {nll(model, x_test, y_test).item():.6f}"
                          for name, model in models.items())
    print(f"held-out Gaussian NLL: {tests}")
    return losses


if __name__ == "__main__":
    main()
