"""Drop-in replacements for torch.nn.RNN, GRU, RNNCell and GRUCell.

The classes keep torch.nn's constructors, parameters, state_dict layout and
input checks (they inherit them from ``nn.RNNBase``/``nn.RNNCellBase``) and
only replace the computation. They derive from ``nn.RNNBase`` rather than
``nn.RNN``/``nn.GRU`` so that torch.compile traces them instead of breaking
its graph at them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import functional


class _RecurrentModule(nn.RNNBase):
    """Forward shared by RNN and GRU: input forms, checks, packing, layers."""

    # Prefix of the input-rank error, as the torch.nn namesake words it.
    _rank_error = ""

    def flatten_parameters(self) -> None:
        """Does nothing: fastrnn's engines read the parameters where they are."""

    def forward(self, input, hx: Tensor | None = None):
        """Runs the layers over ``input``, as the torch.nn namesake does.

        ``input`` is (L, N, H_in) (or (N, L, H_in) with ``batch_first``),
        unbatched (L, H_in), or a ``PackedSequence``; ``hx`` is the initial
        state (D * num_layers, N, H_out), zeros when omitted. Returns
        ``(output, h_n)`` in the same form as the input.
        """
        self._update_flat_weights()
        directions = 2 if self.bidirectional else 1
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
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            batch = input.size(batch_dim)
        if hx is None:
            hx = torch.zeros(self.num_layers * directions, batch, self.hidden_size,
                             dtype=input.dtype, device=input.device)
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        _check_devices(input, hx, self._flat_weights)

        if packed:
            # Sorted, time-major padding; the engines stop each sequence at its length.
            x, lengths = functional.padded(input, batch_sizes)
        else:
            x, lengths = (input.transpose(0, 1) if self.batch_first else input), None
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        output, h_n = functional.recurrent_layers(
            self.mode, x, hx, self._flat_weights, self.num_layers, self.bidirectional,
            self.dropout, self.training, lengths)

        if packed:
            data = functional.packed(output, lengths)[0]
            return (PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(h_n, unsorted_indices))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n


def _check_devices(input: Tensor, hx: Tensor, weights) -> None:
    """torch.nn's device check (ATen's check_attributes): the state, then the parameters."""
    for name, tensors in (("hidden", [hx]), ("parameter", weights)):
        for t in tensors:
            if t is not None and t.device != input.device:
                raise RuntimeError(
                    f"Input and {name} tensors are not at the same device, found input tensor at "
                    f"{input.device} and {name} tensor at {t.device}")


class RNN(_RecurrentModule):
    """Multi-layer Elman RNN with tanh or ReLU: a drop-in for ``torch.nn.RNN``.

    Same arguments (``input_size, hidden_size, num_layers=1, nonlinearity='tanh',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None,
    dtype=None``), parameters, inputs and outputs as ``torch.nn.RNN``.
    """

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

    _rank_error = "GRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


def _cell_inputs(cell: nn.RNNCellBase, name: str, input: Tensor, hx: Tensor | None):
    """torch.nn's cell checks; returns batched (input, hx) and whether input was batched."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if hx is not None and hx.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    if hx is None:
        hx = torch.zeros(input.size(0), cell.hidden_size, dtype=input.dtype, device=input.device)
    elif not is_batched:
        hx = hx.unsqueeze(0)
    if input.size(1) != cell.weight_ih.size(1):
        raise RuntimeError(
            f"input has inconsistent input_size: got {input.size(1)} expected {cell.weight_ih.size(1)}")
    if input.size(0) != hx.size(0):
        raise RuntimeError(
            f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}")
    if hx.size(1) != cell.weight_hh.size(1):
        raise RuntimeError(
            f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {cell.weight_hh.size(1)}")
    return input, hx, is_batched


def _mixed_devices(cell: nn.RNNCellBase, input: Tensor, hx: Tensor) -> bool:
    tensors = [hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    return any(t is not None and t.device != input.device for t in tensors)


class RNNCell(nn.RNNCellBase):
    """One Elman RNN step with tanh or ReLU: a drop-in for ``torch.nn.RNNCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step: ``input`` (N, H_in) or (H_in,), ``hx`` (zeros when omitted) -> h'."""
        input, hx, is_batched = _cell_inputs(self, "RNNCell", input, hx)
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        if _mixed_devices(self, input, hx):
            # torch.nn's own cell raises torch.nn's error for this
            cell = torch._VF.rnn_tanh_cell if self.nonlinearity == "tanh" else torch._VF.rnn_relu_cell
            return cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        _, h = functional.rnn_layer(input.unsqueeze(0), hx, self.weight_ih, self.weight_hh,
                                    self.bias_ih, self.bias_hh, nonlinearity=self.nonlinearity)
        return h if is_batched else h.squeeze(0)


class GRUCell(nn.RNNCellBase):
    """One GRU step: a drop-in for ``torch.nn.GRUCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step: ``input`` (N, H_in) or (H_in,), ``hx`` (zeros when omitted) -> h'."""
        input, hx, is_batched = _cell_inputs(self, "GRUCell", input, hx)
        if _mixed_devices(self, input, hx):
            return torch._VF.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih,
                                      self.bias_hh)
        _, h = functional.gru_layer(input.unsqueeze(0), hx, self.weight_ih, self.weight_hh,
                                    self.bias_ih, self.bias_hh)
        return h if is_batched else h.squeeze(0)
