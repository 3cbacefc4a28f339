"""Character-level language model: predict the next character of a text.

A character embedding feeds a ``GRU``, and a linear layer turns each output
into scores for the next character; training minimises the cross-entropy of
those scores. The script trains two such models, one with ``torch.nn.GRU``
and one with ``fastrnn.GRU``, from the same weights on the same batches:

1. on the single word "hello", the classic first example: after a few dozen
   steps the model spells it back from "h" (it must remember how many l's it
   has produced, which one character of context cannot tell it);
2. on a few kilobytes of prose (``examples/data/text.txt``, or ``--text``),
   cut into windows of ``--seq-len`` characters and shuffled every epoch.

After each stage it prints the two loss curves and a few characters sampled
from each model (greedily for "hello"; for the prose with a fixed-seed
generator, so the two samples differ only if the models do).

Run it with::

    python examples/char_rnn.py                   # default sizes
    python examples/char_rnn.py --short           # a few seconds
    python examples/char_rnn.py --epochs 100 --hidden-size 256 --num-layers 2
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import common

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "text.txt"


class Vocabulary:
    """Maps the characters of a text to indices and back."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, indices) -> str:
        return "".join(self.chars[i] for i in indices)


class CharModel(nn.Module):
    """Embedding -> ``rnn_cls`` (torch.nn.GRU or fastrnn.GRU) -> linear scores."""

    def __init__(self, rnn_cls, vocab_size: int, embedding_dim: int, hidden_size: int,
                 num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = rnn_cls(embedding_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens, hidden=None):        # tokens: (batch, time)
        output, hidden = self.rnn(self.embed(tokens), hidden)
        return self.head(output), hidden            # scores: (batch, time, vocab)


def loss_fn(scores, targets):
    return nn.functional.cross_entropy(scores.flatten(0, 1), targets.flatten())


@torch.no_grad()
def sample(model, vocab, prompt: str, length: int, generator=None, temperature: float = 1.0):
    """Continue ``prompt`` by ``length`` characters, one step at a time.

    Greedy (most likely character) without a generator; otherwise draws from
    the softmax at ``temperature`` with ``generator``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, hidden = model(vocab.encode(prompt).unsqueeze(0).to(device))
    generated = []
    for _ in range(length):
        last = scores[0, -1]
        if generator is None:
            index = last.argmax()
        else:
            # Drawn on the CPU, where the generator lives, so any device samples alike.
            probs = torch.softmax(last / temperature, dim=-1).cpu()
            index = torch.multinomial(probs, 1, generator=generator)[0]
        generated.append(int(index))
        # Feed the new character alone and carry the hidden state: no re-reading.
        scores, hidden = model(index.view(1, 1).to(device), hidden)
    model.train(was_training)
    return prompt + vocab.decode(generated)


def train_hello(args, device):
    """Stage 1: learn to spell one word; returns the per-step losses."""
    word = "hello"
    vocab = Vocabulary(word)
    tokens = vocab.encode(word).unsqueeze(0).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]      # "hell" -> "ello"

    models = common.build_models(
        lambda namespace: CharModel(namespace.GRU, len(vocab), 8, args.hello_hidden_size),
        device, args.seed)

    def train(model, generator):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        step_losses = []
        for _ in range(args.hello_steps):
            scores, _ = model(inputs)
            loss = loss_fn(scores, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
        return step_losses

    print(f'GRU on "{word}": hidden {args.hello_hidden_size}, {args.hello_steps} steps on {device}')
    losses, seconds = common.train_each(models, train, args.seed)
    common.print_losses(losses, seconds, label="step", every=max(1, args.hello_steps // 10))
    for name, model in models.items():
        print(f"{name:>8} spells: {sample(model, vocab, 'h', len(word) - 1)!r}")
    return losses


def train_text(args, device):
    """Stage 2: a character model of a longer text; returns the per-epoch losses."""
    text = Path(args.text).read_text(encoding="utf-8")
    vocab = Vocabulary(text)
    encoded = vocab.encode(text)
    # Non-overlapping windows of seq_len + 1 characters: input and target are
    # the same window shifted by one.
    count = (len(encoded) - 1) // args.seq_len
    windows = torch.stack([encoded[i * args.seq_len:(i + 1) * args.seq_len + 1]
                           for i in range(count)]).to(device)

    models = common.build_models(
        lambda namespace: CharModel(namespace.GRU, len(vocab), args.embedding_dim,
                                    args.hidden_size, args.num_layers),
        device, args.seed)

    def loss_of(model, batch):
        window = windows[batch]
        scores, _ = model(window[:, :-1])
        return loss_fn(scores, window[:, 1:])

    def train(model, generator):
        return common.train_minibatches(model, generator, count, loss_of, args.epochs,
                                        args.batch_size, args.lr)

    print(f"\nGRU on {Path(args.text).name}: {len(text)} characters, {len(vocab)} distinct, "
          f"{count} windows of {args.seq_len}, hidden {args.hidden_size}, "
          f"{args.epochs} epochs on {device}")
    losses, seconds = common.train_each(models, train, args.seed)
    common.print_losses(losses, seconds, every=max(1, args.epochs // 10))
    prompt = text[:args.seq_len // 2] if args.prompt is None else args.prompt
    for name, model in models.items():
        generator = torch.Generator().manual_seed(args.seed)
        generated = sample(model, vocab, prompt, args.sample_length, generator, args.temperature)
        print(f"--- {name} sample ---\n{generated}")
    return losses


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--hello-steps", type=int, default=60, help='training steps on "hello"')
    parser.add_argument("--hello-hidden-size", type=int, default=16,
                        help='GRU hidden units for "hello"')
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="a UTF-8 text file")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the text")
    parser.add_argument("--seq-len", type=int, default=64, help="characters per window")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step")
    parser.add_argument("--embedding-dim", type=int, default=32, help="character embedding size")
    parser.add_argument("--hidden-size", type=int, default=128, help="GRU hidden units")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked GRU layers")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--prompt", default=None,
                        help="text to continue, of characters that occur in the text "
                             "(None: its first seq-len/2 characters)")
    parser.add_argument("--sample-length", type=int, default=200,
                        help="characters to generate after the prompt")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature: lower is more conservative")
    return common.parse_args(parser, argv, hello_steps=40, epochs=4, seq_len=32,
                             hidden_size=32, sample_length=60)


def main(argv=None) -> dict[str, common.Losses]:
    """Run both stages; returns ``{"hello": losses, "text": losses}``, each
    ``{"fastrnn": [...], "torch.nn": [...]}`` (per step for "hello", per epoch
    for the text)."""
    args = parse_args(argv)
    device = common.setup_device(args.device)
    return {"hello": train_hello(args, device), "text": train_text(args, device)}


if __name__ == "__main__":
    main()
