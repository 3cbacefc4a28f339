"""The cell types, each described once.

A description says what a cell computes and keeps: its gates, its state
tensors, what each step saves for backward, which hidden-side biases fold
into the input projection, and its reference step. The functional layer,
the autograd Function, the ops' fake shapes, the reference loop, the
benchmark and the tests read it; the engines take its ``name`` and hold the
pointwise math of each cell in one place (``csrc/cpu/cells.h``,
``fastrnn/triton/cells.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


def rnn_tanh_step(x: Tensor, state: tuple[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor]:
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return (F.linear(x, w_ih, b_ih).add(F.linear(state[0], w_hh, b_hh)).tanh(),)


def rnn_relu_step(x: Tensor, state: tuple[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor]:
    """h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return (F.linear(x, w_ih, b_ih).add(F.linear(state[0], w_hh, b_hh)).relu(),)


def gru_step(x: Tensor, state: tuple[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor]:
    """One GRU step, gate rows stacked r | z | n (b_hn inside the reset product)."""
    h = state[0]
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = (x_r + h_r).sigmoid()
    z = (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return ((1 - z) * n + z * h,)


def lstm_step(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None, b_hh: Tensor | None,
              w_hr: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, gate rows stacked i | f | g | o; with ``w_hr`` (P, H) the
    new h is projected: h' = W_hr (o * tanh(c'))."""
    h, c = state
    i, f, g, o = F.linear(x, w_ih, b_ih).add(F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
    h = o.sigmoid() * c.tanh()
    return (h if w_hr is None else F.linear(h, w_hr), c)


@dataclass(frozen=True)
class Cell:
    """What one cell type computes and keeps.

    name: the engines' name for it (the ``cell`` argument of the ops).
    mode: torch.nn's name for it (``RNNBase.mode``).
    gates: blocks of H rows stacked in weight_ih, weight_hh and the biases.
    states: the recurrent state tensors, in torch.nn's order; the first is
        the output of each step (B, H, or (B, P) with a projection), the
        others are (B, H).
    saved: H-wide values each step keeps for backward: the workspace is
        (T, B, saved * H).
    folded_gates: the leading gates whose hidden-side bias adds straight to
        the pre-activation and so joins the input projection; the others'
        stay inside the time loop (the GRU's b_hn, inside r * (W_hn h + b_hn)).
    projects: whether it takes a projection ``w_hr`` (P, H) of its output
        (torch.nn's ``proj_size``).
    step: the reference step, ``step(x_t, states, w_ih, w_hh, b_ih, b_hh) -> states``,
        and ``w_hr`` after them for a cell that projects.
    """

    name: str
    mode: str
    gates: int
    states: tuple[str, ...]
    saved: int
    folded_gates: int
    step: Callable[..., tuple[Tensor, ...]]
    projects: bool = False


CELLS = {cell.name: cell for cell in (
    Cell("rnn_tanh", "RNN_TANH", gates=1, states=("h",), saved=0, folded_gates=1,
         step=rnn_tanh_step),
    Cell("rnn_relu", "RNN_RELU", gates=1, states=("h",), saved=0, folded_gates=1,
         step=rnn_relu_step),
    # Per step: r | z | n | W_hn h + b_hn.
    Cell("gru", "GRU", gates=3, states=("h",), saved=4, folded_gates=2, step=gru_step),
    # Per step: i | f | g | o (after their nonlinearities) | c.
    Cell("lstm", "LSTM", gates=4, states=("h", "c"), saved=5, folded_gates=4, step=lstm_step,
         projects=True),
)}

BY_MODE = {cell.mode: cell for cell in CELLS.values()}


def for_mode(mode: str) -> Cell:
    """The cell a torch.nn mode string ("RNN_TANH", "RNN_RELU", "GRU", "LSTM") names."""
    return BY_MODE[mode]
