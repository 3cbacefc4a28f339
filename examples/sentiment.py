"""Sentence classification with a stacked, bidirectional GRU.

The data set is generated here: short "reviews" built from clauses such as
"the plot was not very dull", joined by "and" or "but". Every clause has a
polarity (its adjective's, flipped by "not"); a review is positive when most
of its clauses are. Getting it right needs word order ("not" applies to the
word after it) and counting over a variable length, which a bag of words
cannot do.

The reviews have different lengths, so each batch is padded and packed with
``pack_padded_sequence(..., enforce_sorted=False)``; a two-layer bidirectional
``GRU`` reads it and the final hidden states of the last layer (forward and
backward) go to a linear classifier, trained with cross-entropy, Adam and
gradient-norm clipping. As in the other examples, one model uses
``torch.nn.GRU`` and one ``fastrnn.GRU``, from the same weights on the same
batches; the script prints both loss curves and both test accuracies.

Run it with::

    python examples/sentiment.py                  # default sizes
    python examples/sentiment.py --short          # a few seconds
    python examples/sentiment.py --epochs 20 --hidden-size 64
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import common

POSITIVE = ["good", "great", "fun", "lovely", "charming", "clever", "superb", "moving"]
NEGATIVE = ["bad", "dull", "boring", "awful", "weak", "tedious", "clumsy", "bland"]
SUBJECTS = ["plot", "acting", "story", "music", "ending", "cast", "film", "dialogue"]
INTENSIFIERS = ["very", "quite", "really", "rather"]
CONNECTIVES = ["and", "but"]
PAD = "<pad>"


def make_reviews(count: int, generator: torch.Generator, max_clauses: int = 3):
    """``count`` reviews as (list of words, label), label 1 = positive.

    Reviews have an odd number of clauses (1, 3, ...) so that there is always
    a majority.
    """
    def pick(words):
        return words[int(torch.randint(len(words), (1,), generator=generator))]

    def coin(p):
        return bool(torch.rand(1, generator=generator) < p)

    reviews = []
    for _ in range(count):
        clauses = 1 + 2 * int(torch.randint((max_clauses + 1) // 2, (1,), generator=generator))
        words, score = [], 0
        for c in range(clauses):
            if c > 0:
                words.append(pick(CONNECTIVES))
            positive = coin(0.5)
            negated = coin(0.3)
            words += ["the", pick(SUBJECTS), "was"]
            words += ["not"] if negated else []
            words += [pick(INTENSIFIERS)] if coin(0.3) else []
            words.append(pick(POSITIVE if positive else NEGATIVE))
            score += 1 if positive != negated else -1
        reviews.append((words, int(score > 0)))
    return reviews


class Classifier(nn.Module):
    """Embedding -> ``rnn_cls`` (stacked, bidirectional) -> linear over the final states."""

    def __init__(self, rnn_cls, vocab_size: int, embedding_dim: int, hidden_size: int,
                 num_layers: int = 2, num_classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)   # 0 is PAD
        self.rnn = rnn_cls(embedding_dim, hidden_size, num_layers, batch_first=True,
                           bidirectional=True)
        self.head = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, tokens, lengths):          # tokens: (batch, longest), padded
        # Packing makes each sequence stop at its own length: the backward
        # direction starts at the last real word, not at the padding.
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, h_n = self.rnn(packed)                # h_n: (layers * 2, batch, hidden), input order
        last_layer = torch.cat([h_n[-2], h_n[-1]], dim=1)   # forward and backward final states
        return self.head(last_layer)


def encode(reviews, index, device):
    """Padded token tensor (batch, longest), lengths (on the CPU, as packing wants) and labels."""
    sequences = [torch.tensor([index[w] for w in words]) for words, _ in reviews]
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = pad_sequence(sequences, batch_first=True, padding_value=index[PAD])
    labels = torch.tensor([label for _, label in reviews])
    return tokens.to(device), lengths, labels.to(device)


@torch.no_grad()
def accuracy(model, tokens, lengths, labels):
    was_training = model.training
    model.eval()
    predictions = model(tokens, lengths).argmax(dim=1)
    model.train(was_training)
    return (predictions == labels).float().mean().item()


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training set")
    parser.add_argument("--train-size", type=int, default=1000, help="training reviews")
    parser.add_argument("--test-size", type=int, default=500, help="held-out reviews")
    parser.add_argument("--max-clauses", type=int, default=5,
                        help="most clauses per review (an odd number: 1, 3, 5, ...)")
    parser.add_argument("--embedding-dim", type=int, default=32, help="word embedding size")
    parser.add_argument("--hidden-size", type=int, default=32,
                        help="GRU hidden units per direction")
    parser.add_argument("--num-layers", type=int, default=2, help="stacked GRU layers")
    parser.add_argument("--batch-size", type=int, default=32, help="reviews per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="largest gradient norm")
    # A higher learning rate lets the short run learn visibly in a few epochs.
    return common.parse_args(parser, argv, epochs=5, train_size=256, test_size=128,
                             max_clauses=3, hidden_size=16, embedding_dim=16, lr=1e-2)


def main(argv=None) -> common.Losses:
    """Train both classifiers; returns ``{"fastrnn": [...], "torch.nn": [...]}``,
    the mean training loss of every epoch."""
    args = parse_args(argv)
    device = common.setup_device(args.device)

    data_generator = torch.Generator().manual_seed(args.seed)
    train_set = make_reviews(args.train_size, data_generator, args.max_clauses)
    test_set = make_reviews(args.test_size, data_generator, args.max_clauses)
    vocab = [PAD] + sorted({w for words, _ in train_set + test_set for w in words})
    index = {w: i for i, w in enumerate(vocab)}
    test = encode(test_set, index, device)

    models = common.build_models(
        lambda namespace: Classifier(namespace.GRU, len(vocab), args.embedding_dim,
                                     args.hidden_size, args.num_layers),
        device, args.seed)

    def train(model, generator):
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        epoch_losses = []
        for _ in range(args.epochs):
            order = torch.randperm(len(train_set), generator=generator)
            total = 0.0
            for batch in order.split(args.batch_size):
                tokens, lengths, labels = encode([train_set[i] for i in batch], index, device)
                loss = nn.functional.cross_entropy(model(tokens, lengths), labels)
                optimizer.zero_grad()
                loss.backward()
                # Recurrent nets can produce occasional huge gradients; cap their norm.
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                total += loss.item() * len(batch)
            epoch_losses.append(total / len(train_set))
        return epoch_losses

    print(f"{args.num_layers}-layer bidirectional GRU: {args.train_size} training reviews, "
          f"{len(vocab)} words, hidden {args.hidden_size}, {args.epochs} epochs on {device}")
    print("e.g. " + "; ".join(f"{' '.join(words)!r} -> {'positive' if label else 'negative'}"
                              for words, label in train_set[:2]))
    losses, seconds = common.train_each(models, train, args.seed)
    common.print_losses(losses, seconds)
    print("test accuracy: " + ", ".join(f"{name} {accuracy(model, *test):.1%}"
                                        for name, model in models.items()))
    return losses


if __name__ == "__main__":
    main()
