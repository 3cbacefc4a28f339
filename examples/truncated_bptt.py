"""Truncated backpropagation through time on one long series.

The series is a noisy sum of two sine waves, ``--length`` steps long, and the
task is to predict each value from everything before it. Backpropagating
through all of it at once would keep every step's activations in memory, so
training goes chunk by chunk, as for language models:

* the series is cut into ``--streams`` contiguous pieces that form the batch,
  and each piece into chunks of ``--chunk-len`` steps;
* the model reads one chunk at a time, starting from the hidden state the
  previous chunk ended with, so it still sees the whole past;
* that state is ``.detach()``-ed before it is passed on, so the gradient of
  each chunk's loss stops at the chunk's start, and the optimiser steps after
  every chunk.

As in the other examples, one model uses ``torch.nn`` and one ``fastrnn``
(``--cell gru`` or ``rnn``), from the same weights; the script prints both
loss curves (the mean chunk loss of every pass over the series).

Run it with::

    python examples/truncated_bptt.py             # default sizes
    python examples/truncated_bptt.py --short     # a few seconds
    python examples/truncated_bptt.py --cell rnn --chunk-len 50 --epochs 20
"""

from __future__ import annotations

import math

import torch
from torch import nn

import common


class Forecaster(nn.Module):
    """``rnn_cls`` over the series, a linear layer predicting the next value at every step."""

    def __init__(self, rnn_cls, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.rnn = rnn_cls(1, hidden_size, num_layers)     # time-major: (time, batch, 1)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x, hidden=None):
        output, hidden = self.rnn(x, hidden)
        return self.head(output), hidden


def make_series(length: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float32)
    clean = torch.sin(2 * math.pi * t / 50) + 0.5 * torch.sin(2 * math.pi * t / 23 + 1.0)
    return clean + noise * torch.randn(length, generator=generator)


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=20, help="passes over the series")
    parser.add_argument("--length", type=int, default=4000, help="steps in the series")
    parser.add_argument("--streams", type=int, default=8, help="pieces of the series per batch")
    parser.add_argument("--chunk-len", type=int, default=25, help="steps per backward pass")
    parser.add_argument("--cell", choices=["gru", "rnn"], default="gru", help="recurrent layer")
    parser.add_argument("--hidden-size", type=int, default=32, help="hidden units")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked layers")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the series' noise")
    return common.parse_args(parser, argv, epochs=4, length=1200, hidden_size=16)


def main(argv=None) -> common.Losses:
    """Train both models; returns ``{"fastrnn": [...], "torch.nn": [...]}``,
    the mean chunk loss of every epoch."""
    args = parse_args(argv)
    device = common.setup_device(args.device)

    series = make_series(args.length, args.noise, torch.Generator().manual_seed(args.seed))
    # (time, streams, 1): stream s is the s-th contiguous piece of the series.
    steps = (args.length - 1) // args.streams
    inputs = series[:steps * args.streams].view(args.streams, steps).t().unsqueeze(-1)
    targets = series[1:steps * args.streams + 1].view(args.streams, steps).t().unsqueeze(-1)
    inputs, targets = inputs.to(device), targets.to(device)

    rnn_name = args.cell.upper()
    models = common.build_models(
        lambda namespace: Forecaster(getattr(namespace, rnn_name), args.hidden_size,
                                     args.num_layers),
        device, args.seed)

    def train(model, generator):      # the order is fixed: nothing to draw
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        epoch_losses = []
        for _ in range(args.epochs):
            hidden = None                                 # each pass starts afresh
            chunk_losses = []
            for start in range(0, steps, args.chunk_len):
                chunk = slice(start, start + args.chunk_len)
                prediction, hidden = model(inputs[chunk], hidden)
                loss = nn.functional.mse_loss(prediction, targets[chunk])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                # Keep the state's value, drop its history: the next backward
                # pass ends here instead of reaching into chunks already trained on.
                hidden = hidden.detach()
                chunk_losses.append(loss.item())
            epoch_losses.append(sum(chunk_losses) / len(chunk_losses))
        return epoch_losses

    print(f"{rnn_name} truncated BPTT: {args.length} steps as {args.streams} streams of {steps}, "
          f"chunks of {args.chunk_len}, hidden {args.hidden_size}, {args.epochs} epochs "
          f"on {device}")
    losses, seconds = common.train_each(models, train, args.seed)
    common.print_losses(losses, seconds)
    # For scale: repeating the previous value, and the noise floor.
    naive = nn.functional.mse_loss(inputs, targets).item()
    print(f"predicting the previous value: MSE {naive:.6f}; noise variance {args.noise ** 2:.6f}")
    return losses


if __name__ == "__main__":
    main()
