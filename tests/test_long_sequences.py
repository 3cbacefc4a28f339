"""Very long sequences and sizes past 32 bits.

RNN, GRU and LSTM (the LSTM's h_n and c_n checked, its c before the last
steps taken from torch.nn).

100,000 steps forward and backward: completion, results against torch.nn,
and peak memory bounded and growing in proportion to the length (measured
in child processes started from this file, see the ``__main__`` block, each
measuring its own peak); and more than 2^31 - 1 rows through the BLAS.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import MODULES, assert_close, copy_weights, describe_exit

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest

LONG = dict(steps=100_000, batch=2, input_size=4, hidden=16)
FLOAT_BYTES = 4
MEMORY_ALLOWANCE = 48 << 20  # allocator slack, thread stacks, small tensors
# Memory must grow in proportion to the length: the peak is also measured at
# half the length, and the growth between the two bounded per step.
HALF_STEPS = LONG["steps"] // 2
# The modules run long: RNN and GRU (conftest's MODULES) and the LSTM.
LONG_MODULES = {"RNN": MODULES["RNN"], "GRU": MODULES["GRU"], "LSTM": (nn.LSTM, fastrnn.LSTM)}


def expected_bytes_per_step(name):
    """What a forward+backward over one step of one sequence must hold:
    the test's input, its gradient and the upstream gradient, the saved
    output, and for GRU the saved gate workspace (4H), for the LSTM its
    saved gates and new cell state (5H)."""
    i, h = LONG["input_size"], LONG["hidden"]
    workspace = {"GRU": 4 * h, "LSTM": 5 * h}.get(name, 0)
    floats = 2 * i + h + h + workspace
    return FLOAT_BYTES * floats


def _status_bytes(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def reset_peak_rss():
    """Start a fresh peak-RSS window (Linux: writing 5 to clear_refs resets
    VmHWM to the current RSS), so one-time costs before it do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss_bytes():
    return _status_bytes("VmHWM")


def flat(state):
    """A module's final state as a list: [h_n], or an LSTM's [h_n, c_n]."""
    return list(state) if isinstance(state, tuple) else [state]


def _long_sequence_child(name, steps):
    # One intra-op thread: memory does not depend on it, and a CPU shared
    # with other jobs makes small multi-threaded steps erratic.
    torch.set_num_threads(1)
    batch, input_size, hidden = (LONG[k] for k in ("batch", "input_size", "hidden"))
    torch_cls, fast_cls = LONG_MODULES[name]
    lstm = name == "LSTM"
    torch.manual_seed(0)
    reference = torch_cls(input_size, hidden)
    candidate = copy_weights(reference, fast_cls(input_size, hidden))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, input_size, generator=gen).requires_grad_(True)
    grad_output = torch.randn(steps, batch, hidden, generator=gen)
    grad_h = torch.randn(1, batch, hidden, generator=gen)
    # An LSTM's upstream gradients: into output, h_n and c_n.
    grad_states = [grad_h, torch.randn(1, batch, hidden, generator=gen)] if lstm else [grad_h]

    # A short run first pages in the code and one-time library buffers
    # (BLAS workspaces, thread pools), whose size depends on the machine,
    # not on the sequence length. The measured window then holds the test's
    # own tensors and what forward+backward allocates.
    warm = x.detach()[:1000].clone().requires_grad_(True)
    warm_output, warm_h = candidate(warm)
    torch.autograd.backward([warm_output, *flat(warm_h)], [grad_output[:1000], *grad_states])
    candidate.zero_grad(set_to_none=True)
    del warm, warm_output, warm_h
    fixed = sum(t.numel() * t.element_size() for t in (x, grad_output, *grad_states))
    base = reset_peak_rss() - fixed

    output, h_n = candidate(x)
    torch.autograd.backward([output, *flat(h_n)], [grad_output, *grad_states])
    peak = peak_rss_bytes() - base

    grads = {"input": x.grad, **{n: p.grad for n, p in candidate.named_parameters()}}
    shapes_ok = x.grad.shape == x.shape and all(
        p.grad is not None and p.grad.shape == p.shape for p in candidate.parameters())
    finite = all(bool(torch.isfinite(t).all()) for t in [output, *flat(h_n), *grads.values()])

    K = 300
    if lstm:
        # torch.nn over the same 100,000 steps, in two pieces so that the
        # state before the last K steps is known: c is no output.
        with torch.no_grad():
            head_output, before_tail = reference(x[:-K])
            tail_output, ref_h_n = reference(x[-K:], before_tail)
        ref_output = torch.cat([head_output, tail_output])
        for got, want, what in zip(h_n, ref_h_n, ("h_n", "c_n")):
            assert_close(got.detach(), want, msg=what)
    else:
        # torch.nn over the same 100,000 steps (forward only: its backward would
        # hold a graph of 100,000 steps).
        with torch.no_grad():
            ref_output, ref_h_n = reference(x)
        assert_close(h_n.detach(), ref_h_n, msg="h_n")
        before_tail = output.detach()[-K - 1][None]
    assert_close(output.detach(), ref_output, msg="output")
    # The input gradient of the last K steps depends only on those steps:
    # torch.nn from the state before them gives it exactly.
    tail = x.detach()[-K:].clone().requires_grad_(True)
    ref_out, ref_h = reference(tail, before_tail)
    (ref_grad,) = torch.autograd.grad([ref_out, *flat(ref_h)], [tail],
                                      [grad_output[-K:], *grad_states])
    assert_close(x.grad[-K:], ref_grad, msg="input gradient of the last steps")
    print(json.dumps({"peak_bytes": peak, "per_step": peak / (steps * batch),
                      "shapes_ok": shapes_ok, "finite": finite}))


@pytest.fixture(scope="module")
def long_sequence_runs():
    # Both children at once: each measures its own process.
    procs = {(name, steps): subprocess.Popen(
        [sys.executable, "-u", os.path.abspath(__file__), "long-sequence", name, str(steps)],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in LONG_MODULES for steps in (HALF_STEPS, LONG["steps"])}
    return {key: (proc.communicate(timeout=300)[0], proc.returncode) for key, proc in procs.items()}


def long_sequence_report(runs, name, steps):
    out, returncode = runs[name, steps]
    assert returncode == 0, f"child failed ({describe_exit(returncode)}):\n{out[-4000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shapes_ok"] and report["finite"]
    return report


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
def test_100k_steps_forward_backward(long_sequence_runs, name):
    report = long_sequence_report(long_sequence_runs, name, LONG["steps"])
    half = long_sequence_report(long_sequence_runs, name, HALF_STEPS)
    steps, batch = LONG["steps"], LONG["batch"]
    expected = expected_bytes_per_step(name)
    bound = 3 * expected * steps * batch + MEMORY_ALLOWANCE
    print(f"{name}: {report['per_step']:.0f} bytes per step per sequence "
          f"(peak {report['peak_bytes'] / 2**20:.1f} MiB over {steps} steps x {batch}; "
          f"must keep {expected})")
    assert report["peak_bytes"] <= bound, (
        f"peak {report['peak_bytes'] / 2**20:.1f} MiB, {report['per_step']:.0f} bytes per step per "
        f"sequence; bound {bound / 2**20:.1f} MiB (3 x {expected} bytes per step per sequence + "
        f"{MEMORY_ALLOWANCE >> 20} MiB)")
    # Growth from half the length to the whole, per added step: proportional,
    # with no allowance.
    growth = (report["peak_bytes"] - half["peak_bytes"]) / ((steps - HALF_STEPS) * batch)
    print(f"{name}: {growth:.0f} bytes per added step per sequence")
    assert 0 < growth <= 3 * expected, (
        f"{growth:.0f} bytes per added step per sequence; bound 3 x {expected}")


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
def test_blas_sizes_past_32_bits_do_not_wrap():
    """The Fortran BLAS takes 32-bit sizes: more than 2^31 - 1 rows must not
    be narrowed (MKL then reports 'Parameter 4 was incorrect on entry to
    SGEMM' and skips the product). Rows of width 0 cost no memory."""
    code = ("import torch, fastrnn\n"
            "T, B = 65536, 32769\n"
            "x, h0, w = torch.empty(T, B, 0), torch.empty(B, 0), torch.empty(0, 0)\n"
            "out, (h,), _ = torch.ops.fastrnn.layer_forward('rnn_tanh', x, [h0], w, w, None, None,"
            " None, None, False, False, 'auto')\n"
            "assert out.shape == (T, B, 0) and h.shape == (B, 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr


# ---------------------------------------------------------------------------
# Child process entry points
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    if sys.argv[1] == "long-sequence":
        _long_sequence_child(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
