"""Hardening: bad arguments, malformed engine calls, extreme values, very long
sequences, unusual tensor layouts, shared parameters and concurrent use.

Every check compares with torch.nn (or with torch.nn's cells run step by
step, for the single-layer engine ops). The engine calls that could bring
the interpreter down and the memory measurements run in child processes
started from this file (see the ``__main__`` block at the end), so a crash
shows up as a failed test that names the signal.
"""

import copy
import importlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import (
    CELL_KINDS,
    KINDS,
    TOLERANCES,
    TRITON_DEVICE,
    assert_close,
    assert_results_close,
    assert_same_exception,
    copy_weights,
    device_param,
    forward_backward,
    make_pair,
    random_like_shape,
)

HERE = os.path.dirname(os.path.abspath(__file__))

I, H, B, T = 5, 6, 3, 4
LAYERS = 2

MODULES = {
    "RNN": (nn.RNN, fastrnn.RNN),
    "GRU": (nn.GRU, fastrnn.GRU),
    "RNNCell": (nn.RNNCell, fastrnn.RNNCell),
    "GRUCell": (nn.GRUCell, fastrnn.GRUCell),
}
CELLS = ("RNNCell", "GRUCell")



@pytest.fixture(autouse=True)
def intra_op_threads():
    """One intra-op thread for the test; yields the usual count.

    The tensors here are small: no step is big enough for the engine to
    split, and one thread keeps the tiny per-step BLAS calls from stalling
    on a busy CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


def run_child(*args, timeout=300):
    """Runs this file as a script with ``args``; stdout and stderr merged."""
    return subprocess.run(
        [sys.executable, "-u", os.path.abspath(__file__), *args],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def describe_exit(returncode):
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


# ---------------------------------------------------------------------------
# 1. Bad arguments: the exception torch.nn raises, type and message
# ---------------------------------------------------------------------------


def shapes(name, batched=True):
    """(input shape, hx shape) of a valid call to module ``name``."""
    if name in CELLS:
        return ((B, I), (B, H)) if batched else ((I,), (H,))
    return ((T, B, I), (LAYERS, B, H)) if batched else ((T, I), (LAYERS, H))


def make_module_pair(name, dtype=torch.float32):
    torch_cls, fast_cls = MODULES[name]
    kwargs = {} if name in CELLS else {"num_layers": LAYERS}
    return make_pair(torch_cls, fast_cls, I, H, dtype=dtype, **kwargs)


# Each case: (module dtype, module device, batched, builder of the call's
# arguments from the valid input and hx shapes).
BAD_INPUT_CASES = {
    "input_list": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs).tolist(),)),
    "input_numpy": (torch.float32, "cpu", True, lambda xs, hs: (np.zeros(xs, dtype=np.float32),)),
    "input_none": (torch.float32, "cpu", True, lambda xs, hs: (None,)),
    "input_int": (torch.float32, "cpu", True, lambda xs, hs: (7,)),
    "hx_list": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs), torch.randn(hs).tolist())),
    "hx_numpy": (torch.float32, "cpu", True,
                 lambda xs, hs: (torch.randn(xs), np.zeros(hs, dtype=np.float32))),
    "hx_tuple": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs), (torch.randn(hs),))),
    "input_int32_unbatched": (torch.float32, "cpu", False,
                              lambda xs, hs: (torch.ones(xs, dtype=torch.int32),)),
    "input_bool": (torch.float32, "cpu", True, lambda xs, hs: (torch.ones(xs, dtype=torch.bool),)),
    "input_float16_module_float32": (torch.float32, "cpu", True,
                                     lambda xs, hs: (torch.randn(xs, dtype=torch.float16),)),
    "hx_float32_module_float64": (
        torch.float64, "cpu", True,
        lambda xs, hs: (torch.randn(xs, dtype=torch.float64), torch.randn(hs))),
    "hx_float16_unbatched": (torch.float32, "cpu", False,
                             lambda xs, hs: (torch.randn(xs), torch.randn(hs, dtype=torch.float16))),
    # The meta device stands in for a second device.
    "hx_on_meta": (torch.float32, "cpu", True,
                   lambda xs, hs: (torch.randn(xs), torch.randn(hs, device="meta"))),
    "hx_on_meta_unbatched": (torch.float32, "cpu", False,
                             lambda xs, hs: (torch.randn(xs), torch.randn(hs, device="meta"))),
    "input_on_meta": (torch.float32, "cpu", True, lambda xs, hs: (torch.randn(xs, device="meta"),)),
    "input_on_meta_hx_on_cpu": (torch.float32, "cpu", True,
                                lambda xs, hs: (torch.randn(xs, device="meta"), torch.randn(hs))),
    "module_on_meta": (torch.float32, "meta", True, lambda xs, hs: (torch.randn(xs),)),
    "module_on_meta_unbatched": (torch.float32, "meta", False, lambda xs, hs: (torch.randn(xs),)),
    "module_on_meta_hx_on_cpu": (torch.float32, "meta", True,
                                 lambda xs, hs: (torch.randn(xs), torch.randn(hs))),
}


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("case", list(BAD_INPUT_CASES))
def test_bad_input(name, case):
    dtype, device, batched, build = BAD_INPUT_CASES[case]
    reference, candidate = make_module_pair(name, dtype)
    reference.to(device)
    candidate.to(device)
    args = build(*shapes(name, batched))
    assert_same_exception(lambda: reference(*args), lambda: candidate(*args))


@pytest.mark.parametrize("name", list(MODULES))
def test_all_on_meta_gives_torch_shapes(name):
    # Everything on one (meta) device is valid: same shapes and dtypes as torch.nn.
    reference, candidate = make_module_pair(name)
    reference.to("meta")
    candidate.to("meta")
    xs, hs = shapes(name)
    args = (torch.randn(xs, device="meta"), torch.randn(hs, device="meta"))

    def described(outputs):
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return [(t.shape, t.dtype, t.device) for t in outputs]

    assert described(candidate(*args)) == described(reference(*args))


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("sizes", [(I, 0), (0, H), (0, 0)], ids=["hidden_0", "input_0", "both_0"])
@pytest.mark.parametrize("call", ["batched", "batched_hx", "unbatched", "batch_0"])
def test_cell_zero_sizes(kind, sizes, call):
    # torch.nn's cells accept zero sizes (unlike RNN/GRU); so must fastrnn's,
    # with the same outputs and gradients.
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    input_size, hidden_size = sizes
    reference, candidate = make_pair(torch_cls, fast_cls, input_size, hidden_size, **kwargs)
    assert [(n, p.shape) for n, p in candidate.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()]
    batch = 0 if call == "batch_0" else B
    x = torch.randn(input_size) if call == "unbatched" else torch.randn(batch, input_size)
    hx = torch.randn(batch, hidden_size) if call in ("batched_hx", "batch_0") else None
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, torch.float32)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
def test_zero_batch_backward(kind, batch_first, hx_given):
    # Zero-batch forward shapes are covered in test_errors; backward must work
    # too and give torch.nn's (empty or zero) gradients.
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS,
                                     bidirectional=True, batch_first=batch_first, **kwargs)
    x = torch.randn(0, T, I) if batch_first else torch.randn(T, 0, I)
    hx = torch.randn(2 * LAYERS, 0, H) if hx_given else None
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, torch.float32)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_zero_batch_backward(kind):
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, **kwargs)
    expected = forward_backward(reference, torch.randn(0, I), torch.randn(0, H))
    got = forward_backward(candidate, torch.randn(0, I), torch.randn(0, H))
    assert_results_close(got, expected, torch.float32)


# ---------------------------------------------------------------------------
# 2. The engine ops handed malformed (and unusual but valid) tensors
# ---------------------------------------------------------------------------
#
# The cases run in a child process (engine_battery below); each is either
# "raises" (must raise a RuntimeError, NotImplementedError included) or
# "valid" (must return what torch.nn's cells compute, and print nothing).

ENGINE_CELLS = ("RNN_tanh", "RNN_relu", "GRU")
ops = torch.ops.fastrnn


def gate_count(cell):
    return 3 if cell == "GRU" else 1


def layer_tensors(cell, T=T, B=B, I=I, H=H, bias=True, lengths=None, dtype=torch.float64, seed=0):
    """Valid arguments of one layer op: input (T, B, I), hx (B, H), weights, biases, lengths."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen) * 0.5

    G = gate_count(cell) * H
    return {
        "input": rand(T, B, I), "hx": rand(B, H), "weight_ih": rand(G, I), "weight_hh": rand(G, H),
        "bias_ih": rand(G) if bias else None, "bias_hh": rand(G) if bias else None,
        "lengths": None if lengths is None else torch.tensor(lengths, dtype=torch.int64),
    }


def op_forward(cell, a, reverse=False):
    """(output, h_n, workspace or None) from the engine's forward op."""
    args = (a["input"], a["hx"], a["weight_ih"], a["weight_hh"], a["bias_ih"], a["bias_hh"],
            a["lengths"], reverse)
    if cell == "GRU":
        return tuple(ops.gru_forward(*args))
    return tuple(ops.rnn_forward(*args, cell == "RNN_relu")) + (None,)


def op_backward(cell, a, reverse=False):
    """The backward op on ``a`` (layer tensors plus output, workspace, grad_output, grad_hy)."""
    if cell == "GRU":
        return ops.gru_backward(a["grad_output"], a["grad_hy"], a["input"], a["hx"], a["weight_ih"],
                                a["weight_hh"], a["output"], a["workspace"], a["lengths"], reverse, True)
    return ops.rnn_backward(a["grad_output"], a["grad_hy"], a["input"], a["hx"], a["weight_ih"],
                            a["weight_hh"], a["output"], a["lengths"], reverse, cell == "RNN_relu", True)


def torch_layer(cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False):
    """One layer in one direction, by torch.nn's cell, one sequence and step at a time.

    Sequence b covers times 0..lengths[b]-1; in reverse it starts at its own
    last element. Outputs past a sequence's end are zero; h_n is the state
    after its last step.
    """
    steps, batch, input_size = x.shape
    hidden = hx.shape[1]
    if cell == "GRU":
        module = nn.GRUCell(input_size, hidden, dtype=x.dtype)
    else:
        module = nn.RNNCell(input_size, hidden, nonlinearity=cell.split("_")[1], dtype=x.dtype)
    params = {"weight_ih": w_ih, "weight_hh": w_hh, "bias_ih": b_ih, "bias_hh": b_hh}
    zero = x.new_zeros(1, hidden)
    columns, finals = [], []
    for b in range(batch):
        length = steps if lengths is None else int(lengths[b])
        h = hx[b:b + 1]
        rows = [zero] * steps
        for s in range(length):
            t = length - 1 - s if reverse else s
            h = torch.func.functional_call(module, params, (x[t, b:b + 1], h))
            rows[t] = h
        columns.append(torch.stack(rows) if steps else x.new_zeros(0, 1, hidden))
        finals.append(h)
    output = torch.cat(columns, 1) if batch else x.new_zeros(steps, 0, hidden)
    h_n = torch.cat(finals) if batch else hx[:0]
    return output, h_n


def transposed(t):
    """Same values, strides in reverse order (dense but not contiguous)."""
    if t.dim() < 2:
        return strided(t)
    order = list(reversed(range(t.dim())))
    out = t.permute(order).contiguous().permute(order)
    assert torch.equal(out, t)
    return out


def strided(t):
    """Same values, every other element of a larger buffer, at a storage offset."""
    big = t.new_zeros([2 * s + 1 for s in t.shape])
    out = big[tuple(slice(1, None, 2) for _ in t.shape)]
    out.copy_(t)
    return out


def expanded(t):
    """The first row repeated with stride 0 (changes the values)."""
    return t[:1].expand(t.shape)


LAYOUTS = {"transposed": transposed, "strided": strided, "expanded": expanded}
FORWARD_ARGS = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "lengths")
# output and workspace must stay what forward returned: value-preserving layouts only.
BACKWARD_ARGS = ("grad_output", "grad_hy", "output", "workspace")


def check_engine_against_torch(cell, a, reverse=False, layouts=None):
    """Forward and backward ops on ``a`` with ``layouts[name]`` applied to the
    named arguments, compared with torch_layer on the same values."""
    layouts = layouts or {}

    def lay(name, t):
        return t if t is None or name not in layouts else layouts[name](t)

    args = {k: lay(k, v) for k, v in a.items()}
    output, h_n, workspace = op_forward(cell, args, reverse)
    gen = torch.Generator().manual_seed(5)
    grads = {"grad_output": torch.randn(output.shape, dtype=output.dtype, generator=gen),
             "grad_hy": torch.randn(h_n.shape, dtype=h_n.dtype, generator=gen)}
    back = dict(args, output=output, workspace=workspace, **grads)
    back = {k: lay(k, v) if k in BACKWARD_ARGS else v for k, v in back.items()}
    got = op_backward(cell, back, reverse)

    # torch.nn on plain copies of the same values; zero biases stand in for
    # absent ones (the op returns bias gradients regardless).
    G = args["weight_hh"].shape[0]
    leaves = {k: args[k].detach().clone().requires_grad_(True)
              for k in ("input", "hx", "weight_ih", "weight_hh")}
    for k in ("bias_ih", "bias_hh"):
        value = args[k] if args[k] is not None else args["input"].new_zeros(G)
        leaves[k] = value.detach().clone().requires_grad_(True)
    ref_output, ref_h_n = torch_layer(cell, leaves["input"], leaves["hx"], leaves["weight_ih"],
                                      leaves["weight_hh"], leaves["bias_ih"], leaves["bias_hh"],
                                      args["lengths"], reverse)
    assert_close(output, ref_output, msg="output")
    assert_close(h_n, ref_h_n, msg="h_n")
    pairs = [(o, g) for o, g in zip((ref_output, ref_h_n), (back["grad_output"], back["grad_hy"]))
             if o.requires_grad]
    inputs = list(leaves.values())
    if pairs:
        expected = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                       allow_unused=True, materialize_grads=True)
    else:
        expected = [torch.zeros_like(t) for t in inputs]
    for name, g, e in zip(leaves, got, expected):
        assert g.shape == e.shape, f"grad of {name}: {tuple(g.shape)} != {tuple(e.shape)}"
        assert_close(g, e, msg=f"grad of {name}")


def raises_case(cell, stage, change):
    """A call of the forward or backward op with ``change`` applied to valid arguments."""

    def run():
        a = layer_tensors(cell)
        if stage == "forward":
            change(a)
            op_forward(cell, a)
            return
        output, h_n, workspace = op_forward(cell, a)
        a.update(output=output, workspace=workspace, grad_output=torch.randn_like(output),
                 grad_hy=torch.randn_like(h_n))
        change(a)
        op_backward(cell, a)

    return run


def _set(**values):
    """A change setting arguments to functions of the valid ones: _set(hx=lambda a: ...)."""

    def change(a):
        a.update({k: f(a) for k, f in values.items()})

    return change


def _all(fn, names):
    def change(a):
        a.update({k: fn(a[k]) if a[k] is not None else None for k in names})

    return change


def _no_bias(change):
    def both(a):
        a.update(bias_ih=None, bias_hh=None)
        change(a)

    return both


LAYER_TENSOR_NAMES = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")

MALFORMED_FORWARD = {
    "input_2d": _set(input=lambda a: a["input"][0]),
    "input_4d": _set(input=lambda a: a["input"][None]),
    "input_0d": _set(input=lambda a: a["input"][0, 0, 0]),
    "hx_1d": _set(hx=lambda a: a["hx"][0]),
    "hx_3d": _set(hx=lambda a: a["hx"][None]),
    "hx_batch_mismatch": _set(hx=lambda a: a["hx"][:-1]),
    "hx_hidden_mismatch": _set(hx=lambda a: a["hx"][:, :-1]),
    "weight_ih_1d": _set(weight_ih=lambda a: a["weight_ih"][0]),
    "weight_ih_input_size_mismatch": _set(weight_ih=lambda a: a["weight_ih"][:, :-1]),
    "weight_ih_rows_mismatch": _set(weight_ih=lambda a: a["weight_ih"][:-1]),
    "weight_hh_rows_not_gates_times_hidden": _set(weight_hh=lambda a: a["weight_hh"][:-1]),
    "weight_hh_3d": _set(weight_hh=lambda a: a["weight_hh"][None]),
    "weight_hh_no_columns": _set(weight_hh=lambda a: a["weight_hh"][:, :0]),
    "bias_ih_wrong_size": _set(bias_ih=lambda a: a["bias_ih"][:-1]),
    "bias_hh_2d": _set(bias_hh=lambda a: a["bias_hh"][None]),
    "bias_hh_float32": _set(bias_hh=lambda a: a["bias_hh"].float()),
    "input_float32": _set(input=lambda a: a["input"].float()),
    "hx_float32": _set(hx=lambda a: a["hx"].float()),
    "weight_ih_float32": _set(weight_ih=lambda a: a["weight_ih"].float()),
    "weight_hh_float32": _set(weight_hh=lambda a: a["weight_hh"].float()),
    "all_int64": _no_bias(_all(lambda t: t.long(), LAYER_TENSOR_NAMES)),
    "all_float16": _all(lambda t: t.half(), LAYER_TENSOR_NAMES),
    "all_bfloat16": _all(lambda t: t.bfloat16(), LAYER_TENSOR_NAMES),
    "all_complex": _no_bias(_all(lambda t: t.to(torch.complex128), LAYER_TENSOR_NAMES)),
    "lengths_above_T": _set(lengths=lambda a: torch.tensor([T + 1, 1, 1])),
    "lengths_negative": _set(lengths=lambda a: torch.tensor([2, -1, 1])),
    "lengths_wrong_size": _set(lengths=lambda a: torch.tensor([2, 1])),
    "lengths_2d": _set(lengths=lambda a: torch.tensor([[2, 1, 1]])),
    "lengths_int32": _set(lengths=lambda a: torch.tensor([2, 1, 1], dtype=torch.int32)),
    "lengths_float": _set(lengths=lambda a: torch.tensor([2.0, 1.0, 1.0])),
    "lengths_bool": _set(lengths=lambda a: torch.tensor([True, True, True])),
    "hx_on_meta": _set(hx=lambda a: a["hx"].to("meta")),
    "weight_hh_on_meta": _set(weight_hh=lambda a: a["weight_hh"].to("meta")),
    "lengths_on_meta": _set(lengths=lambda a: torch.tensor([2, 1, 1], device="meta")),
}

MALFORMED_BACKWARD = {
    "grad_output_short": _set(grad_output=lambda a: a["grad_output"][:-1]),
    "grad_output_2d": _set(grad_output=lambda a: a["grad_output"].flatten(0, 1)),
    "grad_hy_hidden_mismatch": _set(grad_hy=lambda a: a["grad_hy"][:, :-1]),
    "grad_hy_3d": _set(grad_hy=lambda a: a["grad_hy"][None]),
    "output_hidden_mismatch": _set(output=lambda a: a["output"][..., :-1]),
    "output_and_grads_float32": _set(output=lambda a: a["output"].float(),
                                     grad_output=lambda a: a["grad_output"].float(),
                                     grad_hy=lambda a: a["grad_hy"].float()),
    "grad_output_float32": _set(grad_output=lambda a: a["grad_output"].float()),
    "grad_hy_float32": _set(grad_hy=lambda a: a["grad_hy"].float()),
    "input_batch_mismatch": _set(input=lambda a: a["input"][:, :-1]),
    "weight_hh_rows_mismatch": _set(weight_hh=lambda a: a["weight_hh"][:-1]),
    "lengths_above_T": _set(lengths=lambda a: torch.tensor([T + 1, 1, 1])),
    "lengths_negative": _set(lengths=lambda a: torch.tensor([2, -1, 1])),
    "grad_output_on_meta": _set(grad_output=lambda a: a["grad_output"].to("meta")),
    "output_on_meta": _set(output=lambda a: a["output"].to("meta")),
}

MALFORMED_GRU_BACKWARD = {
    "workspace_wrong_size": _set(workspace=lambda a: a["workspace"][..., :-1]),
    "workspace_2d": _set(workspace=lambda a: a["workspace"][0]),
    "workspace_float32": _set(workspace=lambda a: a["workspace"].float()),
}


def valid_case(cell, reverse=False, layouts=None, **sizes):
    def run():
        check_engine_against_torch(cell, layer_tensors(cell, **sizes), reverse, layouts)

    return run


def engine_cases():
    """name -> ("raises" | "valid", zero-argument callable)."""
    cases = {}
    for cell in ENGINE_CELLS:
        for name, change in MALFORMED_FORWARD.items():
            cases[f"{cell}-forward-{name}"] = ("raises", raises_case(cell, "forward", change))
        backward = dict(MALFORMED_BACKWARD, **(MALFORMED_GRU_BACKWARD if cell == "GRU" else {}))
        for name, change in backward.items():
            cases[f"{cell}-backward-{name}"] = ("raises", raises_case(cell, "backward", change))

        # Unusual but valid calls.
        for reverse in (False, True):
            direction = "reverse" if reverse else "forward"
            cases[f"{cell}-valid-{direction}-plain"] = ("valid", valid_case(cell, reverse))
            cases[f"{cell}-valid-{direction}-lengths"] = (
                "valid", valid_case(cell, reverse, lengths=[4, 1, 3]))
            cases[f"{cell}-valid-{direction}-zero_length"] = (
                "valid", valid_case(cell, reverse, lengths=[4, 0, 2]))
            cases[f"{cell}-valid-{direction}-no_bias"] = (
                "valid", valid_case(cell, reverse, bias=False, lengths=[3, 4, 1]))
        cases[f"{cell}-valid-empty_time"] = ("valid", valid_case(cell, T=0))
        cases[f"{cell}-valid-empty_batch"] = ("valid", valid_case(cell, B=0))
        cases[f"{cell}-valid-empty_batch_lengths"] = ("valid", valid_case(cell, B=0, lengths=[]))
        cases[f"{cell}-valid-zero_input_size"] = ("valid", valid_case(cell, I=0))
        cases[f"{cell}-valid-zero_hidden_size"] = ("valid", valid_case(cell, H=0))
        cases[f"{cell}-valid-zero_hidden_size_lengths"] = (
            "valid", valid_case(cell, True, H=0, lengths=[4, 1, 3]))
        # Every argument in every layout, on the hardest path (reverse with lengths).
        names = FORWARD_ARGS + BACKWARD_ARGS[:3] + (("workspace",) if cell == "GRU" else ())
        for arg in names:
            for layout, fn in LAYOUTS.items():
                if layout == "expanded" and arg in ("output", "workspace"):
                    continue
                if layout == "transposed" and arg in ("bias_ih", "bias_hh", "lengths"):
                    continue  # 1-D: same as strided
                cases[f"{cell}-valid-{layout}-{arg}"] = (
                    "valid", valid_case(cell, True, {arg: fn}, lengths=[4, 1, 3]))
        for layout in ("transposed", "strided"):
            for reverse in (False, True):
                for lengths in (None, [4, 1, 3]):
                    key = f"{cell}-valid-{layout}-everything-{'reverse' if reverse else 'forward'}-" \
                          f"{'lengths' if lengths else 'full'}"
                    every = {k: LAYOUTS[layout] for k in FORWARD_ARGS + BACKWARD_ARGS}
                    cases[key] = ("valid", valid_case(cell, reverse, every, lengths=lengths))
    return cases


ENGINE_CASES = engine_cases()
MARK = "@@engine-case"


def _engine_battery_child(start):
    """Runs ENGINE_CASES from index ``start``; a marker line before and after each."""
    torch.set_num_threads(1)
    libc = ctypes.CDLL(None)

    def flush():
        sys.stdout.flush()
        sys.stderr.flush()
        libc.fflush(None)  # C-level output (a BLAS complaining) lands between the markers

    for name, (_, fn) in list(ENGINE_CASES.items())[start:]:
        print(f"{MARK} start {name}")
        flush()
        try:
            fn()
            outcome = {"raised": None}
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            outcome = {"raised": type(exc).__name__, "runtime_error": isinstance(exc, RuntimeError),
                       "message": (str(exc).strip().splitlines() or [""])[0][:300]}
        flush()
        print(f"{MARK} end {name} {json.dumps(outcome)}")
        flush()


@pytest.fixture(scope="module")
def engine_battery():
    """Runs every engine case in a child process; restarts after a crash.

    Returns name -> dict(outcome=..., stray=output printed during the call,
    crash=how the process died during it).
    """
    names = list(ENGINE_CASES)
    results, start = {}, 0
    while start < len(names):
        proc = run_child("engine-battery", str(start))
        current, stray = None, []
        for line in proc.stdout.splitlines():
            if line.startswith(f"{MARK} start "):
                current, stray = line.split(" ", 2)[2], []
            elif line.startswith(f"{MARK} end "):
                _, _, name, outcome = line.split(" ", 3)
                results[name] = {"outcome": json.loads(outcome), "stray": "\n".join(stray).strip()}
                current = None
            elif current is not None:
                stray.append(line)
        if current is None:
            if proc.returncode != 0 and len(results) < len(names):
                pytest.fail(f"engine battery child failed ({describe_exit(proc.returncode)}):\n"
                            f"{proc.stdout[-3000:]}")
            break
        results[current] = {"outcome": None, "stray": "\n".join(stray).strip(),
                            "crash": describe_exit(proc.returncode)}
        start = names.index(current) + 1
    return results


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_call(engine_battery, case):
    expect = ENGINE_CASES[case][0]
    result = engine_battery.get(case)
    assert result is not None, "the case did not run"
    outcome = result["outcome"]
    assert outcome is not None, f"the process died in this call ({result['crash']}): {result['stray']}"
    assert not result["stray"], f"the call printed: {result['stray']}"
    if expect == "raises":
        assert outcome["raised"] is not None, "malformed call returned normally"
        assert outcome["runtime_error"], f"raised {outcome['raised']}: {outcome['message']}"
        assert outcome["raised"] != "AssertionError"
    else:
        assert outcome["raised"] is None, f"{outcome['raised']}: {outcome['message']}"


# ---------------------------------------------------------------------------
# 3. Extreme values
# ---------------------------------------------------------------------------


def assert_matches_torch(got, expected, dtype, exact=None):
    """Every entry of two forward_backward results equal within dtype's
    tolerance, NaN where torch.nn has NaN and nowhere else, same infinities.

    With ``exact`` (torch.nn's results in float64), ill-conditioned cases are
    judged against torch.nn's own accuracy: an entry may differ from
    torch.nn's float32 result by up to EXACT_ERROR_FACTOR times the largest
    error that result has. (Seen: the C++ engine within 1.9x of torch.nn's
    error, the Triton engine's GRU within 3.9x: its exp-based gates round
    differently where they saturate. A wrong formula is off by O(1).)
    Entries whose exact value lies beyond dtype's range are not compared:
    there both results are overflow artifacts (inf, NaN, or 0 after a ReLU)
    whose form depends on the order of the sums (seen: torch.nn NaN, the
    Triton tile kernel inf, where the exact value is 4e39). Where the exact
    forward itself leaves dtype's range, the gradients flow through those
    artifacts (a ReLU passes inf, blocks NaN) and only the outputs are
    compared.
    """
    assert sorted(got) == sorted(expected)
    keys = list(expected)
    if exact is not None and any(exact[k].abs().max() > torch.finfo(dtype).max for k in ("output", "h_n")):
        keys = ["output", "h_n"]
    for key in keys:
        value = expected[key]
        tol = dict(TOLERANCES[dtype])
        finite = value[torch.isfinite(value)]
        if finite.numel():
            tol["atol"] *= max(1.0, finite.abs().max().item())
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        actual = got[key]
        if exact is not None:
            overflows = exact[key].abs() > torch.finfo(dtype).max
            actual = torch.where(overflows, value, actual)
            truth = exact[key].to(dtype)
            both = torch.isfinite(value) & torch.isfinite(truth)
            if both.any():
                torch_error = (value[both].double() - exact[key][both]).abs().max().item()
                tol["atol"] = max(tol["atol"], EXACT_ERROR_FACTOR * torch_error)
        torch.testing.assert_close(actual, value, equal_nan=True, **tol,
                                   msg=lambda default, key=key: f"{key}: {default}")


def scale_parameters(modules, pattern, factor):
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if pattern in name:
                    p.mul_(factor)


def put(t, index, value):
    t = t.clone()
    t[index] = value
    return t


INF, NAN = float("inf"), float("nan")

# case -> function (modules, x, hx) -> (x, hx), possibly scaling the modules' weights.
EXTREME_CASES = {
    "weight_ih_x1e4": lambda m, x, hx: (scale_parameters(m, "weight_ih", 1e4), (x, hx))[1],
    "weight_hh_x1e4": lambda m, x, hx: (scale_parameters(m, "weight_hh", 1e4), (x, hx))[1],
    "input_x1e4": lambda m, x, hx: (x * 1e4, hx),
    "input_minus_x1e4": lambda m, x, hx: (-x.abs() * 1e4, hx),
    "input_pos_inf": lambda m, x, hx: (put(x, (2, 1, 0), INF), hx),
    "input_neg_inf": lambda m, x, hx: (put(x, (3, 0, 2), -INF), hx),
    "input_nan": lambda m, x, hx: (put(x, (2, 1, 0), NAN), hx),
    "hx_pos_inf": lambda m, x, hx: (x, put(hx, (0, 1, 0), INF)),
    "hx_neg_inf": lambda m, x, hx: (x, put(hx, (1, 2, 3), -INF)),
    "hx_nan": lambda m, x, hx: (x, put(hx, (1, 2, 3), NAN)),
}


# Weights scaled by 1e4 amplify rounding by as much in the gradients: float32
# results there are compared as accurate as torch.nn's own (see
# assert_matches_torch).
ILL_CONDITIONED = {"weight_ih_x1e4", "weight_hh_x1e4"}
EXACT_ERROR_FACTOR = 8
# Each case's Inf/NaN positions lie inside every sequence of PACKED_LENGTHS.
PACKED_LENGTHS = [6, 4, 5]
LAYOUTS = {"stacked": {}, "bidirectional_packed": {"bidirectional": True}}
TRITON_STRATEGIES = ["tile", "split", "stepwise"]


def triton_strategy(name):
    """``fastrnn.triton.use_strategy(name)``, imported where triton is."""
    return importlib.import_module("fastrnn.triton").use_strategy(name)


def run_extreme_case(kind, dtype, case, layout, device="cpu"):
    torch_cls, fast_cls, kwargs = KINDS[kind]
    extra = LAYOUTS[layout]
    directions = 2 if extra.get("bidirectional") else 1
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, dtype=dtype,
                                     **kwargs, **extra)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, B, I, dtype=dtype, generator=gen)
    hx = torch.randn(LAYERS * directions, B, H, dtype=dtype, generator=gen)
    x, hx = EXTREME_CASES[case]([reference, candidate], x, hx)
    lengths = PACKED_LENGTHS if layout == "bidirectional_packed" else None
    expected = forward_backward(reference, x, hx, lengths=lengths)
    got = on_cpu(forward_backward(candidate.to(device), x, hx, lengths=lengths))
    exact = None
    if dtype == torch.float32 and case in ILL_CONDITIONED:
        exact = forward_backward(copy.deepcopy(reference).double(), x.double(), hx.double(),
                                 lengths=lengths, upstream_dtype=dtype)
    assert_matches_torch(got, expected, dtype, exact)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(EXTREME_CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@device_param
def test_extreme_values(kind, dtype, case, layout, device):
    run_extreme_case(kind, dtype, case, layout, device)


def on_cpu(result):
    """A forward_backward result with every tensor moved to the CPU."""
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


@pytest.mark.cuda
@pytest.mark.skipif(fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None,
                    reason="the Triton engine cannot run here")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(EXTREME_CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
def test_extreme_values_triton_engine(kind, case, layout, strategy):
    # Through the Triton interpreter on CPU (on the GPU where there is one),
    # against torch.nn itself, every strategy, packed and reversed too: its
    # exp-based tanh and sigmoid must saturate and propagate NaN as
    # torch.nn's do.
    with fastrnn.use_backend("triton"), triton_strategy(strategy):
        run_extreme_case(kind, torch.float32, case, layout, TRITON_DEVICE.type)


def overflow_at_end_case(dtype, bidirectional):
    """A ReLU RNN whose state overflows to inf at the last step of a shorter
    packed sequence (in each direction), and its input."""
    big = 1e30 if dtype == torch.float32 else 1e300
    reference, candidate = make_pair(nn.RNN, fastrnn.RNN, 1, 1, nonlinearity="relu", dtype=dtype,
                                     bidirectional=bidirectional)
    with torch.no_grad():
        for m in (reference, candidate):
            for name, p in m.named_parameters():
                p.fill_(1e9 if "weight_ih" in name else big if "weight_hh" in name else 0.0)
    x = torch.zeros(3, 2, 1, dtype=dtype)
    x[0, 1, 0], x[1, 1, 0] = 1.0, 1e-9  # state 1e9, then 1e9 * big = inf (forward; reverse alike)
    return reference, candidate, x


# Cells: (modules, x (B, I), hx (B, H)) -> (x, hx).
CELL_EXTREME_CASES = {
    "weight_hh_x1e4": lambda m, x, hx: (scale_parameters(m, "weight_hh", 1e4), (x, hx))[1],
    "input_x1e4": lambda m, x, hx: (x * 1e4, hx),
    "input_pos_inf": lambda m, x, hx: (put(x, (1, 0), INF), hx),
    "input_neg_inf": lambda m, x, hx: (put(x, (2, 3), -INF), hx),
    "input_nan": lambda m, x, hx: (put(x, (1, 0), NAN), hx),
    "hx_pos_inf": lambda m, x, hx: (x, put(hx, (0, 2), INF)),
    "hx_nan": lambda m, x, hx: (x, put(hx, (2, 5), NAN)),
}


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CELL_EXTREME_CASES))
@device_param
def test_cell_extreme_values(kind, dtype, case, device):
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, I, dtype=dtype, generator=gen)
    hx = torch.randn(B, H, dtype=dtype, generator=gen)
    x, hx = CELL_EXTREME_CASES[case]([reference, candidate], x, hx)
    assert_matches_torch(on_cpu(forward_backward(candidate.to(device), x, hx)),
                         forward_backward(reference, x, hx), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@device_param
def test_overflow_at_end_of_packed_sequence(dtype, device):
    # A ReLU state that overflows to inf at the last step of a shorter packed
    # sequence: torch.nn's gradients stay finite, so must fastrnn's (the
    # padded steps after it must not contribute 0 * inf).
    reference, candidate, x = overflow_at_end_case(dtype, bidirectional=False)
    expected = forward_backward(reference, x, lengths=[3, 2])
    assert torch.isinf(expected["output"]).any() and torch.isfinite(expected["grad_weight_hh_l0"]).all()
    got = on_cpu(forward_backward(candidate.to(device), x, lengths=[3, 2]))
    assert_matches_torch(got, expected, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None,
                    reason="the Triton engine cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
def test_overflow_at_end_of_packed_sequence_triton_engine(dtype, bidirectional, strategy):
    reference, candidate, x = overflow_at_end_case(dtype, bidirectional)
    expected = forward_backward(reference, x, lengths=[3, 2])
    assert torch.isinf(expected["output"]).any()
    assert all(torch.isfinite(v).all() for k, v in expected.items() if "weight_hh" in k)
    with fastrnn.use_backend("triton"), triton_strategy(strategy):
        got = on_cpu(forward_backward(candidate.to(TRITON_DEVICE), x, lengths=[3, 2]))
    assert_matches_torch(got, expected, dtype)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_zero_length_sequence_in_a_layer(backend, reverse):
    """A length-0 entry (the layer functions accept one; packing does not):
    zero outputs, h_n = h0, the gradient into h0 passed straight through,
    the other sequences untouched. Its h0 is infinite: nothing may multiply
    it into the weight gradient (0 * inf = NaN)."""
    if backend == "triton" and fastrnn.backends.triton_unavailable_reason(TRITON_DEVICE) is not None:
        pytest.skip("the Triton engine cannot run here")
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(9)
    x, h0 = torch.randn(T, 3, I, generator=gen, dtype=torch.float64), torch.randn(3, H, generator=gen,
                                                                                   dtype=torch.float64)
    w_ih, w_hh = torch.randn(H, I, generator=gen, dtype=torch.float64), torch.randn(H, H, generator=gen,
                                                                                    dtype=torch.float64)
    h0[1] = float("inf")
    leaves = [t.to(device).requires_grad_() for t in (x, h0, w_ih, w_hh)]
    lengths = torch.tensor([T, 0, 2])
    with fastrnn.use_backend(backend):
        output, h_n = fastrnn.functional.rnn_layer(*leaves, lengths=lengths, reverse=reverse)
    assert torch.equal(output[:, 1].cpu(), torch.zeros(T, H, dtype=torch.float64))
    assert torch.equal(h_n[1].cpu(), h0[1])
    grads = torch.autograd.grad(output.sum() + h_n.sum(), leaves)
    assert torch.equal(grads[1][1].cpu(), torch.ones(H, dtype=torch.float64))
    # the other two sequences as a batch of their own
    keep = torch.tensor([0, 2])
    alone = [leaves[0].detach()[:, keep].requires_grad_(), leaves[1].detach()[keep].requires_grad_(),
             *(t.detach().requires_grad_() for t in leaves[2:])]
    expected_output, expected_h = fastrnn.reference.rnn_layer(*(t.cpu() for t in alone), lengths=lengths[keep],
                                                               reverse=reverse)
    assert_close(output[:, keep].cpu(), expected_output)
    assert_close(h_n[keep].cpu(), expected_h)
    expected_grads = torch.autograd.grad(expected_output.sum() + expected_h.sum(), alone)
    for got, expected in zip(grads[2:], expected_grads[2:]):
        assert_close(got.cpu(), expected)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_long_sequence_does_not_drift(kind, dtype):
    # The state stays float32 over 2000 steps: each output is the float32
    # computation rounded once (within one rounding of it, 1 eps relative),
    # where a state rounded every step would stray by several eps.
    torch_cls, fast_cls, kwargs = KINDS[kind]
    steps, batch, input_size, hidden = 2000, 2, 4, 8
    torch.manual_seed(0)
    reference = torch_cls(input_size, hidden, **kwargs)
    candidate = fast_cls(input_size, hidden, dtype=dtype, **kwargs)
    rounded = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    candidate.load_state_dict(rounded)
    reference.load_state_dict({k: v.float() for k, v in rounded.items()})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, input_size, generator=gen).to(dtype)
    hx = torch.randn(1, batch, hidden, generator=gen).to(dtype)
    got = forward_backward(candidate, x, hx)
    # The same upstream gradients as the half-precision run draws.
    expected = forward_backward(reference, x.float(), hx.float(), upstream_dtype=dtype)
    eps = torch.finfo(dtype).eps
    for key, value in expected.items():
        assert got[key].dtype == dtype, key
        # Outputs: elementwise. Gradients are float32 sums over 2000 steps,
        # rounded once: relative to their largest entry.
        atol = 1e-5 if key in ("output", "h_n") else eps * value.abs().max().item()
        torch.testing.assert_close(got[key].float(), value, rtol=eps, atol=atol,
                                   msg=lambda default, key=key: f"{key}: {default}")


# ---------------------------------------------------------------------------
# 4. 100,000 steps: memory, completion, results
# ---------------------------------------------------------------------------

LONG = dict(steps=100_000, batch=2, input_size=4, hidden=16)
FLOAT_BYTES = 4
MEMORY_ALLOWANCE = 48 << 20  # allocator slack, thread stacks, small tensors
# Memory must grow in proportion to the length: the peak is also measured at
# half the length, and the growth between the two bounded per step.
HALF_STEPS = LONG["steps"] // 2


def expected_bytes_per_step(name):
    """What a forward+backward over one step of one sequence must hold:
    the test's input, its gradient and the upstream gradient, the saved
    output, and for GRU the saved gate workspace (4H)."""
    i, h = LONG["input_size"], LONG["hidden"]
    floats = 2 * i + h + h + (4 * h if name == "GRU" else 0)
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


def _long_sequence_child(name, steps):
    # One intra-op thread: memory does not depend on it, and a CPU shared
    # with other jobs makes small multi-threaded steps erratic.
    torch.set_num_threads(1)
    batch, input_size, hidden = (LONG[k] for k in ("batch", "input_size", "hidden"))
    torch_cls, fast_cls = MODULES[name]
    torch.manual_seed(0)
    reference = torch_cls(input_size, hidden)
    candidate = copy_weights(reference, fast_cls(input_size, hidden))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, input_size, generator=gen).requires_grad_(True)
    grad_output = torch.randn(steps, batch, hidden, generator=gen)
    grad_h = torch.randn(1, batch, hidden, generator=gen)

    # A short run first pages in the code and one-time library buffers
    # (BLAS workspaces, thread pools), whose size depends on the machine,
    # not on the sequence length. The measured window then holds the test's
    # own tensors and what forward+backward allocates.
    warm = x.detach()[:1000].clone().requires_grad_(True)
    torch.autograd.backward(list(candidate(warm)), [grad_output[:1000], grad_h])
    candidate.zero_grad(set_to_none=True)
    del warm
    fixed = sum(t.numel() * t.element_size() for t in (x, grad_output, grad_h))
    base = reset_peak_rss() - fixed

    output, h_n = candidate(x)
    torch.autograd.backward([output, h_n], [grad_output, grad_h])
    peak = peak_rss_bytes() - base

    grads = {"input": x.grad, **{n: p.grad for n, p in candidate.named_parameters()}}
    shapes_ok = x.grad.shape == x.shape and all(
        p.grad is not None and p.grad.shape == p.shape for p in candidate.parameters())
    finite = all(bool(torch.isfinite(t).all()) for t in [output, h_n, *grads.values()])

    # torch.nn over the same 100,000 steps (forward only: its backward would
    # hold a graph of 100,000 steps).
    with torch.no_grad():
        ref_output, ref_h_n = reference(x)
    assert_close(output.detach(), ref_output, msg="output")
    assert_close(h_n.detach(), ref_h_n, msg="h_n")
    # The input gradient of the last K steps depends only on those steps:
    # torch.nn from the state before them gives it exactly.
    K = 300
    tail = x.detach()[-K:].clone().requires_grad_(True)
    ref_out, ref_h = reference(tail, output.detach()[-K - 1][None])
    (ref_grad,) = torch.autograd.grad([ref_out, ref_h], [tail], [grad_output[-K:], grad_h])
    assert_close(x.grad[-K:], ref_grad, msg="input gradient of the last steps")
    print(json.dumps({"peak_bytes": peak, "per_step": peak / (steps * batch),
                      "shapes_ok": shapes_ok, "finite": finite}))


@pytest.fixture(scope="module")
def long_sequence_runs():
    # Both children at once: each measures its own process.
    procs = {(name, steps): subprocess.Popen(
        [sys.executable, "-u", os.path.abspath(__file__), "long-sequence", name, str(steps)],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in ("RNN", "GRU") for steps in (HALF_STEPS, LONG["steps"])}
    return {key: (proc.communicate(timeout=300)[0], proc.returncode) for key, proc in procs.items()}


def long_sequence_report(runs, name, steps):
    out, returncode = runs[name, steps]
    assert returncode == 0, f"child failed ({describe_exit(returncode)}):\n{out[-4000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shapes_ok"] and report["finite"]
    return report


@pytest.mark.parametrize("name", ["RNN", "GRU"])
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


# ---------------------------------------------------------------------------
# 5. Unusual layouts, shared and replaced parameters, functional_call
# ---------------------------------------------------------------------------


def forward_backward_views(module, leaves, build, grad_seed=1234):
    """Like conftest.forward_backward, but the call's arguments are views
    ``build(*leaves)`` of fresh leaf copies (so their strides reach the
    module); gradients are taken with respect to the leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    outputs = module(*build(*leaves))
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = [random_like_shape(o.shape, o.dtype, gen).to(o.device) for o in outputs]
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(outputs, leaves + list(params.values()), upstream,
                                allow_unused=True, materialize_grads=True)
    result = {f"output_{i}": o.detach() for i, o in enumerate(outputs)}
    result.update({f"grad_leaf_{i}": g for i, g in enumerate(grads[:len(leaves)])})
    result.update({f"grad_{n}": g for n, g in zip(params, grads[len(leaves):])})
    return result


S = 2 * LAYERS  # states of a bidirectional stack

# case -> (module kwargs, leaf shapes, build(*leaves) -> call arguments)
LAYOUT_CASES = {
    "input_transposed": ({}, [(B, T, I)], lambda x: (x.transpose(0, 1),)),
    "input_transposed_batch_first": ({"batch_first": True}, [(T, B, I)], lambda x: (x.transpose(0, 1),)),
    "input_strided": ({}, [(2 * T, B, 2 * I)], lambda x: (x[::2, :, 1::2],)),
    "input_every_other_sequence": ({}, [(T, 2 * B, I)], lambda x: (x[:, ::2],)),
    "input_unbatched_transposed": ({}, [(I, T)], lambda x: (x.t(),)),
    "input_broadcast_over_time": ({}, [(1, B, I)], lambda x: (x.expand(T, B, I),)),
    "hx_expanded": ({}, [(T, B, I), (1, 1, H)], lambda x, h: (x, h.expand(S, B, H))),
    "hx_transposed": ({}, [(T, B, I), (B, S, H)], lambda x, h: (x, h.transpose(0, 1))),
    "hx_strided": ({}, [(T, B, I), (S, B, 2 * H)], lambda x, h: (x, h[..., ::2])),
    "both_batch_first": ({"batch_first": True}, [(T, B, I), (H, B, S)],
                         lambda x, h: (x.transpose(0, 1), h.permute(2, 1, 0))),
}

CELL_LAYOUT_CASES = {
    "input_transposed": ([(I, B)], lambda x: (x.t(),)),
    "input_strided": ([(2 * B, 3 * I)], lambda x: (x[::2, ::3],)),
    "hx_expanded": ([(B, I), (1, H)], lambda x, h: (x, h.expand(B, H))),
    "hx_transposed": ([(B, I), (H, B)], lambda x, h: (x, h.t())),
    "unbatched_strided": ([(2 * I,), (2 * H,)], lambda x, h: (x[::2], h[1::2])),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_noncontiguous_inputs(kind, case):
    module_kwargs, leaf_shapes, build = LAYOUT_CASES[case]
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, bidirectional=True,
                                     dtype=torch.float64, **kwargs, **module_kwargs)
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, dtype=torch.float64, generator=gen) for s in leaf_shapes]
    assert not all(a.is_contiguous() for a in build(*leaves)), "the case must pass a strided view"
    expected = forward_backward_views(reference, leaves, build)
    got = forward_backward_views(candidate, leaves, build)
    assert_results_close(got, expected, torch.float64)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("case", list(CELL_LAYOUT_CASES))
def test_cell_noncontiguous_inputs(kind, case):
    leaf_shapes, build = CELL_LAYOUT_CASES[case]
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, dtype=torch.float64, generator=gen) for s in leaf_shapes]
    assert not all(a.is_contiguous() for a in build(*leaves))
    expected = forward_backward_views(reference, leaves, build)
    got = forward_backward_views(candidate, leaves, build)
    assert_results_close(got, expected, torch.float64)


def tie(module):
    # Shared across directions and across layers (the shapes allow it).
    module.bias_ih_l0_reverse = module.bias_ih_l0
    module.weight_hh_l0_reverse = module.weight_hh_l0
    module.weight_hh_l1 = module.weight_hh_l0
    module.weight_ih_l1_reverse = module.weight_ih_l1


@pytest.mark.parametrize("kind", list(KINDS))
def test_tied_parameters(kind):
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, bidirectional=True,
                                     dtype=torch.float64, **kwargs)
    tie(reference)
    tie(candidate)
    names = [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in candidate.named_parameters()] == names
    assert "weight_hh_l1" not in names  # deduplicated: its gradient accumulates into weight_hh_l0
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    hx = torch.randn(S, B, H, dtype=torch.float64, generator=gen)
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, torch.float64)
    # Through .grad as well, the way an optimizer sees it.
    for m in (reference, candidate):
        out, h_n = m(x)
        (out.square().sum() + h_n.sum()).backward()
    for (name, p), q in zip(candidate.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_replaced_parameters(kind):
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS}
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    suffix = "" if is_cell else "_l0"
    gen = torch.Generator().manual_seed(6)
    new_hh = torch.randn(reference.weight_hh.shape if is_cell else reference.weight_hh_l0.shape,
                         dtype=torch.float64, generator=gen)
    new_ih = torch.randn(getattr(reference, "weight_ih" + suffix).shape[::-1], dtype=torch.float64,
                         generator=gen)
    for m in (reference, candidate):
        setattr(m, "weight_hh" + suffix, nn.Parameter(new_hh.clone()))
        # A transposed (non-contiguous) parameter.
        setattr(m, "weight_ih" + suffix, nn.Parameter(new_ih.clone().t()))
    assert not candidate.get_parameter("weight_ih" + suffix).is_contiguous()
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)
    expected = forward_backward(reference, x)
    got = forward_backward(candidate, x)
    assert_results_close(got, expected, torch.float64)
    # A plain tensor is refused the same way.
    assert_same_exception(lambda: setattr(reference, "weight_hh" + suffix, new_hh.clone()),
                          lambda: setattr(candidate, "weight_hh" + suffix, new_hh.clone()))


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_torch_func_grad(kind):
    # torch.func.grad over functional_call: the functorch path, which needs
    # the Functions' setup_context. Same gradients as torch.nn's.
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS, "bidirectional": True}
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    gen = torch.Generator().manual_seed(10)
    params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)
    weight = torch.randn((B, H) if is_cell else (T, B, 2 * H), dtype=torch.float64, generator=gen)

    def loss(module):
        def f(p, x):
            out = torch.func.functional_call(module, p, (x,))
            out = out[0] if isinstance(out, tuple) else out
            return (out * weight).sum()
        return torch.func.grad(f, argnums=(0, 1))(params, x)

    (expected_params, expected_x), (got_params, got_x) = loss(reference), loss(candidate)
    assert_close(got_x, expected_x, msg="grad x")
    for name, value in expected_params.items():
        assert_close(got_params[name], value, msg=f"grad {name}")


# Cells have one set of weights, so nothing to tie.
@pytest.mark.parametrize("kind, tied", [(k, False) for k in list(KINDS) + list(CELL_KINDS)]
                         + [(k, True) for k in KINDS])
def test_functional_call(kind, tied):
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS, "bidirectional": True}
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    if tied:
        tie(reference)
        tie(candidate)
    gen = torch.Generator().manual_seed(8)
    # Different tensors for every parameter, one of them non-contiguous.
    params = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen)
              for n, p in reference.named_parameters()}
    first = next(iter(params))
    params[first] = params[first].t().contiguous().t()
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)

    def run(module):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        outputs = torch.func.functional_call(module, leaves, (x,))
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        upstream_gen = torch.Generator().manual_seed(9)
        upstream = [random_like_shape(o.shape, o.dtype, upstream_gen).to(o.device) for o in outputs]
        grads = torch.autograd.grad(outputs, list(leaves.values()), upstream)
        return {"output": outputs[0].detach(), **{f"grad_{n}": g for n, g in zip(leaves, grads)}}

    expected = run(reference)
    got = run(candidate)
    assert_results_close(got, expected, torch.float64)
    # Afterwards the modules are back on their own parameters.
    expected = forward_backward(reference, x)
    got = forward_backward(candidate, x)
    assert_results_close(got, expected, torch.float64)


# ---------------------------------------------------------------------------
# 6. Threads
# ---------------------------------------------------------------------------

THREAD_SPECS = [
    (nn.RNN, fastrnn.RNN, 5, 16, dict(num_layers=2)),
    (nn.GRU, fastrnn.GRU, 3, 24, dict(bidirectional=True)),
    (nn.RNN, fastrnn.RNN, 8, 40, dict(nonlinearity="relu", batch_first=True)),
    (nn.GRU, fastrnn.GRU, 6, 20, dict(num_layers=2)),
]
THREAD_ITERATIONS = 12


def thread_job(module, inputs):
    """forward + backward for each input; every output and gradient, copied."""
    results = []
    params = list(module.parameters())
    for x in inputs:
        x = x.clone().requires_grad_(True)
        output, h_n = module(x)
        grads = torch.autograd.grad(output.square().sum() + h_n.sum(), [x] + params)
        results.append([output.detach(), h_n.detach(), *grads])
    return results


def test_threads_give_sequential_results(intra_op_threads):
    torch.set_num_threads(intra_op_threads)  # the usual setting, as an application has it
    # Modules and inputs are made up front: the global RNG is shared by threads.
    jobs = []
    for index, (torch_cls, fast_cls, input_size, hidden, kwargs) in enumerate(THREAD_SPECS):
        reference, candidate = make_pair(torch_cls, fast_cls, input_size, hidden, seed=index, **kwargs)
        gen = torch.Generator().manual_seed(100 + index)
        shape = (6, 10, input_size) if kwargs.get("batch_first") else (10, 6, input_size)
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


# ---------------------------------------------------------------------------
# Child process entry points
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    if sys.argv[1] == "engine-battery":
        _engine_battery_child(int(sys.argv[2]))
    elif sys.argv[1] == "long-sequence":
        _long_sequence_child(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
def test_blas_sizes_past_32_bits_do_not_wrap():
    """The Fortran BLAS takes 32-bit sizes: more than 2^31 - 1 rows must not
    be narrowed (MKL then reports 'Parameter 4 was incorrect on entry to
    SGEMM' and skips the product). Rows of width 0 cost no memory."""
    code = ("import torch, fastrnn\n"
            "T, B = 65536, 32769\n"
            "x, h0, w = torch.empty(T, B, 0), torch.empty(B, 0), torch.empty(0, 0)\n"
            "out, h = torch.ops.fastrnn.rnn_forward(x, h0, w, w, None, None, None, False, False)\n"
            "assert out.shape == (T, B, 0) and h.shape == (B, 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
