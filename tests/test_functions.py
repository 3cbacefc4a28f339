"""Single-layer, single-direction autograd Functions.

``fastrnn.autograd.LayerFunction`` is checked, per cell, three ways:
numerically with ``torch.autograd.gradcheck``, against the plain PyTorch
layers in ``fastrnn.reference``, and against ``torch.nn.RNN`` / ``torch.nn.GRU``
run one sequence at a time.
"""

import pytest
import torch
import torch.nn as nn

import fastrnn
import fastrnn.autograd
import fastrnn.reference
from conftest import CELL_IDS, CELLS, apply_function, apply_reference, assert_close, device_param, dtype_id, make_args

cell_param = pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
lengths_param = pytest.mark.parametrize("lengths", [None, [2, 4, 1]], ids=["full", "lengths"])
reverse_param = pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
bias_param = pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])


@cell_param
@lengths_param
@reverse_param
@bias_param
@device_param
def test_gradcheck(cell, lengths, reverse, bias, device):
    _, gates, nonlinearity = cell
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t = make_args(
        gates, T=4, B=3, I=3, H=4, bias=bias, lengths=lengths, dtype=torch.float64, seed=7
    )
    x, h0, w_ih, w_hh, b_ih, b_hh = [None if t is None else t.detach().to(device).requires_grad_()
                                     for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def fn(x, h0, w_ih, w_hh, b_ih, b_hh):
        return apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t, reverse)

    # check_undefined_grad (on by default) also covers the case where only one
    # of (output, h_n) receives a gradient.
    assert torch.autograd.gradcheck(fn, (x, h0, w_ih, w_hh, b_ih, b_hh), eps=1e-6, atol=1e-8, rtol=1e-6)


SIZES = [
    # (T, B, I, H, lengths)
    (1, 1, 1, 1, None),
    (6, 4, 5, 3, [6, 2, 5, 1]),
    (9, 5, 7, 13, [3, 9, 1, 7, 5]),
    (11, 3, 2, 8, [11, 11, 4]),
    (5, 6, 9, 4, None),
    # Large enough per step for the engine to split each step across its
    # (two, see two_threads) threads, and per sweep to start them (2^18
    # multiply-adds, kMinParallelWork in csrc/cpu/team.h, at one gate):
    # by hidden units, in blocks of 16 (the last one partial at H=50) ...
    (5, 48, 6, 64, [(7 * b) % 5 + 1 for b in range(48)]),
    (4, 48, 6, 64, None),
    (6, 20, 6, 50, [(5 * b) % 6 + 1 for b in range(20)]),
    # ... and by sequences, from 32 per thread.
    (7, 70, 6, 24, [(3 * b) % 7 + 1 for b in range(70)]),
    (7, 70, 6, 24, None),
]


@pytest.fixture
def two_threads():
    # The engine's split of a step depends on the thread count: fix it.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def size_id(size):
    T, B, I, H, lengths = size
    return f"T{T}_B{B}_I{I}_H{H}" + ("_lengths" if lengths else "")


@cell_param
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@reverse_param
@bias_param
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_matches_reference_layer(cell, size, reverse, bias, dtype, two_threads):
    _, gates, nonlinearity = cell
    T, B, I, H, lengths = size
    args = make_args(gates, T, B, I, H, bias=bias, lengths=lengths, dtype=dtype, seed=11)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t = args
    leaves = [t for t in (x, h0, w_ih, w_hh, b_ih, b_hh) if t is not None]

    generator = torch.Generator().manual_seed(5)
    grad_out = torch.randn(T, B, H, dtype=dtype, generator=generator)
    grad_h = torch.randn(B, H, dtype=dtype, generator=generator)

    results = []
    for fn in (apply_function, apply_reference):
        output, h_n = fn(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t, reverse)
        grads = torch.autograd.grad((output, h_n), leaves, grad_outputs=(grad_out, grad_h))
        results.append((output.detach(), h_n.detach(), grads))

    (out, h_n, grads), (ref_out, ref_h_n, ref_grads) = results
    assert out.shape == (T, B, H) and h_n.shape == (B, H)
    assert out.dtype == dtype and h_n.dtype == dtype
    assert_close(out, ref_out, msg="output")
    assert_close(h_n, ref_h_n, msg="h_n")
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"][: len(leaves)]
    for name, g, ref_g in zip(names, grads, ref_grads):
        assert_close(g, ref_g, msg=f"grad {name}")


@cell_param
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@reverse_param
@bias_param
def test_matches_torch_nn_per_sequence(cell, size, reverse, bias):
    """Each sequence b is processed independently for lengths[b] steps: the
    result equals a single-layer torch.nn module run on that sequence alone
    (time-flipped for ``reverse``)."""
    _, gates, nonlinearity = cell
    T, B, I, H, lengths = size
    dtype = torch.float64
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t = make_args(
        gates, T, B, I, H, bias=bias, lengths=lengths, dtype=dtype, seed=13, requires_grad=False
    )
    with torch.no_grad():
        output, h_n = apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t, reverse)

    if nonlinearity is None:
        module = nn.GRU(I, H, bias=bias, dtype=dtype)
    else:
        module = nn.RNN(I, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype)
    with torch.no_grad():
        module.weight_ih_l0.copy_(w_ih)
        module.weight_hh_l0.copy_(w_hh)
        if bias:
            module.bias_ih_l0.copy_(b_ih)
            module.bias_hh_l0.copy_(b_hh)

    lengths_list = [T] * B if lengths is None else lengths
    for b, length in enumerate(lengths_list):
        seq = x[:length, b]
        if reverse:
            seq = seq.flip(0)
        with torch.no_grad():
            expected_out, expected_h = module(seq, h0[b : b + 1])
        if reverse:
            expected_out = expected_out.flip(0)
        assert_close(output[:length, b], expected_out, msg=f"output of sequence {b}")
        assert_close(h_n[b], expected_h[0], msg=f"h_n of sequence {b}")
        assert torch.count_nonzero(output[length:, b]) == 0, f"padding of sequence {b} is not zero"


@cell_param
@reverse_param
def test_full_lengths_equal_no_lengths(cell, reverse):
    _, gates, nonlinearity = cell
    T, B = 6, 4
    x, h0, w_ih, w_hh, b_ih, b_hh, _ = make_args(
        gates, T, B, 5, 3, bias=True, lengths=None, dtype=torch.float64, seed=17, requires_grad=False
    )
    full = torch.full((B,), T, dtype=torch.int64)
    out_a, h_a = apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, None, reverse)
    out_b, h_b = apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, full, reverse)
    assert_close(out_b, out_a)
    assert_close(h_b, h_a)


@cell_param
def test_inputs_are_not_modified(cell):
    _, gates, nonlinearity = cell
    args = make_args(gates, 5, 3, 4, 6, bias=True, lengths=[5, 2, 4], dtype=torch.float64, seed=19)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t = args
    tensors = [x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t]
    snapshots = [t.detach().clone() for t in tensors]
    output, h_n = apply_function(nonlinearity, x, h0, w_ih, w_hh, b_ih, b_hh, lengths_t, True)
    (output.sum() + h_n.sum()).backward()
    for t, snapshot in zip(tensors, snapshots):
        assert torch.equal(t.detach(), snapshot)


# Every layer both paths run: (cell, projection size or 0).
NODE_LAYERS = [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 2)]


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("cell, proj", NODE_LAYERS, ids=[f"{c}-P{p}" for c, p in NODE_LAYERS])
@lengths_param
@reverse_param
@pytest.mark.parametrize("partial", [False, True], ids=["all_inputs", "some_inputs"])
def test_cpp_node_agrees_with_layer_function(cell, proj, lengths, reverse, partial):
    # In eager mode the C++ engine's op records its own C++ node
    # (csrc/autograd.cpp); torch.compile traces LayerFunction.
    # Both run the same engine ops: outputs, gradients (the engine's sweep)
    # and second derivatives (create_graph, through the reference loop) are
    # the same bits. `some_inputs`: x and the states need no gradient, no
    # biases, and only the output gets one.
    description = fastrnn.cells.CELLS[cell]
    T, B, I, H = 4, 3, 3, 4
    K, G = proj or H, description.gates * H
    generator = torch.Generator().manual_seed(23)

    def rand(*shape, grad=True):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator) * 0.5
        return t.requires_grad_(grad)

    x, w_ih, w_hh = rand(T, B, I, grad=not partial), rand(G, I), rand(G, K)
    b_ih, b_hh = (None, None) if partial else (rand(G), rand(G))
    w_hr = rand(proj, H) if proj else None
    hx = (rand(B, K, grad=not partial),) + tuple(rand(B, H, grad=not partial)
                                                 for _ in description.states[1:])
    lengths_t = None if lengths is None else torch.tensor(lengths)
    leaves = [t for t in (x, w_ih, w_hh, b_ih, b_hh, w_hr, *hx) if t is not None and t.requires_grad]
    upstream = [torch.randn(T, B, K, dtype=torch.float64, generator=generator)]
    if not partial:
        upstream += [torch.randn(h.shape, dtype=torch.float64, generator=generator) for h in hx]

    def node():
        return fastrnn.autograd.layer(cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths_t, reverse,
                                      "cpp", w_hr)

    def function():
        output, _, *h_n = fastrnn.autograd.LayerFunction.apply(
            cell, fastrnn.autograd.family("cpp", x.device), "auto", x, w_ih, w_hh, b_ih, b_hh,
            w_hr, lengths_t, reverse, *hx)
        return output, tuple(h_n)

    results = []
    for run in (node, function):
        output, h_n = run()
        outputs = (output, *h_n)[:len(upstream)]
        first = torch.autograd.grad(outputs, leaves, upstream, retain_graph=True)
        grads = torch.autograd.grad(outputs, leaves, upstream, create_graph=True)
        # A second derivative: of a function of the first-order gradients.
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
        results.append((type(output.grad_fn).__name__, [output, *h_n], first, grads, second))
    (node_type, *node_results), (function_type, *function_results) = results
    assert node_type != function_type == "LayerFunctionBackward"
    for got, expected in zip(node_results, function_results):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("module", ["GRU", "LSTMCell"])
def test_cpp_node_behaves_as_torch_nn_graphs(module):
    # The C++ node is a hand-written autograd Node: what users do with a
    # graph behaves as with torch.nn's. Gradients for some leaves only,
    # saved-tensor hooks, a second backward without retain_graph, an input
    # changed in place after the forward.
    torch.manual_seed(5)
    reference = getattr(nn, module)(3, 4, dtype=torch.float64)
    model = getattr(fastrnn, module)(3, 4, dtype=torch.float64)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(*(() if module.endswith("Cell") else (5,)), 2, 3, dtype=torch.float64)

    def loss_of(m, x):
        result = m(x)
        return sum(t.square().sum() for t in torch.utils._pytree.tree_leaves(result))

    def failure(fn):
        with pytest.raises(RuntimeError) as error:
            fn()
        return str(error.value).split(".")[0]

    expected_failures, got_failures = [], []
    for m, failures in ((reference, expected_failures), (model, got_failures)):
        leaf = x.clone().requires_grad_()
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
            loss = loss_of(m, leaf)
        assert packed
        weight = m.weight_hh_l0 if hasattr(m, "weight_hh_l0") else m.weight_hh
        subset = torch.autograd.grad(loss, [weight, leaf])
        failures.append(failure(lambda: torch.autograd.grad(loss, [weight])))
        failures.append(subset)
        leaf = x.clone().requires_grad_()
        loss = loss_of(m, leaf)
        with torch.no_grad():
            leaf.mul_(2)
        failures.append(failure(loss.backward))
    assert got_failures[0] == expected_failures[0]
    assert got_failures[2] == expected_failures[2]
    for a, b in zip(got_failures[1], expected_failures[1]):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("module, kwargs", [
    ("RNN", {}), ("RNN", {"nonlinearity": "relu", "num_layers": 2}), ("GRU", {}),
    ("GRU", {"batch_first": True}), ("LSTM", {}), ("LSTM", {"proj_size": 3}),
])
def test_output_changed_in_place_before_backward(module, kwargs, dtype):
    # torch.nn's CPU layers let the output be changed in place before
    # backward (a residual +=, ReLU(inplace=True)); the engine's backward
    # reads the output, so its node runs forward again where the output
    # changed. Gradients as torch.nn's in float64 (whose float32 LSTM, on
    # oneDNN, raises here).
    torch.manual_seed(6)
    reference = getattr(nn, module)(3, 4, dtype=torch.float64, **kwargs)
    model = getattr(fastrnn, module)(3, 4, dtype=dtype, **kwargs)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    residual = torch.randn(5, 2, kwargs.get("proj_size", 4), dtype=torch.float64)

    def gradients(m):
        leaf = x.to(m.weight_hh_l0.dtype).requires_grad_()
        out, _ = m(leaf)
        out += residual.to(out.dtype)
        out.mul_(2)
        out = nn.ReLU(inplace=True)(out)
        out.double().square().sum().backward()
        return [leaf.grad] + [p.grad for p in m.parameters()]

    for got, expected in zip(gradients(model), gradients(reference)):
        assert_close(got.double(), expected, dtype=dtype)


FORWARD_AD_MODULES = [("GRU", {}), ("LSTM", {"proj_size": 3}), ("RNNCell", {}), ("LSTMCell", {})]


@pytest.mark.parametrize("module, kwargs", FORWARD_AD_MODULES, ids=[m for m, _ in FORWARD_AD_MODULES])
def test_forward_mode_ad_matches_torch_nn(module, kwargs):
    # Forward-mode AD (torch.autograd.forward_ad): the tangents of every
    # output, for tangents on the input and on a weight, are torch.nn's. The
    # engines' ops have no forward-mode formula; inputs with tangents take
    # the reference loop, and the op itself refuses them rather than drop them.
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(11)
    reference = getattr(nn, module)(3, 4, dtype=torch.float64, **kwargs)
    model = getattr(fastrnn, module)(3, 4, dtype=torch.float64, **kwargs)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(*(() if module.endswith("Cell") else (5,)), 2, 3, dtype=torch.float64)
    x_tangent, w_tangent = torch.randn_like(x), torch.randn_like(reference.weight_hh_l0 if hasattr(
        reference, "weight_hh_l0") else reference.weight_hh)

    def tangents(m):
        name = "weight_hh_l0" if hasattr(m, "weight_hh_l0") else "weight_hh"
        with fwAD.dual_level():
            weight = fwAD.make_dual(getattr(m, name).detach(), w_tangent)
            out = torch.func.functional_call(m, {name: weight}, (fwAD.make_dual(x, x_tangent),))
            return [fwAD.unpack_dual(t).tangent for t in torch.utils._pytree.tree_leaves(out)]

    expected, got = tangents(reference), tangents(model)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a is not None
        assert_close(a, b)


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
def test_layer_op_refuses_tangents():
    import torch.autograd.forward_ad as fwAD

    x, h = torch.randn(5, 2, 3), torch.zeros(2, 4)
    w_ih, w_hh = torch.randn(4, 3), torch.randn(4, 4)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD formula"):
        torch.ops.fastrnn.layer_forward("rnn_tanh", fwAD.make_dual(x, torch.randn_like(x)), [h],
                                        w_ih, w_hh, None, None, None, None, False, False, "auto")


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("module", ["GRU", "GRUCell"])
def test_torch_function_modes_see_the_layer_op(grad, module):
    # Eager CPU layers (and cells' steps) call the op through the
    # extension's unboxed entry points, which __torch_function__ would not
    # see: under a mode (or with a tensor subclass that overrides it) they go
    # through torch.ops instead.
    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.called = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.called.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(3)
    model = getattr(fastrnn, module)(3, 4, dtype=torch.float64)
    x = torch.randn(*(() if module == "GRUCell" else (5,)), 2, 3, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        expected = model(x)
        with Recorder() as recorder:
            got = model(x)
    assert torch.ops.fastrnn.layer_forward.default in recorder.called
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


STEP_CELLS = [("rnn_tanh", nn.RNNCell, {}), ("rnn_relu", nn.RNNCell, {"nonlinearity": "relu"}),
              ("gru", nn.GRUCell, {}), ("lstm", nn.LSTMCell, {})]


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("cell, torch_cls, kwargs", STEP_CELLS, ids=[c for c, _, _ in STEP_CELLS])
@pytest.mark.parametrize("grad", ["none", "weights_only", "all"])
def test_cell_step_in_one_call(monkeypatch, cell, torch_cls, kwargs, grad):
    # In eager mode a cell's step is one call into the extension
    # (fastrnn._C.plain_step): its states and gradients are the same bits as
    # the general path's (a layer over a length-1 sequence), and torch.nn's.
    calls = []
    step = fastrnn.cpp.plain_step
    monkeypatch.setattr(fastrnn.cpp, "plain_step", lambda *args: calls.append(1) or step(*args))
    generator = torch.Generator().manual_seed(31)
    B, I, H = 3, 5, 4
    reference = torch_cls(I, H, dtype=torch.float64, **kwargs)
    weights = [p.detach().clone().requires_grad_(grad != "none") for p in reference.parameters()]
    x = torch.randn(B, I, dtype=torch.float64, generator=generator).requires_grad_(grad == "all")
    hx = tuple(torch.randn(B, H, dtype=torch.float64, generator=generator).requires_grad_(grad == "all")
               for _ in fastrnn.cells.CELLS[cell].states)
    leaves = [t for t in (x, *hx, *weights) if t.requires_grad]

    def general():
        return fastrnn.functional.layer(cell, x.unsqueeze(0), hx, *weights)[1]

    def one_call():
        return fastrnn.functional.step(cell, x, hx, *weights)

    results = []
    for run in (general, one_call):
        states = run()
        upstream = [torch.ones_like(h) for h in states]
        grads = torch.autograd.grad(states, leaves, upstream) if leaves else ()
        results.append((states, grads))
    assert calls == [1]  # the general path does not call it
    (states, grads), (one_states, one_grads) = results
    for a, b in zip((*one_states, *one_grads), (*states, *grads)):
        assert torch.equal(a, b)
    expected = reference(x, hx if cell == "lstm" else hx[0])
    for a, b in zip(one_states, expected if cell == "lstm" else (expected,)):
        assert_close(a, b)



class _Subclass(torch.Tensor):
    pass


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_plain_step_declines_every_other_call():
    # fastrnn._C.plain_step runs the plain call of a cell module (batched,
    # with its states, plain CPU tensors sized as the weights expect) and
    # returns None, raising nothing, for any other: the module's own checks,
    # torch.nn's, then run.
    B, I, H = 3, 5, 4
    generator = torch.Generator().manual_seed(5)
    x, h, c = (torch.randn(B, n, dtype=torch.float64, generator=generator) for n in (I, H, H))
    w_ih, w_hh, b_ih, b_hh = (torch.randn(*shape, dtype=torch.float64, generator=generator)
                              for shape in ((H, I), (H, H), (H,), (H,)))
    strategy = fastrnn.settings.settings.triton_strategy

    def plain(cell="rnn_tanh", x=x, hx=(h,), w_ih=nn.Parameter(w_ih), w_hh=w_hh, b_ih=b_ih,
              b_hh=b_hh):
        return fastrnn.cpp.plain_step(cell, x, hx, w_ih, w_hh, b_ih, b_hh, strategy)

    h1, = plain()
    assert_close(h1, torch._VF.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh))
    h1, c1 = plain("lstm", hx=(h, c), w_ih=torch.randn(4 * H, I, dtype=torch.float64),
                   w_hh=torch.randn(4 * H, H, dtype=torch.float64), b_ih=None, b_hh=None)
    assert h1.shape == c1.shape == (B, H)
    others = {
        "unknown cell": dict(cell="rnn_gelu"),
        "too few states": dict(cell="lstm", hx=(h,)),
        "too many states": dict(hx=(h, h)),
        "states in a list": dict(hx=[h]),
        "states not a sequence": dict(hx=h),
        "unbatched input": dict(x=x[0], hx=(h[0],)),
        "3-D input": dict(x=x.unsqueeze(0)),
        "input size": dict(x=x[:, :-1]),
        "state batch": dict(hx=(h[:-1],)),
        "state size": dict(hx=(h[:, :-1],)),
        "1-D state": dict(hx=(h[0],)),
        "1-D weight": dict(w_ih=w_ih.flatten()),
        "float16 input": dict(x=x.half()),
        "bfloat16 input": dict(x=x.bfloat16()),
        "meta input": dict(x=x.to("meta")),
        "meta state": dict(hx=(h.to("meta"),)),
        "meta weight": dict(w_hh=w_hh.to("meta")),
        "meta bias": dict(b_hh=b_hh.to("meta")),
        "tensor subclass": dict(x=x.as_subclass(_Subclass)),
        "subclass state": dict(hx=(h.as_subclass(_Subclass),)),
        "not a tensor": dict(x=x.numpy()),
        "nested input": dict(x=torch.nested.nested_tensor([x[0], x[1, :-1]])),
        "sparse weight": dict(w_hh=w_hh.to_sparse()),
        "weight None": dict(w_hh=None),
        "bias not a tensor": dict(b_ih=[0.0] * H),
        "unknown cell, no states": dict(cell="rnn_gelu", hx=()),
    }
    for what, args in others.items():
        assert plain(**args) is None, what


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_plain_states_declines_every_other_call(batch_first):
    # fastrnn.functional.plain_states takes a recurrent module's plain call
    # (a batched input of the weights' dtype and input_size features, states
    # of (layers, B, width), plain CPU tensors) and returns None, raising
    # nothing, for any other: torch.nn's checks then run in the module.
    T, B, I, H, P, layers = 2, 3, 5, 4, 2, 2
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    h, c = torch.randn(layers, B, P), torch.randn(layers, B, H)
    weights = [nn.Parameter(torch.randn(4 * H, I)), nn.Parameter(torch.randn(4 * H, P)),
               torch.randn(4 * H), torch.randn(4 * H), torch.randn(P, H)]

    def plain(x=x, hx=(h, c), weights=weights, input_size=I, h_size=P, c_size=H):
        return fastrnn.functional.plain_states(x, hx, weights, input_size, layers, h_size, c_size,
                                               batch_first)

    states = plain()
    assert type(states) is tuple and len(states) == 2
    assert states[0] is h and states[1] is c
    one, = plain(hx=c, h_size=H, c_size=0)
    assert one is c
    # No states: zeros, as torch.nn makes them.
    for got, width in zip(plain(hx=None), (P, H)):
        assert torch.equal(got, torch.zeros(layers, B, width))
    one, = plain(hx=None, x=x.double(), weights=[w if w is None else w.double() for w in weights],
                 h_size=H, c_size=0)
    assert one.dtype == torch.float64 and torch.equal(one, torch.zeros(layers, B, H).double())
    time_dim = 1 if batch_first else 0
    others = {
        "states in a list": dict(hx=[h, c]),
        "one state of two": dict(hx=(h,)),
        "a tuple for one state": dict(hx=(c,), h_size=H, c_size=0),
        "state widths swapped": dict(h_size=H, c_size=P),
        "state layers": dict(hx=(h[:1], c[:1])),
        "state batch": dict(hx=(h[:, :-1], c[:, :-1])),
        "2-D state": dict(hx=(h[0], c)),
        "unbatched input": dict(x=x[0]),
        "empty sequence": dict(x=x.narrow(time_dim, 0, 0)),
        "input size": dict(input_size=I + 1),
        "input dtype": dict(x=x.double()),
        "float16": dict(x=x.half(), weights=[w if w is None else w.half() for w in weights]),
        "packed input": dict(x=nn.utils.rnn.pack_sequence([torch.randn(2, I)])),
        "meta input": dict(x=x.to("meta")),
        "meta state": dict(hx=(h, c.to("meta"))),
        "meta weight": dict(weights=weights[:4] + [weights[4].to("meta")]),
        "tensor subclass": dict(x=x.as_subclass(_Subclass)),
        "nested input": dict(x=torch.nested.nested_tensor([x[0], x[1, :-1]])),
        "weights in a tuple": dict(weights=tuple(weights)),
        "no weights": dict(weights=[]),
        "first weight None": dict(weights=[None] + weights[1:]),
        "a bias None": dict(weights=weights[:2] + [None] + weights[3:]),  # set so by hand
        "weight not a tensor": dict(weights=weights[:1] + ["w"] + weights[2:]),
    }
    for what, args in others.items():
        assert plain(**args) is None, what
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain() is None  # autocast changes torch.nn's dtype check


LAYER_STACKS = [("RNN_TANH", 1, False, 0, True), ("GRU", 2, True, 0, True),
                ("LSTM", 2, True, 3, True), ("LSTM", 3, False, 0, False),
                ("RNN_RELU", 2, True, 0, False)]
LAYER_STACK_IDS = [f"{mode}-{layers}{'-bi' if bi else ''}{'-proj' if proj else ''}"
                   f"{'' if bias else '-nobias'}" for mode, layers, bi, proj, bias in LAYER_STACKS]


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.parametrize("mode, layers, bidirectional, proj_size, bias", LAYER_STACKS,
                         ids=LAYER_STACK_IDS)
def test_plain_layers_match_the_layer_loop(monkeypatch, mode, layers, bidirectional, proj_size,
                                           bias):
    # In eager mode on the CPU a stack of layers without dropout or lengths
    # is one call into the extension (fastrnn._C.plain_layers): the same
    # bits, forward and every gradient, as recurrent_layers' own loop of
    # layer calls, which other calls still take.
    T, B, I, H = 3, 2, 5, 4
    module = {"RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM}[mode]
    kwargs = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    if proj_size:
        kwargs["proj_size"] = proj_size
    reference = module(I, H, layers, bias=bias, bidirectional=bidirectional, dtype=torch.float64,
                       **kwargs)
    weights = [w.detach().clone().requires_grad_() for w in reference._flat_weights]
    generator = torch.Generator().manual_seed(7)
    directions = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64, generator=generator).requires_grad_()
    widths = (proj_size or H, H) if mode == "LSTM" else (H,)
    hx = tuple(torch.randn(layers * directions, B, width, dtype=torch.float64,
                           generator=generator).requires_grad_() for width in widths)
    calls = []
    plain = fastrnn.cpp.plain_layers
    monkeypatch.setattr(fastrnn.cpp, "plain_layers", lambda *args: calls.append(1) or plain(*args))

    def run():
        output, finals = fastrnn.functional.recurrent_layers(
            mode, x, hx, weights, layers, bidirectional, proj_size=proj_size)
        draw = torch.Generator().manual_seed(11)  # the same upstream gradients each run
        upstream = [torch.randn(t.shape, dtype=t.dtype, generator=draw)
                    for t in (output, *finals)]
        grads = torch.autograd.grad((output, *finals), (x, *hx, *weights), upstream)
        return (output, *finals, *grads)

    one_call = run()
    assert calls == [1]
    with monkeypatch.context() as patched:
        patched.setattr(fastrnn.cpp, "plain_layers", lambda *args: None)
        loop = run()
    for a, b in zip(one_call, loop):
        assert torch.equal(a, b)
    output, finals = reference(x, hx if mode == "LSTM" else hx[0])
    assert_close(one_call[0], output)


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_plain_layers_declines_every_other_call():
    T, B, I, H = 2, 3, 5, 4
    x, h = torch.randn(T, B, I), torch.randn(1, B, H)
    weights = [torch.randn(H, I), torch.randn(H, H), torch.randn(H), None]
    strategy = fastrnn.settings.settings.triton_strategy

    def plain(cell="rnn_tanh", x=x, hx=(h,), weights=weights, layers=1, bidirectional=False,
              projects=False):
        return fastrnn.cpp.plain_layers(cell, x, hx, weights, layers, bidirectional, projects,
                                        strategy)

    output, (h_n,) = plain()
    assert output.shape == (T, B, H) and h_n.shape == (1, B, H)
    others = {
        "unknown cell": dict(cell="rnn_gelu"),
        "state count": dict(cell="lstm"),
        "states in a list": dict(hx=[h]),
        "a state, not a tuple": dict(hx=h),
        "state layers": dict(layers=2),
        "2-D state": dict(hx=(h[0],)),
        "weights per layer": dict(weights=weights[:3]),
        "projection without its weight": dict(projects=True),
        "weight None": dict(weights=[weights[0], None, *weights[2:]]),
        "weight not a tensor": dict(weights=[weights[0], "w", *weights[2:]]),
        "weights in a generator": dict(weights=iter(weights)),
        "float16 input": dict(x=x.half()),
        "meta input": dict(x=x.to("meta")),
        "meta state": dict(hx=(h.to("meta"),)),
        "meta weight": dict(weights=[weights[0].to("meta"), *weights[1:]]),
        "tensor subclass": dict(x=x.as_subclass(_Subclass)),
        "nested input": dict(x=torch.nested.nested_tensor([x[0], x[1, :-1]])),
        "unknown cell, no states": dict(cell="rnn_gelu", hx=()),
        "no layers": dict(layers=0),
    }
    for what, args in others.items():
        assert plain(**args) is None, what


class _CheckedGRU(fastrnn.GRU):
    def check_forward_args(self, input, hidden, batch_sizes):
        raise RuntimeError("a subclass's own check")


class _RemappedLSTM(fastrnn.LSTM):
    def permute_hidden(self, hx, permutation):
        return tuple(2 * h for h in hx)


class _RemappedLSTMAgain(_RemappedLSTM):
    pass


def test_subclass_overriding_a_check_has_every_call_checked():
    # A plain call skips torch.nn's check methods (one pass in the extension)
    # only where the module's class overrides none of them, as torch.nn's
    # subclasses may: their forward calls them on every call.
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="a subclass's own check"):
        _CheckedGRU(4, 5)(x, torch.zeros(1, 2, 5))
    hx = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    for cls in (_RemappedLSTM, _RemappedLSTMAgain):
        module = cls(4, 5)
        reference = nn.LSTM(4, 5)
        reference.load_state_dict(module.state_dict())
        output, _ = module(x, hx)
        assert_close(output, reference(x, tuple(2 * h for h in hx))[0])
    assert fastrnn.LSTM._checks_in_one_pass and fastrnn.GRU._checks_in_one_pass


@pytest.mark.skipif(not fastrnn.cpp.available(), reason="needs the C++ engine")
def test_forward_runs_again_only_for_an_output_changed_in_place():
    # The recomputation costs a forward: backward runs it only where the
    # output's version moved since forward.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountForwards(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fastrnn.layer_forward.default:
                CountForwards.count += 1
            return func(*args, **(kwargs or {}))

    model = fastrnn.GRU(3, 4, dtype=torch.float64)
    for change in (False, True):
        out, _ = model(torch.randn(5, 2, 3, dtype=torch.float64))
        if change:
            out.mul_(2)
        CountForwards.count = 0
        with CountForwards():
            out.sum().backward()
        assert CountForwards.count == int(change)
