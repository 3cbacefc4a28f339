"""The Triton engine: fused RNN and GRU recurrences for CUDA tensors.

Kernels live in ``tile.py`` (one program per batch tile, W_hh in registers)
and ``split.py`` (hidden units split over a persistent grid, or a per-step
cuBLAS product with a fused pointwise kernel); ``engine.py`` picks the
strategy per shape and exposes the layer ops the autograd Functions call.
On CPU tensors the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before import), which is how they are tested
without a GPU.
"""

from fastrnn.triton.engine import (
    STRATEGIES,
    gru_backward,
    gru_forward,
    plan,
    rnn_backward,
    rnn_forward,
    settings,
    use_strategy,
)

__all__ = ["STRATEGIES", "use_strategy", "plan", "settings", "rnn_forward", "rnn_backward",
           "gru_forward", "gru_backward"]
