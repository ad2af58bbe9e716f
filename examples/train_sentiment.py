"""Train a small sentiment classifier with ``rnnkernels.torch.LSTM`` on generated data.

The data: "reviews" of 4 to 24 words from a 24-word vocabulary. Words 0-5 are
positive (+1), 6-11 negative (-1), 13-23 neutral, and word 12 is "not", which flips
the polarity of the word after it. A review is positive when its polarities sum
to more than zero (ties are dropped). Counting words is not enough because of "not",
so the model has to read in order: embedding -> 2-layer bidirectional LSTM over
packed, variable-length sequences -> the last hidden states of both directions ->
linear classifier.

    python examples/train_sentiment.py              # 6 epochs: 11 s on 2 quiet cores
    python examples/train_sentiment.py --nn-lstm    # the same with torch.nn.LSTM

It reaches about 97% test accuracy. On a machine of at most 4 cores it gives PyTorch,
Numba and the BLAS one thread each (unless the environment already sets
OMP_NUM_THREADS and the like, or ``--threads N`` is given): the matrices are tiny, and
the libraries' thread pools spinning against each other on two cores made it 3 to 10
times slower (35-117 s instead of 11 s, issue 14). With this default it took 58 s of
wall time but only 17 s of CPU time on a 2-core machine shared with other work (load
average 7.5), 2026-12-01: on a quiet machine, expect 11-20 s.

The only rnnkernels line is the import of ``LSTM``; ``--nn-lstm`` swaps in
``torch.nn.LSTM`` to show that it is a drop-in.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def set_thread_policy(argv) -> None:
    """One thread per library on small machines (see the docstring), set before NumPy,
    Numba and PyTorch are imported: BLAS sizes its pool when NumPy loads, and setting it
    later does nothing. ``--threads N`` sets N; variables already set are kept."""
    threads = None
    for i, word in enumerate(argv):
        if word == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif word.startswith("--threads="):
            threads = word.split("=", 1)[1]
    if threads is None:
        if any(os.environ.get(name) for name in THREAD_VARIABLES) or (os.cpu_count() or 1) > 4:
            return
        threads = "1"
    for name in THREAD_VARIABLES:
        os.environ[name] = threads


if __name__ == "__main__":
    set_thread_policy(sys.argv[1:])

import torch  # noqa: E402  (after the thread policy)
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence  # noqa: E402

from rnnkernels.torch import LSTM  # noqa: E402

VOCAB = 24
NOT = 12
POLARITY = torch.tensor([1] * 6 + [-1] * 6 + [0] * 12)


def make_reviews(count: int, generator: torch.Generator):
    """``count`` reviews as a list of 1-D token tensors and their labels (1 = positive)."""
    reviews, labels = [], []
    while len(reviews) < count:
        length = int(torch.randint(4, 25, (1,), generator=generator))
        tokens = torch.randint(0, VOCAB, (length,), generator=generator)
        polarity = POLARITY[tokens].clone()
        flipped = torch.zeros(length, dtype=torch.bool)
        flipped[1:] = tokens[:-1] == NOT
        polarity[flipped] *= -1
        score = int(polarity.sum())
        if score != 0:
            reviews.append(tokens)
            labels.append(int(score > 0))
    return reviews, torch.tensor(labels)


class Classifier(nn.Module):
    def __init__(self, lstm_class, embed: int = 16, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.lstm = lstm_class(embed, hidden, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        last = torch.cat([h_n[-2], h_n[-1]], dim=1)  # top layer, forward and reverse
        return self.head(last)


def batches(reviews, labels, batch_size, generator=None):
    order = torch.randperm(len(reviews), generator=generator) if generator is not None else torch.arange(len(reviews))
    for start in range(0, len(reviews), batch_size):
        index = order[start : start + batch_size]
        seqs = [reviews[i] for i in index]
        lengths = torch.tensor([len(s) for s in seqs])
        yield pad_sequence(seqs, batch_first=True), lengths, labels[index]


def evaluate(model, reviews, labels, batch_size=256):
    model.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for tokens, lengths, target in batches(reviews, labels, batch_size):
            logits = model(tokens, lengths)
            loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
            count += len(target)
    model.train()
    return loss / count, correct / count


def main(epochs=6, train_size=3000, test_size=1000, batch_size=64, seed=0, nn_lstm=False, quiet=False):
    """Train and evaluate; returns a dict with the test loss and accuracy before
    training and after each epoch."""
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    train = make_reviews(train_size, data_gen)
    test = make_reviews(test_size, data_gen)
    model = Classifier(nn.LSTM if nn_lstm else LSTM)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    say = (lambda *a: None) if quiet else print

    history = [evaluate(model, *test)]
    say(f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8} {'time':>6}")
    say(f"{0:5d} {'':>10} {history[0][0]:9.4f} {history[0][1]:8.3f}")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        total, seen = 0.0, 0
        for tokens, lengths, target in batches(*train, batch_size, data_gen):
            loss = nn.functional.cross_entropy(model(tokens, lengths), target)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(target)
            seen += len(target)
        history.append(evaluate(model, *test))
        say(f"{epoch:5d} {total / seen:10.4f} {history[-1][0]:9.4f} {history[-1][1]:8.3f} {time.perf_counter() - start:5.1f}s")
    say(f"final test accuracy: {history[-1][1]:.3f} ({'torch.nn.LSTM' if nn_lstm else 'rnnkernels.torch.LSTM'})")
    return {"test_loss": [h[0] for h in history], "test_accuracy": [h[1] for h in history]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nn-lstm", action="store_true", help="use torch.nn.LSTM instead, for comparison")
    parser.add_argument("--threads", type=int, help="threads per library (default: 1 on machines "
                        "with at most 4 cores unless OMP_NUM_THREADS etc. are set, else the "
                        "libraries' defaults)")
    args = parser.parse_args()
    main(epochs=args.epochs, train_size=args.train_size, seed=args.seed, nn_lstm=args.nn_lstm)
