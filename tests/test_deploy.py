"""Deploying a model with fastrnn layers as one with torch.nn layers deploys.

ONNX (both exporters, run in onnxruntime), torch.export with a saved program
loaded in a fresh process, AOTInductor, TorchScript tracing (and scripting's
error), and ``fastrnn.unconvert`` back to torch.nn's classes.
"""

import collections
import io
import re
import subprocess
import sys
import textwrap
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import fastrnn
from conftest import flatten_outputs, make_pair


INPUT, HIDDEN = 5, 6
# (torch.nn class name, constructor keywords): every cell, multi-layer,
# bidirectional, batch_first, projections.
CASES = [
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu", "num_layers": 2, "batch_first": True}),
    ("GRU", {"num_layers": 2, "bidirectional": True}),
    ("GRU", {"batch_first": True}),
    ("LSTM", {}),
    ("LSTM", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("LSTM", {"proj_size": 3}),
    ("RNNCell", {}),
    ("GRUCell", {}),
    ("LSTMCell", {}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in kwargs.items()) for name, kwargs in CASES]


class Deployed(nn.Module):
    """A model around one layer: inputs (x, *initial states), outputs flat."""

    def __init__(self, layer: nn.Module, lstm: bool):
        super().__init__()
        self.layer, self.lstm = layer, lstm

    def forward(self, x, h=None, c=None):
        if h is None:
            return tuple(flatten_outputs(self.layer(x)))
        return tuple(flatten_outputs(self.layer(x, (h, c) if self.lstm else h)))


def _pair(name, kwargs):
    torch_layer, fast_layer = make_pair(getattr(nn, name), getattr(fastrnn, name), INPUT, HIDDEN,
                                        **kwargs)
    lstm = name.startswith("LSTM")
    return Deployed(torch_layer, lstm).eval(), Deployed(fast_layer, lstm).eval()


def _inputs(name, kwargs, batch, steps, with_state, seed=0):
    """(x, *initial states) and, per input, the dimension that holds the batch (and time)."""
    generator = torch.Generator().manual_seed(seed)
    cell = name.endswith("Cell")
    batch_first = kwargs.get("batch_first", False)
    if cell:
        x, dims = torch.randn(batch, INPUT, generator=generator), [{0: "batch"}]
    elif batch_first:
        x, dims = torch.randn(batch, steps, INPUT, generator=generator), [{0: "batch", 1: "time"}]
    else:
        x, dims = torch.randn(steps, batch, INPUT, generator=generator), [{1: "batch", 0: "time"}]
    if not with_state:
        return (x,), dims
    leading = (batch,) if cell else (
        kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1), batch)
    widths = [HIDDEN]
    if name.startswith("LSTM"):
        widths = [kwargs.get("proj_size", 0) or HIDDEN, HIDDEN]
    states = tuple(torch.randn(*leading, width, generator=generator) for width in widths)
    return (x, *states), dims + [{len(leading) - 1: "batch"}] * len(states)


def _export_onnx(model, inputs, dims, exporter):
    """The exported ONNX model, or the exception the export raised.

    ``dynamo`` (the default exporter) marks the batch dynamic: torch 2.13's
    export of torch.nn's GRU and LSTM with a dynamic length runs in
    onnxruntime only at the traced length. ``legacy`` marks batch and time.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                batch_only = [{d: n for d, n in dim.items() if n == "batch"} for dim in dims]
                shapes = [{d: torch.export.Dim.AUTO for d in dim} for dim in batch_only]
                return torch.onnx.export(model, inputs, dynamo=True, verbose=False,
                                         dynamic_shapes=tuple(shapes)).model_proto
            names = [f"input_{i}" for i in range(len(inputs))]
            buffer = io.BytesIO()
            torch.onnx.export(model, inputs, buffer, dynamo=False, input_names=names,
                              dynamic_axes=dict(zip(names, dims)))
            return onnx.load_from_string(buffer.getvalue())
        except Exception as error:  # noqa: BLE001: compared with torch.nn's below
            return error


def _run_onnx(proto, inputs):
    session = ort.InferenceSession(proto.SerializeToString())
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_onnx_export_is_torch_nn_export(name, kwargs, exporter, with_state):
    """The same ONNX operators as torch.nn's export, run in onnxruntime on other sizes."""
    torch_model, fast_model = _pair(name, kwargs)
    inputs, dims = _inputs(name, kwargs, batch=3, steps=7, with_state=with_state)
    expected = _export_onnx(torch_model, inputs, dims, exporter)
    got = _export_onnx(fast_model, inputs, dims, exporter)
    if isinstance(expected, Exception):
        # torch.nn's export fails here (the legacy exporter has no LSTM
        # projection): fastrnn's fails the same way.
        assert type(got) is type(expected) and str(got) == str(expected)
        return
    assert not isinstance(got, Exception), got
    ops = collections.Counter(node.op_type for node in got.graph.node)
    assert ops == collections.Counter(node.op_type for node in expected.graph.node)
    if name in ("GRU", "LSTM") or (name == "RNN" and exporter == "legacy"):
        # A recurrent operator per layer, not the time loop unrolled (torch
        # 2.13's default exporter unrolls torch.nn's RNN, and fastrnn's alike).
        assert ops[name] == kwargs.get("num_layers", 1)
    other = _inputs(name, kwargs, batch=4, steps=7 if exporter == "dynamo" else 11,
                    with_state=with_state, seed=1)[0]
    try:
        _run_onnx(expected, other)
    except ort.capi.onnxruntime_pybind11_state.Fail as error:
        # torch.nn's model does not run (torch 2.13 exports an LSTM with a
        # projection as an ONNX LSTM of the projection's width): nor does fastrnn's.
        with pytest.raises(type(error), match=re.escape(str(error).split("Status Message: ")[-1])):
            _run_onnx(got, other)
        return
    with torch.no_grad():
        reference = torch_model(*other)
    outputs = _run_onnx(got, other)
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _fresh_process(code: str, *args: str) -> None:
    """Runs ``code`` in a new interpreter (no state from this one)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


# Models for the torch.export and TorchScript paths: a stack with a
# projection and both directions, a GRU, and a cell.
PROGRAM_CASES = [("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 3}),
                 ("GRU", {"batch_first": True}), ("GRUCell", {})]


def _dynamic_shapes(dims):
    # min=2: a size-1 example would let the exporter specialise on it.
    names = {}
    return tuple({d: names.setdefault(n, torch.export.Dim(n, min=2)) for d, n in dim.items()}
                 for dim in dims)


def _program_cases(with_state):
    for name, kwargs in PROGRAM_CASES:
        torch_model, fast_model = _pair(name, kwargs)
        inputs, dims = _inputs(name, kwargs, batch=3, steps=7, with_state=with_state)
        other = _inputs(name, kwargs, batch=5, steps=12, with_state=with_state, seed=1)[0]
        with torch.no_grad():
            expected = torch_model(*other)
        yield fast_model, inputs, dims, other, expected


def _program_ops(graph_module) -> set:
    """The ops a program calls, in its nested graphs (a strict export's higher-order ops) too."""
    return {str(node.target) for module in graph_module.modules()
            if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function"}


def test_torch_export_saves_and_loads_in_a_fresh_process(tmp_path):
    """fastrnn's ops stay in the program (its kernels run), dynamic in batch and length."""
    cases = []
    for index, (model, inputs, dims, other, expected) in enumerate(_program_cases(True)):
        program = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(dims))
        assert any(op.startswith("fastrnn.") for op in _program_ops(program.graph_module))
        torch.export.save(program, tmp_path / f"{index}.pt2")
        cases.append((other, expected))
    torch.save([other for other, _ in cases], tmp_path / "inputs.pt")
    _fresh_process("""
        import sys, torch
        import fastrnn  # registers the ops the saved programs call
        folder = sys.argv[1]
        outputs = [torch.export.load(f"{folder}/{index}.pt2").module()(*inputs)
                   for index, inputs in enumerate(torch.load(f"{folder}/inputs.pt"))]
        torch.save(outputs, f"{folder}/outputs.pt")
    """, str(tmp_path))
    for outputs, (_, expected) in zip(torch.load(tmp_path / "outputs.pt"), cases):
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)


def test_strict_torch_export_keeps_fastrnn_ops_and_onnx_strict_capture_does_not():
    """torch.onnx.export falls back to a strict (torch.compile) capture where
    the non-strict one fails, as for fastrnn's stack with a dynamic length:
    there too the layers export as torch.nn's. A strict torch.export keeps
    fastrnn's ops."""
    name, kwargs = "GRU", {"num_layers": 2, "bidirectional": True}
    torch_model, fast_model = _pair(name, kwargs)
    inputs, dims = _inputs(name, kwargs, batch=3, steps=7, with_state=False)
    program = torch.export.export(fast_model, inputs, dynamic_shapes=_dynamic_shapes(dims),
                                  strict=True)
    assert any(op.startswith("fastrnn.") for op in _program_ops(program.graph_module))
    protos = []
    for model in (torch_model, fast_model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            protos.append(torch.onnx.export(model, inputs, dynamo=True, verbose=False,
                                            dynamic_shapes=_dynamic_shapes(dims)).model_proto)
    # The same recurrent operators (the shape arithmetic around them differs
    # with the capture: torch.nn's graph is captured without torch.compile).
    ops = [collections.Counter(node.op_type for node in proto.graph.node) for proto in protos]
    assert ops[1]["GRU"] == ops[0]["GRU"] == 2
    assert not any(node.domain.startswith("fastrnn") for node in protos[1].graph.node)


def test_aot_inductor_package_runs_in_a_fresh_process(tmp_path):
    model, inputs, dims, other, expected = next(_program_cases(False))
    program = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(dims))
    package = torch._inductor.aoti_compile_and_package(program,
                                                       package_path=str(tmp_path / "model.pt2"))
    torch.save(other, tmp_path / "inputs.pt")
    _fresh_process("""
        import sys, torch
        import fastrnn  # the package calls fastrnn's ops
        package, folder = sys.argv[1:]
        runner = torch._inductor.aoti_load_package(package)
        torch.save(runner(*torch.load(f"{folder}/inputs.pt")), f"{folder}/outputs.pt")
    """, package, str(tmp_path))
    torch.testing.assert_close(tuple(torch.load(tmp_path / "outputs.pt")), expected,
                               rtol=1e-5, atol=1e-5)


def test_jit_trace_records_torch_nn_ops_for_any_batch_and_length(tmp_path):
    """A traced model holds torch.nn's ops: it runs on other sizes, and without fastrnn."""
    cases = []
    for index, (model, inputs, _, other, expected) in enumerate(_program_cases(True)):
        traced = torch.jit.trace(model, inputs)
        kinds = {node.kind() for node in traced.inlined_graph.nodes()}
        assert not any(kind.startswith("fastrnn::") for kind in kinds)
        # The layers' own ATen ops (torch.nn's cells trace as their pointwise parts).
        recurrent = {"LSTM": "aten::lstm", "GRU": "aten::gru"}.get(PROGRAM_CASES[index][0])
        assert recurrent is None or recurrent in kinds, kinds
        torch.testing.assert_close(traced(*other), expected, rtol=1e-5, atol=1e-5)
        traced.save(str(tmp_path / f"{index}.pt"))
        cases.append((other, expected))
    torch.save([other for other, _ in cases], tmp_path / "inputs.pt")
    _fresh_process("""
        import sys, torch
        folder = sys.argv[1]
        outputs = [torch.jit.load(f"{folder}/{index}.pt")(*inputs)
                   for index, inputs in enumerate(torch.load(f"{folder}/inputs.pt"))]
        assert "fastrnn" not in sys.modules
        torch.save(outputs, f"{folder}/outputs.pt")
    """, str(tmp_path))
    for outputs, (_, expected) in zip(torch.load(tmp_path / "outputs.pt"), cases):
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell"])
def test_jit_script_fails_naming_what_to_use_instead(name):
    model = nn.Sequential(getattr(fastrnn, name)(INPUT, HIDDEN))
    with pytest.raises(RuntimeError, match=rf"fastrnn\.{name} cannot be compiled by "
                                           r"torch\.jit\.script.*torch\.export\.export.*"
                                           r"torch\.jit\.trace"):
        torch.jit.script(model)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(INPUT, HIDDEN, num_layers=2)
        self.cell = nn.LSTMCell(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x):
        output, _ = self.gru(x)
        h, _ = self.cell(output[-1])
        return self.head(h)


def test_unconvert_is_the_inverse_of_convert():
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(7, 3, INPUT)
    expected = model(x)
    params = dict(model.named_parameters())
    fastrnn.convert(model)
    assert type(model.gru) is fastrnn.GRU and type(model.cell) is fastrnn.LSTMCell
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert fastrnn.unconvert(model) is model
    assert type(model.gru) is nn.GRU and type(model.cell) is nn.LSTMCell
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert type(fastrnn.unconvert(fastrnn.LSTM(3, 4))) is nn.LSTM


@pytest.mark.skipif(not hasattr(torch.ao.quantization, "quantize_dynamic"),
                    reason="this torch has no torch.ao.quantization.quantize_dynamic")
def test_dynamic_quantization_after_unconvert():
    torch.manual_seed(0)
    model = fastrnn.convert(_Model()).eval()
    x = torch.randn(7, 3, INPUT)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation
        quantized = torch.ao.quantization.quantize_dynamic(fastrnn.unconvert(model),
                                                           {nn.GRU, nn.LSTMCell, nn.Linear},
                                                           dtype=torch.qint8)
    assert type(quantized.gru).__module__.startswith("torch.ao.nn.quantized.dynamic")
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), expected, rtol=0, atol=5e-2)
