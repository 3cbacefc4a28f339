"""Modules used from several Python threads at once give the results of
running them one after the other (and those are torch.nn's); RNN and GRU, and
LSTM (with and without proj_size) with LSTMCell."""

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import assert_close, flatten_outputs, make_pair

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest

THREAD_SPECS = [
    (nn.RNN, fastrnn.RNN, 5, 16, dict(num_layers=2)),
    (nn.GRU, fastrnn.GRU, 3, 24, dict(bidirectional=True)),
    (nn.RNN, fastrnn.RNN, 8, 40, dict(nonlinearity="relu", batch_first=True)),
    (nn.GRU, fastrnn.GRU, 6, 20, dict(num_layers=2)),
]
# LSTM jobs: with and without a projection, and a cell (inputs (batch, I)).
LSTM_THREAD_SPECS = [
    (nn.LSTM, fastrnn.LSTM, 5, 16, dict(num_layers=2, proj_size=6)),
    (nn.LSTM, fastrnn.LSTM, 3, 24, dict(bidirectional=True)),
    (nn.LSTMCell, fastrnn.LSTMCell, 8, 20, dict()),
    (nn.LSTM, fastrnn.LSTM, 6, 20, dict(batch_first=True, bidirectional=True, proj_size=4)),
]
THREAD_ITERATIONS = 12


def thread_job(module, inputs):
    """forward + backward for each input; every output and gradient, copied."""
    results = []
    params = list(module.parameters())
    for x in inputs:
        x = x.clone().requires_grad_(True)
        # (output, h_n); an LSTM's (output, h_n, c_n), an LSTMCell's (h, c)
        output, *states = flatten_outputs(module(x))
        loss = output.square().sum() + sum(h.sum() for h in states)
        grads = torch.autograd.grad(loss, [x] + params)
        results.append([output.detach(), *(h.detach() for h in states), *grads])
    return results


def test_threads_give_sequential_results(intra_op_threads):
    check_threads(THREAD_SPECS, intra_op_threads)


def test_lstm_threads_give_sequential_results(intra_op_threads):
    check_threads(LSTM_THREAD_SPECS, intra_op_threads)


def check_threads(specs, intra_op_threads):
    torch.set_num_threads(intra_op_threads)  # the usual setting, as an application has it
    # Modules and inputs are made up front: the global RNG is shared by threads.
    jobs = []
    for index, (torch_cls, fast_cls, input_size, hidden, kwargs) in enumerate(specs):
        reference, candidate = make_pair(torch_cls, fast_cls, input_size, hidden, seed=index, **kwargs)
        gen = torch.Generator().manual_seed(100 + index)
        shape = (6, 10, input_size) if kwargs.get("batch_first") else (10, 6, input_size)
        if torch_cls is nn.LSTMCell:
            shape = (6, input_size)
        inputs = [torch.randn(shape, generator=gen) for _ in range(THREAD_ITERATIONS)]
        jobs.append((reference, candidate, inputs))

    sequential = [thread_job(candidate, inputs) for _, candidate, inputs in jobs]
    # Anchor: the sequential results are torch.nn's.
    for (reference, _, inputs), results in zip(jobs, sequential):
        for x, got in zip(inputs[:2], results[:2]):
            expected = thread_job(reference, [x])[0]
            for g, e in zip(got, expected):
                assert_close(g, e)

    # Each job twice, each run on its own copy of the module, 4 threads.
    work = [(copy.deepcopy(candidate), inputs, index)
            for _ in range(2) for index, (_, candidate, inputs) in enumerate(jobs)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [(index, pool.submit(thread_job, module, inputs)) for module, inputs, index in work]
        concurrent = [(index, f.result()) for index, f in futures]
    for index, results in concurrent:
        for iteration, (got, expected) in enumerate(zip(results, sequential[index])):
            for k, (g, e) in enumerate(zip(got, expected)):
                assert torch.equal(g, e), f"job {index}, iteration {iteration}, tensor {k} differs"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_layers_release_the_gil(grad):
    # A layer runs without the GIL, as torch.ops calls do: a Python thread
    # keeps running while another thread's layer computes. (Holding it, the
    # main thread would get a turn only between layer calls.)
    module = fastrnn.GRU(128, 128)
    x = torch.randn(400, 8, 128)
    calls, finished, turns = 4, threading.Event(), 0

    def work():
        with torch.set_grad_enabled(grad):
            for _ in range(calls):
                module(x)
        finished.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not finished.is_set():
        turns += 1
        time.sleep(0)
    worker.join()
    assert turns > 10 * calls


SPLIT_SPECS = [
    (nn.RNN, fastrnn.RNN, dict(num_layers=2)),
    (nn.GRU, fastrnn.GRU, dict(bidirectional=True)),
    (nn.LSTM, fastrnn.LSTM, dict(num_layers=2, bidirectional=True)),
    (nn.LSTM, fastrnn.LSTM, dict(proj_size=20)),
]


@pytest.mark.parametrize("spec", SPLIT_SPECS, ids=lambda s: s[0].__name__ + "-" + "-".join(s[2]))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("B", [16, 64])
def test_a_batch_gives_what_its_halves_give(intra_op_threads, spec, packed, B):
    # On two threads a float32 sweep splits each step by sequences, each
    # thread by all of the packed W_hh: from 32 sequences a thread, and
    # without lengths from 8; with lengths the sequences still running are
    # shared evenly at each step. Fewer sequences split by hidden units (48
    # units: two panels) where there is the work to share. So a batch of 16
    # splits by sequences where its halves split by units (without lengths),
    # a batch of 64 by sequences where its halves split by units (with
    # lengths). Each output sums in the same order either way, so each
    # sequence's outputs, final states and initial states' gradients are
    # bit-identical; the input's and the weights' gradients, through BLAS
    # products of other sizes, agree to rounding. torch.nn anchors the batch.
    torch.set_num_threads(2)
    torch_cls, fast_cls, kwargs = spec
    reference, candidate = make_pair(torch_cls, fast_cls, 24, 48, **kwargs)
    gen = torch.Generator().manual_seed(7)
    T = 12
    x = torch.randn(T, B, 24, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[3] = lengths[B // 2 + 2] = T  # each half runs all T steps
    upstream = torch.randn(T, B, 96, generator=gen)
    layers = candidate.num_layers * (2 if candidate.bidirectional else 1)
    states = [torch.randn(layers, B, candidate.proj_size or 48, generator=gen)]
    if torch_cls is nn.LSTM:
        states.append(torch.randn(layers, B, 48, generator=gen))

    def run(module, rows):
        """The tensors that must match bit for bit (output, final states,
        initial states' gradients), the input's gradient, the weights'."""
        xs = x[:, rows].clone().requires_grad_(True)
        initial = [h[:, rows].clone().requires_grad_(True) for h in states]
        inputs = xs
        if packed:
            inputs = nn.utils.rnn.pack_padded_sequence(xs, lengths[rows], enforce_sorted=False)
        hx = tuple(initial) if len(initial) > 1 else initial[0]
        output, *final = flatten_outputs(module(inputs, hx))
        if packed:
            output = nn.utils.rnn.pad_packed_sequence(output, total_length=T)[0]
        loss = ((output * upstream[:, rows, : output.shape[2]]).sum()
                + sum(h.square().sum() for h in final))
        grads = torch.autograd.grad(loss, [*initial, xs, *module.parameters()])
        n = len(initial)
        return [output, *final, *grads[:n]], grads[n], grads[n + 1:]

    exact, grad_x, grad_w = run(candidate, slice(0, B))
    halves = [run(candidate, slice(0, B // 2)), run(candidate, slice(B // 2, B))]
    for j, tensor in enumerate(exact):
        assert torch.equal(tensor, torch.cat([h[0][j] for h in halves], 1)), j
    assert_close(grad_x, torch.cat([h[1] for h in halves], 1))
    for k, g in enumerate(grad_w):
        assert_close(g, halves[0][2][k] + halves[1][2][k])
    expected = run(reference, slice(0, B))
    for got, want in zip([*exact, grad_x, *grad_w], [*expected[0], expected[1], *expected[2]]):
        assert_close(got, want)
