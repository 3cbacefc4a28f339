"""Drop-in replacements for torch.nn.RNN, GRU, LSTM, RNNCell, GRUCell and LSTMCell.

The classes keep torch.nn's constructors, parameters, state_dict layout and
input checks (they inherit them from ``nn.RNNBase``/``nn.RNNCellBase``) and
only replace the computation. They derive from ``nn.RNNBase`` rather than
``nn.RNN``/``nn.GRU``/``nn.LSTM`` so that torch.compile traces them instead of
breaking its graph at them.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.utils.rnn import PackedSequence

from fastrnn import functional


# torch.compile's tracer reads torch.onnx.is_in_onnx_export() as False, also
# when torch.onnx.export falls back to it; evaluated eagerly, it is True there.
@torch.compiler.assume_constant_result
def _onnx_exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


# torch.compiler.is_exporting exists from torch 2.6; before, the ONNX flag is read every call.
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: True)


def _fx_call(module: nn.Module, input, hx):
    """``module``'s call as torch.fx's symbolic tracing records it, where
    ``input`` or ``hx`` is its proxy: a call of the module, as for torch.nn's modules
    (which it takes as leaves) rather than a trace into it, whose checks and
    loops need real tensors."""
    tracer = (input if isinstance(input, Proxy) else hx).tracer
    args = (input,) if hx is None else (input, hx)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def _runs_as_torch_nn() -> bool:
    """Whether a module should compute as its torch.nn namesake does.

    True while ``torch.onnx.export`` (either exporter) or ``torch.jit.trace``
    records the model: the graph then holds the same ops as torch.nn's model
    (the standard ONNX RNN/GRU/LSTM operators, ``aten::gru`` and its kin),
    which runtimes execute without fastrnn, for every batch size and length.
    """
    # torch.onnx.export captures its graph with torch.export: is_exporting()
    # is the cheap test that spares the ONNX flag's look-up on every call.
    return torch.jit.is_tracing() or (_is_exporting() and _onnx_exporting())


class _Namesake:
    """What every fastrnn module has from the torch.nn class it replaces."""

    # The torch.nn class, bound here before anything can patch torch.nn.
    _torch_class: type[nn.Module]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise RuntimeError(
            f"fastrnn.{type(self).__name__} cannot be compiled by torch.jit.script, which "
            "PyTorch deprecates. Use torch.export.export (keeps fastrnn's kernels) or "
            "torch.jit.trace (records torch.nn's ops) instead, or fastrnn.unconvert(model) "
            "to turn fastrnn's modules back into torch.nn's first.")


# torch.nn's methods through which a layer module's forward checks and
# arranges its inputs, which a subclass may override.
_CHECK_METHODS = ("check_forward_args", "check_input", "check_hidden_size",
                  "get_expected_hidden_size", "get_expected_cell_size", "permute_hidden")


class _RecurrentModule(_Namesake, nn.RNNBase):
    """Forward shared by RNN, GRU and LSTM: input forms, checks, packing, layers.

    The state ``hx`` is one tensor (RNN, GRU) or a tuple (LSTM's (h, c));
    inside, it is always the tuple of the cell's state tensors.
    """

    # Prefix of the input-rank error, as the torch.nn namesake words it.
    _rank_error = ""

    # Whether a plain call may be checked in one pass in the extension
    # (functional.plain_states) instead of through _CHECK_METHODS: not in a
    # subclass that overrides one of them, whose every call they then check.
    _checks_in_one_pass = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__ == __name__ and "forward" not in vars(cls):
            # A call with wrong arguments raises a TypeError naming forward's
            # class: torch.nn's names RNN, GRU or LSTM, as each has its own.
            cls.forward = _renamed(_RecurrentModule.forward, f"{cls.__name__}.forward")
        if cls.__module__ != __name__:
            ours = next(c for c in cls.__mro__ if c.__module__ == __name__)
            cls._checks_in_one_pass = all(getattr(cls, name, None) is getattr(ours, name, None)
                                          for name in _CHECK_METHODS)

    @property
    def _second_state_size(self) -> int:
        """The width of the second state tensor (LSTM's c); 0 without one."""
        return 0

    def _states(self, hx) -> tuple[Tensor, ...]:
        """hx as the tuple of the cell's state tensors."""
        return (hx,)

    def _from_states(self, states: tuple[Tensor, ...]):
        """The inverse of ``_states``."""
        return states[0]

    def _zero_states(self, batch: int, input: Tensor) -> tuple[Tensor, ...]:
        directions = 2 if self.bidirectional else 1
        return (torch.zeros(self.num_layers * directions, batch, self.hidden_size,
                            dtype=input.dtype, device=input.device),)

    def _batched_states(self, hx, is_batched: bool):
        """torch.nn's rank check of a given hx; an unbatched one gains its batch dim."""
        if not is_batched:
            if hx.dim() != 2:
                raise RuntimeError(
                    f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            return hx.unsqueeze(1)
        if hx.dim() != 3:
            raise RuntimeError(
                f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        return hx

    def _check_state_count(self, states: tuple[Tensor, ...]) -> None:
        """Raises as torch.nn's op does for a state of the wrong arity."""

    def _checks_left_to_op(self, input, hx) -> bool:
        """Whether torch.nn's module leaves the checks of a call that fails
        fastrnn's to its op (whose errors only it words)."""
        return False

    def flatten_parameters(self) -> None:
        """Does nothing: fastrnn's engines read the parameters where they are."""

    def _update_flat_weights(self) -> None:
        """torch.nn's: re-reads the weights where one is no longer the tensor
        read last (torch.func.functional_call swaps them in). A registered
        weight is taken from the parameter dict, where nn.Module's attribute
        look-up ends after Python's own has failed: a microsecond per weight
        and call, a fifth of a small layer's step. Any other weight (a
        parametrization's, as spectral_norm's) goes through torch.nn's own
        check, which evaluates it as often as torch.nn does: each
        evaluation of spectral_norm in training is a power iteration."""
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            if name not in parameters:
                nn.RNNBase._update_flat_weights(self)
                return
            weight = parameters[name]
            if weight is not None and ref is not None and ref() is not weight:
                self._init_flat_weights()
                return

    def forward(self, input, hx: Tensor | None = None):
        """Runs the layers over ``input``, as the torch.nn namesake does.

        ``input`` is (L, N, H_in) (or (N, L, H_in) with ``batch_first``),
        unbatched (L, H_in), or a ``PackedSequence``; ``hx`` is the initial
        state (D * num_layers, N, H_out), zeros when omitted (for LSTM the
        tuple (h_0, c_0)). Returns ``(output, h_n)`` (``(output, (h_n, c_n))``)
        in the same form as the input.
        """
        if isinstance(input, Proxy) or isinstance(hx, Proxy):
            return _fx_call(self, input, hx)
        if _runs_as_torch_nn():
            return self._torch_class.forward(self, input, hx)
        self._update_flat_weights()
        directions = 2 if self.bidirectional else 1
        states = functional.plain_states(
            input, hx, self._flat_weights, self.input_size, self.num_layers * directions,
            self.proj_size or self.hidden_size, self._second_state_size,
            self.batch_first) if self._checks_in_one_pass else None
        if states is not None:
            # The common call, checked in one pass in the extension.
            packed, is_batched, lengths = False, True, None
            x = input.transpose(0, 1) if self.batch_first else input
        else:
            checked = self._checked_inputs(input, hx)
            if checked is None:
                return self._torch_nn_forward(input, hx)
            x, states, lengths, packed, is_batched, batch_sizes, sorted_indices, \
                unsorted_indices = checked
        output, finals = functional.recurrent_layers(
            self.mode, x, states, self._flat_weights, self.num_layers, self.bidirectional,
            self.dropout, self.training, lengths, self.proj_size)

        if packed:
            data = functional.packed(output, lengths)[0]
            return (PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(self._from_states(finals), unsorted_indices))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            finals = tuple(h.squeeze(1) for h in finals)
        return output, self._from_states(finals)

    def _torch_nn_forward(self, input, hx):
        """torch.nn's forward of this call over the weights this call has
        read (read again, a parametrized weight would be evaluated more often
        than torch.nn evaluates it)."""
        self._update_flat_weights = _weights_read  # shadows the method for this call
        try:
            return self._torch_class.forward(self, input, hx)
        finally:
            del self._update_flat_weights

    def _checked_inputs(self, input, hx):
        """torch.nn's checks and forms of any call: (time-major x, the states'
        tuple, lengths, whether packed, whether batched, and the packed
        input's batch_sizes, sorted_indices and unsorted_indices); None for
        a call whose states fail the checks that torch.nn's module leaves to
        its op (``_checks_left_to_op``)."""
        left_to_op = self._checks_left_to_op(input, hx)
        packed = isinstance(input, PackedSequence)
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            is_batched = True
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(self._rank_error.format(input.dim()))
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                hx = self._batched_states(hx, is_batched)
            batch = input.size(batch_dim)
        try:
            if hx is None:
                hx = self._from_states(self._zero_states(batch, input))
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(input, hx, batch_sizes)
            states = self._states(hx)
            self._check_state_count(states)
            _check_op_args(input, states, self._flat_weights, 3 if packed else 2)
        except Exception:
            if not left_to_op:
                raise
            return None  # torch.nn's op raises its own error, or runs the call

        if packed:
            # Sorted, time-major padding; the engines stop each sequence at its length.
            x, lengths = functional.padded(input, batch_sizes)
        else:
            x, lengths = (input.transpose(0, 1) if self.batch_first else input), None
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        return (x, states, lengths, packed, is_batched, batch_sizes, sorted_indices,
                unsorted_indices)


def _renamed(function, qualname: str):
    """A copy of ``function`` under another qualified name."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__doc__ = function.__kwdefaults__, function.__doc__
    copy.__annotations__, copy.__qualname__ = function.__annotations__, qualname
    return copy


def _weights_read() -> None:
    """``_update_flat_weights`` where the weights of a call are read already."""


def _check_op_args(input: Tensor, states: tuple[Tensor, ...], weights, position: int) -> None:
    """What torch.nn's op checks of a call's tensors: its argument parser that
    each weight (the argument at ``position``) is one, then ATen's
    check_attributes that the states, then the weights, are on the input's
    device."""
    device = input.device
    stray = None  # the first weight on another device
    for index, weight in enumerate(weights):
        if weight is None:  # set so by hand
            raise TypeError(f"expected Tensor as element {index} in argument {position}, but "
                            "got NoneType")
        if stray is None and weight.device != device:
            stray = weight
    for name, tensors in (("hidden", states), ("parameter", () if stray is None else (stray,))):
        for t in tensors:
            if t.device != device:
                raise RuntimeError(
                    f"Input and {name} tensors are not at the same device, found input tensor at "
                    f"{device} and {name} tensor at {t.device}")


class RNN(_RecurrentModule):
    """Multi-layer Elman RNN with tanh or ReLU: a drop-in for ``torch.nn.RNN``.

    Same arguments (``input_size, hidden_size, num_layers=1, nonlinearity='tanh',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None,
    dtype=None``), parameters, inputs and outputs as ``torch.nn.RNN``.
    """

    _torch_class = nn.RNN
    _rank_error = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)


class GRU(_RecurrentModule):
    """Multi-layer gated recurrent unit: a drop-in for ``torch.nn.GRU``.

    Same arguments (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None,
    dtype=None``), parameters, inputs and outputs as ``torch.nn.GRU``.
    """

    _torch_class = nn.GRU
    _rank_error = "GRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class LSTM(_RecurrentModule):
    """Multi-layer long short-term memory: a drop-in for ``torch.nn.LSTM``.

    Same arguments (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
    device=None, dtype=None``), parameters (``weight_hr_l{k}`` with
    ``proj_size``), inputs and outputs (``(h_0, c_0)`` in, ``(output, (h_n,
    c_n))`` out) as ``torch.nn.LSTM``.
    """

    _torch_class = nn.LSTM
    _rank_error = "LSTM: Expected input to be 2D or 3D, got {}D instead"

    # The next three are torch.nn.LSTM's own, so that messages match word for word.
    def get_expected_cell_size(self, input: Tensor, batch_sizes: Tensor | None):
        """The shape c_0 must have: (D * num_layers, N, hidden_size)."""
        return self._torch_class.get_expected_cell_size(self, input, batch_sizes)

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Tensor | None) -> None:
        """torch.nn.LSTM's checks of the input and of both states' shapes."""
        self._torch_class.check_forward_args(self, input, hidden, batch_sizes)

    def permute_hidden(self, hx, permutation: Tensor | None):
        """(h, c) with their batch dimension permuted (packed input's order)."""
        return self._torch_class.permute_hidden(self, hx, permutation)

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    @property
    def _second_state_size(self) -> int:
        return self.hidden_size

    def _checks_left_to_op(self, input, hx) -> bool:
        # torch.nn's LSTM checks no state of a packed input, and its op takes
        # (h, c) only as a tuple.
        return isinstance(input, PackedSequence) or isinstance(hx, Tensor)

    def _states(self, hx) -> tuple[Tensor, ...]:
        if isinstance(hx, Tensor):
            # Never reaches a user: the call then goes to torch.nn's op.
            raise TypeError("an LSTM's hx is the tuple (h_0, c_0)")
        return tuple(hx)

    def _from_states(self, states: tuple[Tensor, ...]):
        return tuple(states)

    def _zero_states(self, batch: int, input: Tensor) -> tuple[Tensor, ...]:
        (c,) = super()._zero_states(batch, input)
        h = c if self.proj_size == 0 else c.new_zeros(*c.shape[:2], self.proj_size)
        return h, c

    def _batched_states(self, hx, is_batched: bool):
        # Indexed as torch.nn indexes it, so that a hx of the wrong arity
        # fails as it does there.
        rank = 3 if is_batched else 2
        if hx[0].dim() != rank or hx[1].dim() != rank:
            shape = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {shape} input, hx and cx should also be {rank}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))

    def _check_state_count(self, states: tuple[Tensor, ...]) -> None:
        if len(states) != 2:
            raise RuntimeError("lstm expects two hidden states")


def _common_cell_call(input: Tensor, states, weights: tuple, count: int) -> bool:
    """Whether a cell's call is the common one, which torch.nn's checks pass:
    a batched input, ``count`` 2-D states of the input's batch and the
    weights' sizes. Tested in a few comparisons of shapes (reading a size
    through Tensor.size costs more than the whole shape); the states' ranks
    first, as torch.nn reads them."""
    if input.dim() != 2 or type(states) is not tuple or len(states) != count:
        return False
    for h in states:
        if h.dim() != 2:
            return False
    w_ih, w_hh = weights[0], weights[1]
    if not (isinstance(w_ih, Tensor) and isinstance(w_hh, Tensor)
            and w_ih.dim() == 2 and w_hh.dim() == 2):
        return False
    batch, features = input.shape
    expected = (batch, w_hh.shape[1])
    for h in states:
        if h.shape != expected:
            return False
    return features == w_ih.shape[1]


def _cell_inputs(cell: nn.RNNCellBase, name: str, input: Tensor,
                 states: tuple[Tensor, ...] | None, weights: tuple, count: int = 1):
    """torch.nn's cell checks of the input and the ``count`` state tensors
    (None: zeros) against ``weights`` (w_ih, w_hh, b_ih, b_hh), read once per
    call; returns batched (input, states) and whether input was batched."""
    if _common_cell_call(input, states, weights, count):
        return input, states, True
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for index, h in enumerate(() if states is None else states):
        if h.dim() not in (1, 2):
            what = "hidden" if count == 1 else f"hx[{index}]"
            raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {h.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    if states is None:
        # One tensor each: torch.compile cannot trace an autograd Function
        # given one tensor twice.
        states = tuple(torch.zeros(input.size(0), cell.hidden_size, dtype=input.dtype,
                                   device=input.device) for _ in range(count))
    elif not is_batched:
        # Indexed as torch.nn's cells index it (a longer tuple loses its tail).
        states = tuple(states[i].unsqueeze(0) for i in range(count))
    if count > 1:
        # What ATen's lstm_cell (the only cell with two states) checks first.
        if not isinstance(states, (tuple, list)):
            raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
                            f"not {type(states).__name__}")
        if len(states) != count:
            raise RuntimeError("lstm_cell expects two hidden states")
    for position, argument in ((3, "w_ih"), (4, "w_hh")):
        weight = weights[position - 3]
        if not isinstance(weight, Tensor):  # set so by hand; ATen's op refuses it
            op = {"RNNCell": f"rnn_{getattr(cell, 'nonlinearity', 'tanh')}_cell",
                  "GRUCell": "gru_cell", "LSTMCell": "lstm_cell"}[name]
            raise TypeError(f"{op}(): argument '{argument}' (position {position}) must be "
                            f"Tensor, not {type(weight).__name__}")
    # Sizes read as ATen reads them: a state of the wrong rank fails as there.
    if input.size(1) != weights[0].size(1):
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected "
                           f"{weights[0].size(1)}")
    for index, h in enumerate(states):
        if input.size(0) != h.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{index} "
                               f"batch size {h.size(0)}")
        if h.size(1) != weights[1].size(1):
            raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got {h.size(1)}, "
                               f"expected {weights[1].size(1)}")
    return input, tuple(states), is_batched


def _mixed_devices(input: Tensor, tensors) -> bool:
    if input.is_cpu:
        # The common case, without making a device object per tensor.
        for t in tensors:
            if t is not None and not t.is_cpu:
                break
        else:
            return False
    device = input.device
    return any(t is not None and t.device != device for t in tensors)


class _CellModule(_Namesake, nn.RNNCellBase):
    """What RNNCell, GRUCell and LSTMCell share: reading their weights.

    A cell's call first tries ``functional.plain_step``, which takes the
    common call (batched, with its states, plain CPU tensors) in one call
    into the C++ engine, its checks included; any other call returns None
    there and then takes torch.nn's checks (``_cell_inputs``), in Python,
    which cost about as much as a small step's arithmetic.
    """

    def _weights(self) -> tuple:
        """(weight_ih, weight_hh, bias_ih, bias_hh), as reading the attributes gives them.

        Taken from the registered parameters where they are: nn.Module looks
        there only after Python's own attribute look-up has failed, half a
        microsecond per read, a tenth of a small step. A parameter deleted,
        replaced by a plain tensor or parametrized is no longer registered
        under its name, and is read as an attribute.
        """
        parameters = self._parameters
        try:
            return (parameters["weight_ih"], parameters["weight_hh"], parameters["bias_ih"],
                    parameters["bias_hh"])
        except KeyError:  # one of them is not registered under its name
            return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh


class RNNCell(_CellModule):
    """One Elman RNN step with tanh or ReLU: a drop-in for ``torch.nn.RNNCell``."""

    _torch_class = nn.RNNCell
    __constants__ = nn.RNNCell.__constants__  # nonlinearity too

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step: ``input`` (N, H_in) or (H_in,), ``hx`` (zeros when omitted) -> h'."""
        if isinstance(input, Proxy) or isinstance(hx, Proxy):
            return _fx_call(self, input, hx)
        if _runs_as_torch_nn():
            return self._torch_class.forward(self, input, hx)
        weights = self._weights()
        cell = f"rnn_{self.nonlinearity}"
        states = functional.plain_step(cell, input, (hx,), *weights)  # see _CellModule
        if states is not None:
            return states[0]
        input, (hx,), is_batched = _cell_inputs(self, "RNNCell", input,
                                                None if hx is None else (hx,), weights)
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        if _mixed_devices(input, (hx, *weights)):
            # torch.nn's own cell raises torch.nn's error for this
            torch_cell = (torch._VF.rnn_tanh_cell if self.nonlinearity == "tanh"
                          else torch._VF.rnn_relu_cell)
            return torch_cell(input, hx, *weights)
        h, = functional.step(cell, input, (hx,), *weights)
        return h if is_batched else h.squeeze(0)


class GRUCell(_CellModule):
    """One GRU step: a drop-in for ``torch.nn.GRUCell``."""

    _torch_class = nn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step: ``input`` (N, H_in) or (H_in,), ``hx`` (zeros when omitted) -> h'."""
        if isinstance(input, Proxy) or isinstance(hx, Proxy):
            return _fx_call(self, input, hx)
        if _runs_as_torch_nn():
            return self._torch_class.forward(self, input, hx)
        weights = self._weights()
        states = functional.plain_step("gru", input, (hx,), *weights)  # see _CellModule
        if states is not None:
            return states[0]
        input, (hx,), is_batched = _cell_inputs(self, "GRUCell", input,
                                                None if hx is None else (hx,), weights)
        if _mixed_devices(input, (hx, *weights)):
            return torch._VF.gru_cell(input, hx, *weights)
        h, = functional.step("gru", input, (hx,), *weights)
        return h if is_batched else h.squeeze(0)


class LSTMCell(_CellModule):
    """One LSTM step: a drop-in for ``torch.nn.LSTMCell``."""

    _torch_class = nn.LSTMCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        """One step: ``input`` (N, H_in) or (H_in,), ``hx`` = (h, c) (zeros when
        omitted) -> (h', c')."""
        if isinstance(input, Proxy) or isinstance(hx, Proxy):
            return _fx_call(self, input, hx)
        if _runs_as_torch_nn():
            return self._torch_class.forward(self, input, hx)
        weights = self._weights()
        states = functional.plain_step("lstm", input, hx, *weights)  # see _CellModule
        if states is not None:
            return states
        input, states, is_batched = _cell_inputs(self, "LSTMCell", input, hx, weights, count=2)
        if _mixed_devices(input, (*states, *weights)):
            return torch._VF.lstm_cell(input, states, *weights)
        states = functional.step("lstm", input, states, *weights)
        return states if is_batched else tuple(h.squeeze(0) for h in states)
