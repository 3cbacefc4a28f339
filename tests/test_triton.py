"""The Triton engine against the reference loop and torch.nn.

Without a GPU these run on CPU tensors under the Triton interpreter
(conftest sets TRITON_INTERPRET=1); with one they run the compiled kernels
on it. Each launch strategy is forced in turn so every kernel is exercised,
whatever the planner would choose for these small shapes.
"""

import pytest
import torch

import fastrnn
import fastrnn.autograd
import fastrnn.functional
import fastrnn.ops
import fastrnn.reference
from conftest import (ALL_MODULE_KINDS, CELLS, TRITON_DEVICE, apply_function, assert_close,
                      assert_results_close, forward_backward, make_args, make_pair, make_state,
                      needs_cuda)
from fastrnn.cells import CELLS as ALL_CELL_DESCRIPTIONS

# The cells the Triton engine has kernels for (fastrnn.triton.KERNEL_CELLS;
# not imported here, so that collecting this file needs no triton).
CELL_DESCRIPTIONS = {name: ALL_CELL_DESCRIPTIONS[name]
                     for name in ("rnn_tanh", "rnn_relu", "gru", "lstm")}
# The layers under test: (cell, projection: a fraction of H, 0 for none).
LAYERS = {"rnn_tanh": ("rnn_tanh", 0), "rnn_relu": ("rnn_relu", 0), "gru": ("gru", 0),
          "lstm": ("lstm", 0), "lstm_proj": ("lstm", 1 / 3)}

triton_engine = pytest.importorskip("fastrnn.triton")
engine = triton_engine.engine

import triton  # noqa: E402  (importable once fastrnn.triton is)
import triton.language as tl  # noqa: E402

from fastrnn.triton.cells import tanh  # noqa: E402

STRATEGIES = ["tile", "split", "stepwise"]
# (T, B, H): odd sizes covering batch 1 (GEMV form), a partial batch tile,
# more than one batch tile, and hidden sizes that are not powers of two.
SHAPES = [(1, 1, 13), (2, 3, 40), (37, 17, 13), (37, 1, 40), (2, 17, 100), (37, 3, 100)]
SHAPE_IDS = [f"T{t}-B{b}-H{h}" for t, b, h in SHAPES]
# Every test here runs the Triton engine on TRITON_DEVICE: the GPU where there is one.
pytestmark = pytest.mark.cuda


def lengths_for(T, B, packed):
    """Unsorted per-sequence lengths in 1..T, the longest equal to T."""
    if not packed:
        return None
    return [T] + [1 + (7 * b) % T for b in range(1, B)]


def layer_args(layer, T, B, I, H, bias, dtype, seed):
    """Random float64 (x, states, w_ih, w_hh, b_ih, b_hh, w_hr) for one layer
    of LAYERS[layer] (w_hr None without a projection), at torch.nn's initial
    scale, which keeps long recurrences contractive, so float32 rounding is
    not amplified step after step."""
    cell, fraction = LAYERS[layer]
    description = CELL_DESCRIPTIONS[cell]
    P = max(1, int(H * fraction)) if fraction else 0
    K = P or H
    G = description.gates * H
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    weight = 1 / H ** 0.5
    x = rand(T, B, I)
    states = [rand(B, K if k == 0 else H) for k in range(len(description.states))]
    weights = [rand(G, I, scale=weight), rand(G, K, scale=weight),
               rand(G, scale=weight) if bias else None, rand(G, scale=weight) if bias else None,
               rand(P, H, scale=weight) if P else None]
    return x, states, weights


def run_layer(fn, cell, x, states, weights, lengths, reverse, generator):
    """Outputs, final states and the gradients of every input of ``fn``
    (fastrnn.functional.layer or the reference loop) under random upstream
    gradients on all of its outputs."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    output, finals = fn(cell, x, tuple(states), w_ih, w_hh, b_ih, b_hh, lengths, reverse, w_hr=w_hr)
    results = [output, *finals]
    leaves = [t for t in (x, *states, *weights) if t is not None]
    upstream = [torch.randn(t.shape, dtype=torch.float64, generator=generator).to(t) for t in results]
    return [*results, *torch.autograd.grad(results, leaves, upstream)]


def check_layer(strategy, layer, T, B, H, packed, reverse, dtype, I=5, bias=True):
    """The Triton engine's layer (fastrnn.functional.layer under ``strategy``)
    against the float64 reference loop: outputs, final states, every gradient."""
    cell = LAYERS[layer][0]
    x, states, weights = layer_args(layer, T, B, I, H, bias, dtype, seed=T + B + H)
    lengths = lengths_for(T, B, packed)
    lengths = None if lengths is None else torch.tensor(lengths)

    def prepare(t, device, to_dtype):
        return None if t is None else t.detach().to(device, to_dtype).requires_grad_()

    got_args = [prepare(t, TRITON_DEVICE, dtype) for t in (x, *states, *weights)]
    n = len(states)
    with fastrnn.use_backend("triton"), triton_engine.use_strategy(strategy):
        got = run_layer(fastrnn.functional.layer, cell, got_args[0], got_args[1:1 + n],
                        got_args[1 + n:], lengths, reverse, torch.Generator().manual_seed(11))
    # The reference runs in float64 on the same (rounded) values.
    ref_args = [prepare(t, "cpu", torch.float64) for t in got_args]
    expected = run_layer(fastrnn.reference.layer, cell, ref_args[0], ref_args[1:1 + n],
                         ref_args[1 + n:], lengths, reverse, torch.Generator().manual_seed(11))
    names = (["output", *[f"{s}_n" for s in CELL_DESCRIPTIONS[cell].states], "grad_x"]
             + [f"grad_{s}0" for s in CELL_DESCRIPTIONS[cell].states]
             + [name for name, t in zip(["grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh",
                                          "grad_w_hr"], weights) if t is not None])
    assert len(got) == len(expected) == len(names)
    for name, a, b in zip(names, got, expected):
        assert a.dtype == dtype and a.device.type == TRITON_DEVICE.type, name
        assert_close(a.cpu().double(), b, dtype, msg=name)


def tile_fits(layer, H, B, dtype):
    """Whether the tile strategy holds this layer's weights (the engine's rule, restated)."""
    cell, fraction = LAYERS[layer]
    gates = CELL_DESCRIPTIONS[cell].gates
    form = "gemv" if B == 1 or dtype == torch.float64 else ("fp32" if dtype == torch.float32 else "half")
    limit = engine.TILE_MAX_BLOCK_H[(form, gates)]
    block_h = max(16, 1 << (H - 1).bit_length())
    if not fraction:
        return block_h <= limit
    P = max(1, int(H * fraction))
    block_p = max(16, 1 << (P - 1).bit_length())
    return block_h <= limit and (gates + 1) * block_h * block_p <= gates * limit ** 2


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, True)], ids=["full", "lengths-reverse"])
def test_layer_matches_reference(strategy, layer, shape, packed, reverse):
    T, B, H = shape
    if strategy == "tile" and not tile_fits(layer, H, B, torch.float32):
        with pytest.raises(RuntimeError, match="tile"), fastrnn.use_backend("triton"), \
                triton_engine.use_strategy("tile"):
            check_layer(strategy, layer, T, B, H, packed, reverse, torch.float32)
        return
    check_layer(strategy, layer, T, B, H, packed, reverse, torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("packed,reverse", [(False, True), (True, False)], ids=["reverse", "lengths"])
def test_layer_matches_reference_float64(strategy, layer, packed, reverse):
    check_layer(strategy, layer, 9, 3, 13, packed, reverse, torch.float64)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("shape", [(9, 3, 13), (9, 1, 13)], ids=["T9-B3-H13", "T9-B1-H13"])
def test_layer_without_bias_matches_reference(strategy, layer, shape):
    """No biases: the kernels are compiled without the in-loop bias (B_HH None)."""
    T, B, H = shape
    check_layer(strategy, layer, T, B, H, True, True, torch.float32, bias=False)


def layer_op(direction):
    """The layer op the Triton engine serves on TRITON_DEVICE (forward or backward)."""
    names = fastrnn.ops.INTERPRETED if TRITON_DEVICE.type == "cpu" else fastrnn.ops.DISPATCHED
    return getattr(torch.ops.fastrnn, names[direction == "backward"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_inference_saves_no_workspace(strategy, layer, bias):
    """save_workspace=False: an empty workspace and the same output and final
    states, bit for bit, as the training forward, which saves (T, B, saved * H)."""
    cell = LAYERS[layer][0]
    description = CELL_DESCRIPTIONS[cell]
    T, B, H, I = 7, 3, 13, 5
    x, states, weights = layer_args(layer, T, B, I, H, bias, torch.float32, seed=2)
    x, *states = [t.float().to(TRITON_DEVICE) for t in (x, *states)]
    weights = [None if t is None else t.float().to(TRITON_DEVICE) for t in weights]
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    lengths = torch.tensor([7, 2, 5])
    results = {}
    for save in (True, False):
        results[save] = layer_op("forward")(cell, x, states, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                            True, save, strategy)
    (output, finals, workspace), (output_inf, finals_inf, workspace_inf) = results[True], results[False]
    assert workspace.shape == (T, B, description.saved * H)
    assert workspace_inf.shape == (0,)
    assert torch.equal(output, output_inf)
    assert all(torch.equal(a, b) for a, b in zip(finals, finals_inf))
    double = [None if t is None else t.cpu().double() for t in weights]
    expected, expected_finals = fastrnn.reference.layer(
        cell, x.cpu().double(), tuple(t.cpu().double() for t in states), *double[:4], lengths,
        True, w_hr=double[4])
    assert_close(output_inf.cpu().double(), expected, torch.float32)
    for a, b in zip(finals_inf, expected_finals, strict=True):
        assert_close(a.cpu().double(), b, torch.float32)


def test_projection_must_be_smaller_than_hidden():
    # As torch.nn's proj_size: h's columns must fall within the hidden units.
    H = 8
    x, h0, c0 = (torch.zeros(3, 2, 4), torch.zeros(2, H), torch.zeros(2, H))
    w_ih, w_hh, w_hr = torch.zeros(4 * H, 4), torch.zeros(4 * H, H), torch.zeros(H, H)
    x, h0, c0, w_ih, w_hh, w_hr = [t.to(TRITON_DEVICE) for t in (x, h0, c0, w_ih, w_hh, w_hr)]
    with pytest.raises(RuntimeError, match="projection must be smaller"):
        layer_op("forward")("lstm", x, [h0, c0], w_ih, w_hh, None, None, w_hr, None, False, False,
                            "auto")


@pytest.mark.parametrize("cell", [name for name, c in CELL_DESCRIPTIONS.items() if c.saved])
def test_backward_needs_the_workspace(cell):
    # Cells that save values per step: backward refuses an inference workspace.
    x, states, (w_ih, w_hh, b_ih, b_hh, _) = layer_args(cell, 3, 2, 4, 8, True, torch.float32, seed=1)
    x, *states = [t.float().to(TRITON_DEVICE) for t in (x, *states)]
    w_ih, w_hh, b_ih, b_hh = [t.float().to(TRITON_DEVICE) for t in (w_ih, w_hh, b_ih, b_hh)]
    output, _, workspace = layer_op("forward")(cell, x, states, w_ih, w_hh, b_ih, b_hh, None, None,
                                               False, False, "auto")
    with pytest.raises(RuntimeError, match="workspace"):
        layer_op("backward")(cell, torch.ones_like(output), [torch.ones_like(h) for h in states],
                             x, states, w_ih, w_hh, None, output, workspace, None, False, True,
                             "auto")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([2, 4, 1], True)], ids=["full", "lengths-reverse"])
def test_gradcheck(strategy, layer, lengths, reverse):
    cell = LAYERS[layer][0]
    x, states, weights = layer_args(layer, 4, 3, 3, 4 if layer != "lstm_proj" else 6, True,
                                    torch.float64, seed=7)
    n = len(states)
    lengths_t = None if lengths is None else torch.tensor(lengths)
    inputs = [t.detach().to(TRITON_DEVICE).requires_grad_()
              for t in (x, *states, *weights) if t is not None]

    def fn(x, *tensors):
        state, (w_ih, w_hh, b_ih, b_hh, *w_hr) = tensors[:n], tensors[n:]
        output, finals = fastrnn.autograd.layer(cell, x, state, w_ih, w_hh, b_ih, b_hh, lengths_t,
                                                reverse, w_hr=w_hr[0] if w_hr else None)
        return output, *finals

    # The interpreter makes a full numerical Jacobian slow (a minute per case);
    # fast mode checks random projections of it instead.
    fast = TRITON_DEVICE.type == "cpu"
    with fastrnn.use_backend("triton"), triton_engine.use_strategy(strategy):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_low_precision_keeps_float32_state(strategy, dtype, layer):
    """Half inputs and weights, float32 state and accumulation: the result is
    within the half type's rounding of the exact computation on the same
    (rounded) inputs, over 37 steps (a smaller H where the tile strategy
    holds no H = 40)."""
    H = 40 if strategy != "tile" or tile_fits(layer, 40, 3, dtype) else 24
    check_layer(strategy, layer, 37, 3, H, True, False, dtype)


@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
@pytest.mark.parametrize("kind", list(ALL_MODULE_KINDS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("input_kind", ["batched", "packed"])
def test_modules_match_torch_nn(strategy, kind, bidirectional, input_kind):
    """Two-layer modules on the Triton engine against torch.nn (float64)."""
    torch_cls, fast_cls, extra = ALL_MODULE_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, 7, 13, num_layers=2, batch_first=True,
                                     bidirectional=bidirectional, dtype=torch.float64, **extra)
    candidate.to(TRITON_DEVICE)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, 7, dtype=torch.float64, generator=generator)
    hx = make_state(kind, (2 * (2 if bidirectional else 1), 5), torch.float64, generator, hidden=13)
    lengths = [9, 3, 7, 1, 5] if input_kind == "packed" else None
    expected = forward_backward(reference, x, hx, lengths=lengths, batch_first=True)
    device_hx = tuple(h.to(TRITON_DEVICE) for h in hx) if isinstance(hx, tuple) else hx.to(TRITON_DEVICE)
    with fastrnn.use_backend("triton"), triton_engine.use_strategy(strategy):
        got = forward_backward(candidate, x.to(TRITON_DEVICE), device_hx, lengths=lengths,
                               batch_first=True)
    assert_results_close({k: v.cpu() for k, v in got.items()}, expected, torch.float64)


def test_auto_strategy_by_shape():
    def chosen(cell, B, H, dtype=torch.float32):
        return engine.plan(cell, B, H, dtype, torch.device("cuda")).strategy

    assert chosen("rnn_tanh", 8, 32) == "tile"
    assert chosen("rnn_tanh", 8, 128, torch.bfloat16) == "tile"
    assert chosen("gru", 1, 32) == "tile"
    assert chosen("rnn_tanh", 8, 128) == "split"
    assert chosen("gru", 8, 256) == "split"
    assert chosen("rnn_tanh", 32, 1024) == "split"
    assert chosen("gru", 512, 64) == "stepwise"
    assert chosen("lstm", 8, 32) == "tile"
    assert chosen("lstm", 8, 64) == "split"
    # W_hh (4H, P) and W_hr (P, H) together within the tile's budget, or not
    assert engine.plan("lstm", 8, 32, torch.float32, torch.device("cuda"), projection=16).strategy == "tile"
    assert engine.plan("lstm", 8, 32, torch.float32, torch.device("cuda"), projection=31).strategy == "split"
    # too many batch tiles x column blocks to be co-resident on 132 SMs
    assert chosen("gru", 200, 2048) == "stepwise"
    with triton_engine.use_strategy("tile"), pytest.raises(RuntimeError, match="tile"):
        chosen("gru", 8, 512)
    # the description and its name plan alike
    assert engine.plan(CELL_DESCRIPTIONS["gru"], 8, 256, torch.float32, torch.device("cuda")) == \
        engine.plan("gru", 8, 256, torch.float32, torch.device("cuda"))


@pytest.mark.skipif(not engine._MAXNREG, reason="this Triton has no maxnreg option")
def test_register_bounds():
    """The tile and split kernels tell ptxas their register budget (without
    one it aims lower and spills): a whole SM's 65536 registers over the
    program's threads, at most 255 a thread; the stepwise kernel and the
    float32 tl.dot tile backward compile without spills only unbounded."""
    cuda = torch.device("cuda")

    def bounds(B, H, dtype=torch.float32):
        plan = engine.plan("gru", B, H, dtype, cuda)
        return plan.strategy, {kind: c.get("maxnreg") for kind, (_, c) in plan.launches().items()}

    assert bounds(8, 32) == ("tile", {"forward": 65536 // (32 * 16), "backward": None})
    assert bounds(8, 32, torch.bfloat16) == ("tile", {"forward": 128, "backward": 128})
    assert bounds(8, 512) == ("split", {"forward": 255, "backward": 255})
    assert bounds(512, 64) == ("stepwise", {"forward": None, "backward": None})


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="strategy"):
        with triton_engine.use_strategy("fastest"):
            pass


@pytest.mark.parametrize("kernel", ["tile_fwd_kernel", "tile_bwd_kernel", "split_fwd_kernel", "split_bwd_kernel"])
def test_sequence_length_is_not_specialised(kernel):
    """T (and the step range) are runtime arguments that never trigger a
    recompile: no constexpr, no integer specialisation."""
    import inspect

    import fastrnn.triton.split as split
    import fastrnn.triton.tile as tile

    fn = getattr(tile, kernel, None) or getattr(split, kernel)
    if hasattr(fn, "params"):  # a compiled JITFunction
        unspecialised = {p.name for p in fn.params if p.do_not_specialize}
        constexprs = {p.name for p in fn.params if p.is_constexpr}
    else:  # the interpreter's wrapper keeps the decorator's arguments
        unspecialised = set(fn.kwargs["do_not_specialize"])
        constexprs = {name for name, p in inspect.signature(fn.fn).parameters.items()
                      if "constexpr" in str(p.annotation)}
    runtime = {"T", "step_begin", "step_end"} & set(fn.arg_names)
    assert "T" in runtime
    assert runtime <= unspecialised, runtime - unspecialised
    assert not runtime & constexprs


@needs_cuda
@pytest.mark.parametrize("layer", list(LAYERS))
def test_split_grid_barrier_on_gpu(layer):
    """The persistent split launch with its grid barrier (compiled out under
    the interpreter) over a shape that spreads across many SMs; with a
    projection, two barriers per step."""
    cell, fraction = LAYERS[layer]
    plan = engine.plan(cell, 8, 512, torch.float32, TRITON_DEVICE, projection=int(512 * fraction))
    assert plan.grid_sync
    check_layer("split", layer, 64, 8, 512, True, True, torch.float32)


@needs_cuda
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["RNN_tanh", "GRU", "LSTM", "LSTM_proj"])
def test_split_grid_barrier_stress_on_two_streams(kind):
    """Two persistent split launches at once, on two streams, over long
    sequences: each meets its grid barrier at every one of 4096 steps. Both
    must finish (the timeout turns a hang into a failure) and match cuDNN,
    forward and backward."""
    T, B, H, I = 4096, 64, 256, 32
    torch_cls, fast_cls, extra = ALL_MODULE_KINDS[kind]
    cell = {"GRU": "gru", "RNN_tanh": "rnn_tanh"}.get(kind, "lstm")
    assert engine.plan(cell, B, H, torch.float32, TRITON_DEVICE,
                       projection=extra.get("proj_size", 0)).grid_sync
    reference, fast = make_pair(torch_cls, fast_cls, I, H, **extra)
    reference.to(TRITON_DEVICE)
    fast.to(TRITON_DEVICE)
    generator = torch.Generator().manual_seed(5)
    xs = [torch.randn(T, B, I, generator=generator).to(TRITON_DEVICE).requires_grad_() for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in xs]
    torch.cuda.synchronize()
    results = []
    with fastrnn.use_backend("triton"), triton_engine.use_strategy("split"):
        for stream, x in zip(streams, xs):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                results.append(fast(x))
        torch.cuda.synchronize()
        grads = [torch.autograd.grad(output.sum() + summed(h_n), [x, fast.weight_hh_l0])
                 for x, (output, h_n) in zip(xs, results)]
    for x, (output, h_n), got in zip(xs, results, grads):
        expected_output, expected_h = reference(x)
        expected = torch.autograd.grad(expected_output.sum() + summed(expected_h),
                                       [x, reference.weight_hh_l0])
        # 4096 steps of float32 rounding in two reduction orders: 1e-4.
        for a, b in zip([output, *flatten(h_n), *got],
                        [expected_output, *flatten(expected_h), *expected]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def flatten(states):
    """A module's final states as a list: (h_n, c_n) for an LSTM, [h_n] otherwise."""
    return list(states) if isinstance(states, tuple) else [states]


def summed(states):
    return sum(t.sum() for t in flatten(states))


@needs_cuda
def test_no_recompile_across_sequence_lengths():
    from fastrnn.triton.tile import tile_bwd_kernel, tile_fwd_kernel

    def compiled():
        device = torch.cuda.current_device()
        return [len(kernel.device_caches[device][0]) for kernel in (tile_fwd_kernel, tile_bwd_kernel)]

    check_layer("tile", "rnn_tanh", 5, 3, 13, False, False, torch.float32)
    before = compiled()
    for T in (6, 50, 333):
        check_layer("tile", "rnn_tanh", T, 3, 13, False, False, torch.float32)
    assert compiled() == before


@triton.jit
def tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    tl.store(Y + offsets, tanh(tl.load(X + offsets, mask=mask)), mask=mask)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 5e-7), (torch.float64, 1e-14)],
                         ids=["float32", "float64"])
def test_tanh_accuracy(dtype, rtol):
    """The kernels' tanh (exp form, odd series near 0) to a few ulp of torch.tanh
    in float64, across magnitudes from 1e-8 to saturation, and NaN through."""
    magnitude = torch.logspace(-8, 1.5, 2000, dtype=torch.float64)
    x = torch.cat([magnitude, -magnitude, torch.tensor([0.0, 0.15, 0.015, float("nan")],
                                                       dtype=torch.float64)]).to(dtype)
    x_dev = x.to(TRITON_DEVICE)
    y_dev = torch.empty_like(x_dev)
    tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x_dev, y_dev, x.numel(), BLOCK=1024)
    y = y_dev.cpu()
    expected = torch.tanh(x.double())
    assert torch.isnan(y[-1])
    torch.testing.assert_close(y[:-1].double(), expected[:-1], rtol=rtol, atol=0)


class CountingKernel:
    """Stands in for a Triton kernel, counting its launches."""

    def __init__(self, kernel, name, counts):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return launch(*args, **kwargs)

        return counted


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forced_strategy_reaches_backward(strategy, monkeypatch):
    """Backward runs the strategy forward was called under, even where it
    runs outside the ``with`` block (as autograd's CUDA threads do)."""
    counts = {}
    for name in ("tile_fwd_kernel", "tile_bwd_kernel", "split_fwd_kernel", "split_bwd_kernel"):
        monkeypatch.setattr(engine, name, CountingKernel(getattr(engine, name), name, counts))
    _, gates, nonlinearity = CELLS[2]
    x, h0, w_ih, w_hh, b_ih, b_hh, _ = make_args(gates, 3, 2, 4, 8, bias=True, lengths=None,
                                                 dtype=torch.float32, seed=1)
    args = [t.detach().to(TRITON_DEVICE).requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    with fastrnn.use_backend("triton"), triton_engine.use_strategy(strategy):
        output, h_n = apply_function(nonlinearity, *args, None, False)
    forward = dict(counts)
    torch.autograd.grad(output.sum() + h_n.sum(), args)
    backward = {k: v - forward.get(k, 0) for k, v in counts.items() if v - forward.get(k, 0)}
    kind = "tile" if strategy == "tile" else "split"
    assert set(forward) == {f"{kind}_fwd_kernel"}
    assert set(backward) == {f"{kind}_bwd_kernel"}


def test_split_runs_unsynced_without_a_cooperative_launch(monkeypatch):
    """The grid barrier is only safe under a cooperative launch: without
    one, auto takes stepwise and a forced split launches step by step."""
    monkeypatch.setattr(engine, "_COOPERATIVE_LAUNCH", False)
    cuda = torch.device("cuda")
    assert engine.plan("gru", 8, 256, torch.float32, cuda).strategy == "stepwise"
    forced = engine.plan("gru", 8, 256, torch.float32, cuda, "split")
    assert forced.strategy == "split" and not forced.grid_sync
    assert "launch_cooperative_grid" not in forced.launches()["forward"][1]
    assert "backward_recurrent" in forced.launches()


def test_split_grid_fits_the_mps_share_of_the_sms(monkeypatch):
    cuda = torch.device("cuda")
    full = engine._sm_count(cuda)
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "25")
    assert engine._sm_count(cuda) == full // 4
    # 2 batch tiles x 64 blocks = 128 programs: beyond a quarter of the SMs
    assert engine.plan("rnn_tanh", 32, 1024, torch.float32, cuda).strategy == "stepwise"
    with pytest.raises(RuntimeError, match="split"):
        engine.plan("rnn_tanh", 32, 1024, torch.float32, cuda, "split")


@needs_cuda
@pytest.mark.parametrize("layer", ["rnn_tanh", "gru", "lstm", "lstm_proj"])
def test_split_without_cooperative_launch_on_gpu(layer, monkeypatch):
    monkeypatch.setattr(engine, "_COOPERATIVE_LAUNCH", False)
    check_layer("split", layer, 33, 8, 512, True, True, torch.float32)
