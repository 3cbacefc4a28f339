"""The Triton engine: fused recurrences of every cell for CUDA tensors.

Kernels live in ``tile.py`` (one program per batch tile, W_hh in registers)
and ``split.py`` (hidden units split over a persistent grid, or a per-step
cuBLAS product with a fused pointwise kernel), generic over cells; each
cell's pointwise math is in ``cells.py``. ``engine.py`` picks the strategy
per shape and implements the layer ops of ``fastrnn.ops``, registering them
on import: the CUDA kernels of ``fastrnn::layer_forward`` /
``layer_backward``, and the CPU kernels of ``fastrnn::triton_layer_forward``
/ ``triton_layer_backward``, which run the same kernels on CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1`` set before import):
how they are tested without a GPU.
"""

from fastrnn.triton.engine import (KERNEL_CELLS, STRATEGIES, layer_backward, layer_forward, plan,
                                   use_strategy)

__all__ = ["KERNEL_CELLS", "STRATEGIES", "use_strategy", "plan", "layer_forward",
           "layer_backward"]
