"""The engine ops handed malformed (and unusual but valid) tensors.

Each case is either "raises" (must raise a RuntimeError, NotImplementedError
included) or "valid" (must return what torch.nn's cells, run step by step,
compute, and print nothing). The calls run in a child process started from
this file (see the ``__main__`` block at the end), so a crash shows up as a
failed test that names the signal.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, describe_exit

HERE = os.path.dirname(os.path.abspath(__file__))

I, H, B, T = 5, 6, 3, 4

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest


def run_child(*args, timeout=300):
    """Runs this file as a script with ``args``; stdout and stderr merged."""
    return subprocess.run(
        [sys.executable, "-u", os.path.abspath(__file__), *args],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


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


def op_cell(cell):
    """The layer ops' name of an ENGINE_CELLS cell."""
    return cell.lower()


def op_forward(cell, a, reverse=False):
    """(output, h_n, workspace) from the engine's forward op."""
    output, (h_n,), workspace = ops.layer_forward(
        op_cell(cell), a["input"], [a["hx"]], a["weight_ih"], a["weight_hh"], a["bias_ih"],
        a["bias_hh"], None, a["lengths"], reverse, True, "auto")
    return output, h_n, workspace


def op_backward(cell, a, reverse=False):
    """The backward op on ``a`` (layer tensors plus output, workspace, grad_output, grad_hy)."""
    grad_input, (grad_hx,), *weights = ops.layer_backward(
        op_cell(cell), a["grad_output"], [a["grad_hy"]], a["input"], [a["hx"]], a["weight_ih"],
        a["weight_hh"], None, a["output"], a["workspace"], a["lengths"], reverse, True, True,
        "auto")
    return (grad_input, grad_hx, *weights[:4])


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
# Child process entry points
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    if sys.argv[1] == "engine-battery":
        _engine_battery_child(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
