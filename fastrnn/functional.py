"""Layer functions: run one layer on the engine the backend picks, or stack them.

Data flows one way: modules -> ``recurrent_layers`` (a cell: ``step``) ->
``layer`` -> the autograd Function (``fastrnn.autograd``; on the CPU in
eager mode, the op's own C++ autograd node, which a plain call's ``step``
or stack of layers reaches in one call into the extension) -> a layer op
(``fastrnn.ops``), whose kernel the tensors' device picks -> an engine; or
the reference loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrnn import autograd, backends, cpp, reference
from fastrnn.cells import CELLS, for_mode

# The C++ engine computes in float32 or float64; narrower floats are widened
# for it and the results narrowed back.
_WIDENED = (torch.bfloat16, torch.float16)


def _engine_layer(engine: str, cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor,
                  w_hh: Tensor, b_ih, b_hh, lengths, reverse: bool, w_hr):
    dtype = x.dtype
    if (engine == "cpp" and dtype in _WIDENED and w_ih.dtype == dtype
            and all(h.dtype == dtype for h in hx)):
        x, w_ih, w_hh, b_ih, b_hh, w_hr = [t if t is None else t.float()
                                           for t in (x, w_ih, w_hh, b_ih, b_hh, w_hr)]
        hx = tuple(h.float() for h in hx)
    # The Triton engine takes half types as they are but returns the float32
    # state it kept (and saves it for backward); both are narrowed here.
    output, h_n = autograd.run(cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, engine,
                               w_hr)
    if output.dtype == dtype:
        return output, h_n
    return output.to(dtype), tuple([h.to(dtype) for h in h_n])


# Constant per device type; torch.compile (before torch 2.13) cannot trace the query itself.
@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def _product_dtype_error(a: Tensor, b: Tensor, bias: Tensor | None) -> None:
    """Raises ATen's error for a product of ``a`` by ``b`` (addmm with a bias,
    mm without) where their dtypes differ, by running it on empty tensors."""
    m1, m2 = a.new_empty(0, 1), b.new_empty(1, 0)
    with torch.autocast(a.device.type, enabled=False):
        if bias is None:
            torch.mm(m1, m2)
        else:
            torch.addmm(bias.new_empty(0, 0), m1, m2)
    raise AssertionError("the product of different dtypes ran")


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype layers on x's device run in under ``torch.autocast``, or None."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return None  # the common case, in one call (the query below takes several)
    if _autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _carries_tangents(tensors) -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``) gives any of
    ``tensors`` a tangent. Only the reference loop, in plain PyTorch ops,
    carries tangents through a layer; the engines' ops have no forward-mode
    formula."""
    if forward_ad._current_level < 0:
        return False  # no dual level open: the common case, in one read
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _under_torch_func() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``,
    ``vmap``, ...) is on. The engines' ops have no batching rule, and their
    autograd Function's backward cannot be batched by ``jacrev``; the
    reference loop's plain PyTorch ops can be transformed every way. (Its
    forward is what that Function's differentiable backward runs anyway.)"""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def layer(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
          b_ih: Tensor | None = None, b_hh: Tensor | None = None, lengths: Tensor | None = None,
          reverse: bool = False, w_hr: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer of ``cell`` (a ``fastrnn.cells`` name) in one direction over a (T, B, I) input.

    ``hx`` holds the cell's initial states (an LSTM's h and c), each (B, H),
    h (B, P) with a projection ``w_hr`` (P, H). Returns (output (T, B, H or
    P), final states). ``lengths`` (int64 CPU, (B,)) limits each sequence;
    ``reverse`` runs each from its own last element. Under ``torch.autocast``
    the layer runs in the autocast dtype.
    """
    low = _autocast_dtype(x)
    if low is not None:
        # Like cuDNN's RNNs under autocast: the whole layer runs on inputs and
        # weights rounded to the low-precision dtype, with float32 state and
        # accumulation inside, and returns that dtype. As autocast does,
        # float64 tensors stay as they are (a float64 model runs in float64),
        # and dtypes left mixed fail as torch.nn's first products do. Autocast
        # is switched off inside so that the engine's own products are not recast.
        x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr = [
            t if t is None or not t.is_floating_point() or t.dtype == torch.float64
            else t.to(low) for t in (x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr)]
        for a, b, bias in ((x, w_ih, b_ih), (hx[0], w_hh, b_hh)):
            if a.dtype != b.dtype:
                _product_dtype_error(a, b, bias)
        with torch.autocast(x.device.type, enabled=False):
            return layer(cell, x, tuple(hx), w_ih, w_hh, b_ih, b_hh, lengths, reverse, w_hr)
    engine = backends.resolve(x.device)
    if (engine == "reference" or x.is_complex()
            or _carries_tangents((x, *hx, w_ih, w_hh, b_ih, b_hh, w_hr)) or _under_torch_func()):
        return reference.layer(cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, w_hr)
    return _engine_layer(engine, cell, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, w_hr)


def step(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> tuple[Tensor, ...]:
    """One step of ``cell`` on a (B, I) input from the states ``hx``: the
    states after it, as ``layer`` leaves them after a length-1 sequence (a
    cell module's call)."""
    states = plain_step(cell, x, hx, w_ih, w_hh, b_ih, b_hh)
    if states is not None:
        return states
    if hx[-1].dtype != hx[0].dtype:
        # An LSTM's c of another dtype than h: torch.nn's LSTMCell promotes
        # the cell's update to the wider one; the engines take one dtype.
        return CELLS[cell].step(x, hx, w_ih, w_hh, b_ih, b_hh)
    return layer(cell, x.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh)[1]


def plain_step(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
               b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> tuple[Tensor, ...] | None:
    """``step`` as a single call into the C++ engine, where that serves: a
    plain call (x (B, I) and a tuple of (B, H) states, sized as the weights
    expect; plain tensors on the CPU, x neither float16 nor bfloat16) in
    eager mode, without forward-mode AD or autocast, where the backend lets
    the C++ engine run. None for any other call, without raising: a cell
    module then checks its inputs as torch.nn does and calls ``step``. A
    step's arithmetic is microseconds, so the calls and checks around it are
    much of its time: the extension checks the plain call in one pass."""
    if not _cpp_in_one_call():
        return None
    return autograd.cpp_step(cell, x, hx, w_ih, w_hh, b_ih, b_hh)


def _cpp_in_one_call() -> bool:
    """Whether a plain call may run on the C++ engine in one call into the
    extension: the backend lets the C++ engine run, and no forward-mode AD
    is on (only the reference loop carries tangents)."""
    return forward_ad._current_level < 0 and backends.cpp_may_run()


def plain_states(input: Tensor, hx, weights: list, input_size: int, layers: int, h_size: int,
                 c_size: int, batch_first: bool) -> tuple[Tensor, ...] | None:
    """The tuple of a recurrent module's states (``hx``: h, or (h, c) with a
    ``c_size``; None: zeros, as torch.nn makes them) where its call is the
    plain one, which torch.nn's checks pass: a batched (T > 0) input of the
    weights' dtype and ``input_size`` features, and states of (layers, B,
    width), plain tensors on the CPU, in eager mode without autocast.
    Checked in one pass in the extension; None for any other call, without
    raising: the module then runs torch.nn's checks, which cost about as
    much as a short layer's arithmetic."""
    if not cpp.available() or not autograd.plain_calls():
        return None
    return cpp.plain_states(input, hx, weights, input_size, layers, h_size, c_size, batch_first)


def rnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False,
              nonlinearity: str = "tanh") -> tuple[Tensor, Tensor]:
    """One tanh/ReLU RNN layer: (output (T, B, H), h_n (B, H)); see ``layer``."""
    output, (h_n,) = layer(f"rnn_{nonlinearity}", x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths,
                           reverse)
    return output, h_n


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None,
              reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer: (output (T, B, H), h_n (B, H)); see ``layer``."""
    output, (h_n,) = layer("gru", x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return output, h_n


# Packing and unpacking depend on the lengths' values, which torch.compile
# cannot trace (before torch 2.13 it fails rather than breaking the graph):
# they run eagerly, between compiled graphs, as torch.nn's RNNs do whole.
@torch.compiler.disable
def padded(data: Tensor, batch_sizes: Tensor, total_length: int | None = None) -> tuple[Tensor, Tensor]:
    """A packed sequence's data as a time-major padded tensor, and its lengths."""
    return pad_packed_sequence(PackedSequence(data, batch_sizes), total_length=total_length)


@torch.compiler.disable
def packed(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """A time-major padded tensor packed by (sorted) lengths: (data, batch_sizes)."""
    sequence = pack_padded_sequence(x, lengths)
    return sequence.data, sequence.batch_sizes


def _dropout(x: Tensor, p: float, lengths: Tensor | None) -> Tensor:
    """Dropout between layers, drawn as torch.nn draws it.

    With lengths, torch.nn drops out the packed data (only the real steps),
    so the mask is drawn over that, then the padding comes back as zeros.
    """
    if lengths is None:
        return F.dropout(x, p, training=True)
    data, batch_sizes = packed(x, lengths)
    return padded(F.dropout(data, p, training=True), batch_sizes, x.shape[0])[0]


def recurrent_layers(mode: str, x: Tensor, hx: tuple[Tensor, ...], weights: Sequence[Tensor],
                     num_layers: int, bidirectional: bool, dropout: float = 0.0,
                     training: bool = False, lengths: Tensor | None = None,
                     proj_size: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
    """A stack of layers, as ``torch.nn.RNN``/``GRU``/``LSTM`` run them.

    ``mode`` is torch.nn's ("RNN_TANH", "RNN_RELU", "GRU" or "LSTM"); x is
    (T, B, I) time-major; hx holds the cell's initial states, each
    (num_layers * directions, B, H) (an LSTM's h (..., P) with ``proj_size``
    P); ``weights`` lists w_ih, w_hh, with biases b_ih, b_hh, and with a
    projection w_hr, per layer and direction (``RNNBase._flat_weights``
    order). Dropout applies to every layer's output but the last, in
    training only. Returns (output (T, B, directions * H_out), final states
    stacked as hx).
    """
    cell = for_mode(mode).name
    if lengths is None and not (dropout > 0 and training and num_layers > 1) and _cpp_in_one_call():
        # The Python ops around each layer (its states taken by indexing, the
        # final ones stacked) cost as much as a short layer's arithmetic.
        stacked = autograd.cpp_layers(cell, x, hx, weights, num_layers, bidirectional,
                                      proj_size > 0)
        if stacked is not None:
            return stacked
    directions = 2 if bidirectional else 1
    per_layer = len(weights) // (num_layers * directions)
    finals = []
    for index_layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = index_layer * directions + direction
            group = list(weights[index * per_layer:(index + 1) * per_layer])
            w_hr = group.pop() if proj_size else None
            w_ih, w_hh, *biases = group
            b_ih, b_hh = biases if biases else (None, None)
            output, states = layer(cell, x, tuple(h[index] for h in hx), w_ih, w_hh, b_ih, b_hh,
                                   lengths, direction == 1, w_hr)
            outputs.append(output)
            finals.append(states)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and index_layer < num_layers - 1:
            x = _dropout(x, dropout, lengths)
    return x, tuple(torch.stack(states) for states in zip(*finals))
