"""Generation, one step per call: how long each new character takes.

Trains a character model (``char_rnn.CharModel``: an embedding, a ``GRU`` or
an ``LSTM``, a linear layer) on ``examples/data/text.txt`` for a few epochs
with torch.nn, then turns a copy of it into fastrnn's (``fastrnn.convert``:
the same weights) and samples from both, character by character: each new
character goes back in alone, with the carried state, as generation runs.
Prints both samples (the same: the same weights and the same random draws)
and the time per generated character of each, the median of ``--repeats``
runs of the whole sampling loop without grad.

Run it with::

    python examples/generate.py                 # default sizes
    python examples/generate.py --short         # a few seconds
    python examples/generate.py --cell LSTM --hidden-size 256
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import common
from char_rnn import DEFAULT_TEXT, CharModel, Vocabulary, loss_fn, sample

import fastrnn


def train(args, text: str, vocab: Vocabulary, device: torch.device) -> CharModel:
    """A torch.nn model of ``text`` after ``args.epochs`` epochs."""
    encoded = vocab.encode(text)
    count = (len(encoded) - 1) // args.seq_len
    windows = torch.stack([encoded[i * args.seq_len:(i + 1) * args.seq_len + 1]
                           for i in range(count)]).to(device)
    torch.manual_seed(args.seed)
    model = CharModel(getattr(nn, args.cell), len(vocab), args.embedding_dim,
                      args.hidden_size).to(device)

    def loss_of(model, batch):
        window = windows[batch]
        scores, _ = model(window[:, :-1])
        return loss_fn(scores, window[:, 1:])

    generator = torch.Generator().manual_seed(args.seed)
    losses = common.train_minibatches(model, generator, count, loss_of, args.epochs,
                                      args.batch_size, args.lr)
    print(f"{args.cell} on {Path(args.text).name}: hidden {args.hidden_size}, loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f} over {args.epochs} epochs on {device}")
    return model


def timed_sample(model, vocab, args) -> tuple[str, float]:
    """The sample from ``model`` and the median seconds per generated character."""
    seconds = []
    for _ in range(args.repeats):
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        text = sample(model, vocab, args.prompt, args.length, generator, args.temperature)
        seconds.append((time.perf_counter() - start) / args.length)
    return text, statistics.median(seconds)


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--cell", choices=["GRU", "LSTM"], default="GRU", help="the recurrent layer")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="a UTF-8 text file")
    parser.add_argument("--epochs", type=int, default=10, help="training passes over the text")
    parser.add_argument("--seq-len", type=int, default=64, help="characters per training window")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per training step")
    parser.add_argument("--embedding-dim", type=int, default=32, help="character embedding size")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden units")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--prompt", default="The ", help="text to continue (characters of the text)")
    parser.add_argument("--length", type=int, default=300, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the sampling loop")
    return common.parse_args(parser, argv, epochs=2, hidden_size=32, length=60, repeats=3)


def main(argv=None) -> dict[str, dict]:
    """Returns ``{"fastrnn": {"text", "seconds_per_char"}, "torch.nn": {...}}``."""
    args = parse_args(argv)
    device = common.setup_device(args.device)
    text = Path(args.text).read_text(encoding="utf-8")
    vocab = Vocabulary(text)
    reference = train(args, text, vocab, device)
    models = {"torch.nn": reference, "fastrnn": fastrnn.convert(copy.deepcopy(reference))}
    results = {}
    for name, model in models.items():
        generated, per_char = timed_sample(model, vocab, args)
        results[name] = {"text": generated, "seconds_per_char": per_char}
        print(f"--- {name}: {per_char * 1e6:.0f} us per character ---\n{generated}")
    ratio = results["torch.nn"]["seconds_per_char"] / results["fastrnn"]["seconds_per_char"]
    print(f"fastrnn generates {ratio:.2f}x as fast as torch.nn here (one step per call, "
          f"batch 1, {args.cell} hidden {args.hidden_size}); the samples are "
          f"{'the same' if results['fastrnn']['text'] == results['torch.nn']['text'] else 'different'}")
    return results


if __name__ == "__main__":
    main()
