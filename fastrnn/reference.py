"""The plain PyTorch reference: one readable time loop for every cell type.

``layer`` has the same contract as the engines' layer ops (one layer, one
direction, time-major input, optional per-sequence lengths) and is
differentiated by autograd; each cell's step is its description's
(``fastrnn.cells``). Tests and benchmarks compare against them;
the ``"reference"`` backend runs them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.cells import CELLS


def recur(step, x: Tensor, hx: tuple[Tensor, ...], lengths: Tensor | None = None,
          reverse: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Runs ``step(x_t, states) -> states`` over a (T, B, I) input; the
    output of each step is its first state.

    Sequence b covers times 0..lengths[b]-1 (all T when lengths is None);
    in reverse it starts from its own last element. Outputs past a
    sequence's end are zero and its states are held there, so the returned
    states of b are the ones after its last step. Steps past the end run on
    zero states, so that no gradient meets the held ones (0 * inf = NaN).
    """
    T, B = x.shape[0], x.shape[1]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = lengths.to(x.device)
    batch = torch.arange(B, device=x.device)
    state = tuple(hx)
    out = x.new_zeros(T, B, hx[0].shape[-1])
    for s in range(T):
        active = lengths > s
        keep = active[:, None]
        time = (lengths - 1 - s).clamp(min=0) if reverse else torch.full_like(lengths, s)
        new = step(x[time, batch], tuple(torch.where(keep, h, 0) for h in state))
        state = tuple(torch.where(keep, n, h) for n, h in zip(new, state))
        out = out.index_put((time[active], batch[active]), new[0][active])
    return out, state


def layer(cell: str, x: Tensor, hx: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
          b_ih: Tensor | None = None, b_hh: Tensor | None = None, lengths: Tensor | None = None,
          reverse: bool = False, w_hr: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer of ``cell`` (a ``fastrnn.cells`` name) in one direction:
    returns (output (T, B, H), final states); ``w_hr`` projects the output
    of a cell that projects (LSTM)."""
    step = CELLS[cell].step
    weights = (w_ih, w_hh, b_ih, b_hh) if w_hr is None else (w_ih, w_hh, b_ih, b_hh, w_hr)
    return recur(lambda x_t, state: step(x_t, state, *weights), x, hx, lengths, reverse)


def rnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False,
              nonlinearity: str = "tanh") -> tuple[Tensor, Tensor]:
    """One tanh/ReLU RNN layer in one direction: returns (output (T, B, H), h_n (B, H))."""
    output, (h_n,) = layer(f"rnn_{nonlinearity}", x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths,
                           reverse)
    return output, h_n


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None,
              reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer in one direction: returns (output (T, B, H), h_n (B, H))."""
    output, (h_n,) = layer("gru", x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return output, h_n
