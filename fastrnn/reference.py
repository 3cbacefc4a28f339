"""The plain PyTorch reference: one readable time loop per cell type.

These functions have the same contract as the engines' layer functions (one
layer, one direction, time-major input, optional per-sequence lengths) and
are differentiated by autograd. Tests and benchmarks compare against them;
the ``"reference"`` backend runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
             b_hh: Tensor | None, nonlinearity: str = "tanh") -> Tensor:
    """One step of an Elman RNN: act(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    pre = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
             b_hh: Tensor | None) -> Tensor:
    """One GRU step, gate rows stacked r | z | n (b_hn inside the reset product)."""
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def recur(step, x: Tensor, h0: Tensor, lengths: Tensor | None = None,
          reverse: bool = False) -> tuple[Tensor, Tensor]:
    """Runs ``step(x_t, h) -> h`` over a (T, B, I) input.

    Sequence b covers times 0..lengths[b]-1 (all T when lengths is None);
    in reverse it starts from its own last element. Outputs past a
    sequence's end are zero and its state is held there, so the returned
    state of b is the one after its last step. Steps past the end run on a
    zero state, so that no gradient meets the held one (0 * inf = NaN).
    """
    T, B = x.shape[0], x.shape[1]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = lengths.to(x.device)
    batch = torch.arange(B, device=x.device)
    h = h0
    out = x.new_zeros(T, B, h0.shape[-1])
    for s in range(T):
        active = lengths > s
        time = (lengths - 1 - s).clamp(min=0) if reverse else torch.full_like(lengths, s)
        h_new = step(x[time, batch], torch.where(active[:, None], h, 0))
        h = torch.where(active[:, None], h_new, h)
        out = out.index_put((time[active], batch[active]), h_new[active])
    return out, h


def rnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False,
              nonlinearity: str = "tanh") -> tuple[Tensor, Tensor]:
    """One tanh/ReLU RNN layer in one direction: returns (output (T, B, H), h_n (B, H))."""
    return recur(lambda x_t, h: rnn_cell(x_t, h, w_ih, w_hh, b_ih, b_hh, nonlinearity),
                 x, h0, lengths, reverse)


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None,
              reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer in one direction: returns (output (T, B, H), h_n (B, H))."""
    return recur(lambda x_t, h: gru_cell(x_t, h, w_ih, w_hh, b_ih, b_hh), x, h0, lengths, reverse)
