"""Helpers shared by the examples.

Every example trains the same model twice, once built from ``torch.nn`` and
once from ``fastrnn``, and compares the two loss curves. For the comparison
to mean anything the two runs must differ only in the recurrent layers, so
this module

* builds both models from one function that takes the namespace to draw the
  recurrent class from (``fastrnn`` or ``torch.nn``), and copies the
  torch.nn model's ``state_dict`` into the fastrnn one;
* starts each training run from the same seed, with its own data generator,
  so both see the same batches in the same order;
* prints the two curves side by side with their largest difference.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import fastrnn

Losses = dict[str, list[float]]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of ``doc`` that
    shows every option's default."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def parse_args(parser: argparse.ArgumentParser, argv=None, **short) -> argparse.Namespace:
    """Add the options every example shares, parse ``argv`` (None: the command
    line) and, with ``--short``, replace the options named in ``short`` by
    its values."""
    parser.add_argument("--device", default=default_device(), help="device to train on")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the initial weights and the data")
    parser.add_argument("--short", action="store_true",
                        help="a run of a few seconds on small sizes, overriding "
                             + ", ".join(f"--{name.replace('_', '-')}" for name in short)
                             + " (what the tests run)")
    args = parser.parse_args(argv)
    if args.short:
        for name, value in short.items():
            setattr(args, name, value)
    return args


def setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        # torch.nn's cuDNN RNNs and cuBLAS may round float32 products to TF32;
        # fastrnn does not. Compare both at full float32 precision.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def build_models(make_model: Callable[[object], torch.nn.Module], device: torch.device,
                 seed: int) -> dict[str, torch.nn.Module]:
    """The same model twice: ``{"fastrnn": model, "torch.nn": model}``.

    ``make_model(namespace)`` builds the model with its recurrent layers taken
    from ``namespace`` (the ``fastrnn`` or the ``torch.nn`` module), e.g.
    ``lambda namespace: Classifier(namespace.GRU, ...)``.
    """
    torch.manual_seed(seed)
    reference = make_model(torch.nn).to(device)
    fast = make_model(fastrnn).to(device)
    # The second model was initialised from a later point of the random
    # stream; fastrnn's modules have torch.nn's parameter names and shapes, so
    # loading the state_dict makes the two equal.
    fast.load_state_dict(reference.state_dict(), strict=True)
    return {"fastrnn": fast, "torch.nn": reference}


def train_each(models: dict[str, torch.nn.Module],
               train: Callable[[torch.nn.Module, torch.Generator], list[float]],
               seed: int) -> tuple[Losses, dict[str, float]]:
    """Run ``train(model, generator)`` for every model; returns losses and seconds.

    Each run gets a fresh CPU generator seeded with ``seed`` for its data
    (shuffling, sampling) and the global seed is reset too (dropout, anything
    else drawing from it), so both runs see exactly the same data. ``train``
    returns Python floats (``loss.item()``), which waits for the device, so
    the times are complete.
    """
    losses, seconds = {}, {}
    for name, model in models.items():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        losses[name] = train(model, generator)
        seconds[name] = time.perf_counter() - start
    return losses, seconds


def train_minibatches(model: torch.nn.Module, generator: torch.Generator, count: int,
                      loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                      epochs: int, batch_size: int, lr: float) -> list[float]:
    """Adam over ``count`` examples in shuffled minibatches, ``epochs`` times;
    ``loss_of(model, indices)`` is the mean loss of the examples at
    ``indices``. Returns the mean training loss of every epoch."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    epoch_losses = []
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator).to(device)
        total = 0.0
        for batch in order.split(batch_size):
            loss = loss_of(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / count)
    return epoch_losses


def print_losses(losses: Losses, seconds: dict[str, float] | None = None, label: str = "epoch",
                 every: int = 1) -> float:
    """Print the two loss curves side by side (every ``every``-th row, the
    first and the last) and return their largest absolute difference.

    The training times are wall-clock seconds of one run each, for
    orientation only; ``python -m fastrnn.bench`` measures speed properly.
    """
    fast, reference = losses["fastrnn"], losses["torch.nn"]
    diffs = [abs(a - b) for a, b in zip(fast, reference)]
    print(f"{label:>6} {'fastrnn':>12} {'torch.nn':>12} {'|diff|':>10}")
    for i, (a, b, diff) in enumerate(zip(fast, reference, diffs), start=1):
        if i % every == 0 or i == 1 or i == len(diffs):
            print(f"{i:>6} {a:12.6f} {b:12.6f} {diff:10.2e}")
    print(f"max |fastrnn - torch.nn| over all {len(diffs)} {label}s: {max(diffs):.2e}")
    if seconds is not None:
        print(f"training time: fastrnn {seconds['fastrnn']:.2f} s, "
              f"torch.nn {seconds['torch.nn']:.2f} s")
    return max(diffs)
