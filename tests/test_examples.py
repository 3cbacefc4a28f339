"""The examples in examples/: each trains once with torch.nn and once with
fastrnn, and must learn and give the same losses with both.

The examples are imported from their files and run in-process on their
``--short`` settings, on the CPU (the comparison tolerances below were
measured there); one is also run as a script.
"""

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))   # the examples import their shared helpers as `common`

SHORT = ["--short", "--device", "cpu", "--seed", "0"]

# How closely fastrnn's losses must follow torch.nn's. Both compute the same
# float32 formulas in a different order, so one forward/backward agrees to a
# few ulps; training then feeds those differences back through the weights.
# The yardstick is torch.nn against itself with every initial weight moved by
# one ulp (1 part in 2**23): over seeds 0-9 of the short runs below, that
# moved the losses by at most 3.2e-7 relative, and fastrnn differed from
# torch.nn by at most 2.1e-7 (most runs 1e-8 to 1e-7). How much a run
# amplifies rounding varies (other initial weights took the control to
# 1.2e-6), so rtol=1e-5 leaves a margin of 8x over everything seen. (Loss
# curves are a coarse check of the gradients; the other test files compare
# those element by element.)
TOLERANCE = dict(rtol=1e-5, atol=1e-7)
# The "hello" stage of char_rnn is the exception: a batch of one 4-letter
# word, where some gradient elements are zero up to rounding. Adam divides
# each gradient by its own running magnitude, so such an element moves by the
# full learning rate in a direction rounding decides. There, over seeds 0-19,
# the one-ulp control moved the losses by up to 2.8e-6 relative (1.1e-5 with
# other initial weights) and fastrnn differed by up to 2.3e-6.
HELLO_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The short runs use tiny models, where a second thread only adds
    synchronisation, and a busy machine makes waiting OpenMP threads slow
    every step down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(name):
    return importlib.import_module(name)


def check_run(losses, tolerance=TOLERANCE, min_drop=0.1):
    """Finite losses, both implementations learning (the last loss at least
    ``min_drop`` below the first, relatively), and matching curves."""
    assert set(losses) == {"fastrnn", "torch.nn"}
    fast, reference = losses["fastrnn"], losses["torch.nn"]
    assert len(fast) == len(reference) > 1
    for name, curve in losses.items():
        assert all(math.isfinite(value) for value in curve), f"{name}: {curve}"
        assert curve[-1] < (1 - min_drop) * curve[0], f"{name} did not learn: {curve}"
    torch.testing.assert_close(torch.tensor(fast, dtype=torch.float64),
                               torch.tensor(reference, dtype=torch.float64), **tolerance)


def test_regression():
    check_run(load("regression").main(SHORT))


def test_char_rnn():
    stages = load("char_rnn").main(SHORT)
    assert set(stages) == {"hello", "text"}
    check_run(stages["hello"], HELLO_TOLERANCE)
    check_run(stages["text"])


def test_sentiment():
    check_run(load("sentiment").main(SHORT))


def test_forecasting():
    check_run(load("forecasting").main(SHORT))


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_truncated_bptt(cell):
    check_run(load("truncated_bptt").main(SHORT + ["--cell", cell]))


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_generate_samples_as_torch_nn_and_times_both(cell):
    results = load("generate").main([*SHORT, "--cell", cell])
    args = load("generate").parse_args([*SHORT, "--cell", cell])
    assert set(results) == {"fastrnn", "torch.nn"}
    texts = {name: result["text"] for name, result in results.items()}
    # The same weights and the same draws: the same characters.
    assert texts["fastrnn"] == texts["torch.nn"]
    assert texts["fastrnn"].startswith(args.prompt)
    assert len(texts["fastrnn"]) == len(args.prompt) + args.length
    for result in results.values():
        assert 0 < result["seconds_per_char"] < 1


def test_char_rnn_sampling_is_reproducible():
    """The samples of two models with equal weights, drawn with equally seeded
    generators, are equal."""
    char_rnn, common = load("char_rnn"), load("common")
    vocab = char_rnn.Vocabulary("hello world")
    models = common.build_models(
        lambda namespace: char_rnn.CharModel(namespace.GRU, len(vocab), 4, 8),
        torch.device("cpu"), seed=0)
    samples = {name: char_rnn.sample(model, vocab, "he", 20, torch.Generator().manual_seed(1))
               for name, model in models.items()}
    assert samples["fastrnn"] == samples["torch.nn"]
    assert len(samples["fastrnn"]) == 22


def test_build_models_copies_weights():
    common = load("common")
    import fastrnn

    models = common.build_models(lambda namespace: namespace.GRU(3, 5, 2, bidirectional=True),
                                 torch.device("cpu"), seed=0)
    assert type(models["fastrnn"]) is fastrnn.GRU
    assert type(models["torch.nn"]) is torch.nn.GRU
    fast, reference = models["fastrnn"].state_dict(), models["torch.nn"].state_dict()
    assert fast.keys() == reference.keys()
    for key in reference:
        assert torch.equal(fast[key], reference[key]), key


@pytest.mark.parametrize("script", ["regression", "char_rnn", "sentiment", "truncated_bptt",
                                    "forecasting"])
def test_script_prints_matching_losses(script):
    """Each example runs as a script and prints both loss curves, which agree."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{script}.py"), *SHORT],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "fastrnn" in line and "torch.nn" in line)
    assert header.split()[1:3] == ["fastrnn", "torch.nn"]
    # One row per epoch (or step, or chunk): index, fastrnn loss, torch.nn
    # loss, difference, printed to 6 decimals.
    rows = [line.split() for line in lines if re.fullmatch(r"\s*\d+(\s+[-+.\de]+){3}", line)]
    assert len(rows) >= 2, result.stdout
    fast, reference = [float(row[1]) for row in rows], [float(row[2]) for row in rows]
    assert all(math.isfinite(value) for value in fast + reference)
    tolerance = HELLO_TOLERANCE if script == "char_rnn" else TOLERANCE
    torch.testing.assert_close(torch.tensor(fast, dtype=torch.float64),
                               torch.tensor(reference, dtype=torch.float64),
                               rtol=tolerance["rtol"], atol=max(tolerance["atol"], 1e-6))
    assert any(line.startswith("max |fastrnn - torch.nn|") for line in lines)
    if script == "regression":
        epochs = load("regression").parse_args(SHORT).epochs
        assert [int(row[0]) for row in rows] == list(range(1, epochs + 1))
        assert fast[-1] < fast[0] and reference[-1] < reference[0]
