"""Many-to-one regression: predict the next value of a noisy sine wave.

Each input is a sequence of ``--seq-len`` noisy samples of a sine wave with a
random frequency, phase and amplitude; the target is the clean value one step
after the end. An ``RNN`` reads the sequence and a linear layer maps its last
output to the prediction, trained with mean squared error and Adam.

The model is built twice, with ``torch.nn.RNN`` and with ``fastrnn.RNN``, from
the same weights, and trained on the same batches; the script prints both
loss curves side by side.

Run it with::

    python examples/regression.py                 # default sizes
    python examples/regression.py --short         # a few seconds
    python examples/regression.py --epochs 30 --hidden-size 64 --device cpu
"""

from __future__ import annotations

import math

import torch
from torch import nn

import common


class Regressor(nn.Module):
    """``rnn_cls`` (torch.nn.RNN or fastrnn.RNN) followed by a linear head."""

    def __init__(self, rnn_cls, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.rnn = rnn_cls(input_size=1, hidden_size=hidden_size, num_layers=num_layers,
                           batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x):                       # x: (batch, time, 1)
        output, _ = self.rnn(x)
        return self.head(output[:, -1]).squeeze(-1)   # predict from the last step only


def make_data(count: int, seq_len: int, noise: float, generator: torch.Generator):
    """``count`` noisy sine sequences (count, seq_len, 1) and their next clean value."""
    frequency = 0.05 + 0.15 * torch.rand(count, 1, generator=generator)  # cycles per step
    phase = 2 * math.pi * torch.rand(count, 1, generator=generator)
    amplitude = 0.5 + torch.rand(count, 1, generator=generator)
    t = torch.arange(seq_len + 1, dtype=torch.float32)
    clean = amplitude * torch.sin(2 * math.pi * frequency * t + phase)
    x = clean[:, :-1] + noise * torch.randn(count, seq_len, generator=generator)
    return x.unsqueeze(-1), clean[:, -1]


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    parser.add_argument("--samples", type=int, default=2048, help="training sequences")
    parser.add_argument("--seq-len", type=int, default=40, help="steps per sequence")
    parser.add_argument("--hidden-size", type=int, default=32, help="RNN hidden units")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked RNN layers")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the input noise")
    return common.parse_args(parser, argv, epochs=8, samples=256, seq_len=20,
                             hidden_size=16, batch_size=32)


def main(argv=None) -> common.Losses:
    """Train both models; returns ``{"fastrnn": [...], "torch.nn": [...]}``,
    the mean training loss of every epoch."""
    args = parse_args(argv)
    device = common.setup_device(args.device)

    # One fixed data set; each run shuffles it with its own, identically seeded generator.
    data_generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(args.samples, args.seq_len, args.noise, data_generator)
    x_test, y_test = make_data(args.samples // 4, args.seq_len, args.noise, data_generator)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_test, y_test = x_test.to(device), y_test.to(device)

    models = common.build_models(
        lambda namespace: Regressor(namespace.RNN, args.hidden_size, args.num_layers),
        device, args.seed)

    def train(model, generator):
        return common.train_minibatches(
            model, generator, args.samples,
            lambda model, batch: nn.functional.mse_loss(model(x_train[batch]), y_train[batch]),
            args.epochs, args.batch_size, args.lr)

    print(f"RNN regression: {args.samples} sequences of {args.seq_len} steps, "
          f"hidden {args.hidden_size}, {args.epochs} epochs on {device}")
    losses, seconds = common.train_each(models, train, args.seed)
    common.print_losses(losses, seconds)

    # For scale: the variance of the targets is the MSE of always predicting the mean.
    with torch.no_grad():
        tests = ", ".join(f"{name} {nn.functional.mse_loss(model(x_test), y_test).item():.6f}"
                          for name, model in models.items())
    print(f"held-out MSE: {tests} (target variance {y_test.var().item():.6f})")
    return losses


if __name__ == "__main__":
    main()
