"""The Triton engine's layer ops: same contract as the C++ engine's
(``fastrnn.cpp``), so the autograd Functions run either unchanged.

Forward: the input projection of all steps is one GEMM (cuBLAS through
torch); one of three strategies then runs the time loop (``plan``).
Backward: a reverse sweep writes every step's pre-activation gradients, then
dW_ih, dW_hh, the biases and dx come from GEMMs over all T * B rows.
bfloat16 and float16 keep their state, gates and gradients in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn import fake
from fastrnn.settings import setting, settings as thread_settings
from fastrnn.triton.split import split_bwd_kernel, split_fwd_kernel
from fastrnn.triton.tile import tile_bwd_kernel, tile_fwd_kernel

STRATEGIES = ("auto", "tile", "split", "stepwise")
TANH, RELU, GRU = 0, 1, 2

# Largest zero-padded hidden size whose W_hh one tile program keeps in
# registers, by (product form, gates): "gemv" for one-row tiles and float64,
# "fp32" for float32 tl.dot (FMA, IEEE), "half" for bfloat16/float16 tl.dot
# (tensor cores). The ahead-of-time compile test checks that none of these
# spills (tests/triton_aot.py prints the table).
TILE_MAX_BLOCK_H = {("gemv", 1): 64, ("gemv", 3): 32, ("fp32", 1): 32, ("fp32", 3): 32,
                    ("half", 1): 128, ("half", 3): 64}
# Batch from which the recurrent product is a GEMM worth cuBLAS.
STEPWISE_MIN_BATCH = 256
# SM count assumed when no GPU is present (an H100 SXM's), so that the
# interpreter takes the same decisions as the device.
DEFAULT_SM_COUNT = 132
# Hidden units per program of the persistent split grid.
SPLIT_BLOCK_N = 16


@contextlib.contextmanager
def use_strategy(name: str) -> Iterator[None]:
    """Forces the Triton engine's launch strategy inside the ``with`` block:
    ``"auto"`` (chosen per shape), ``"tile"``, ``"split"`` or ``"stepwise"``.
    The setting is per thread; a layer's backward runs the strategy its
    forward was called under."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown fastrnn Triton strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    with setting("triton_strategy", name):
        yield


def settings() -> tuple:
    """The engine's settings in force, as the trailing arguments of its ops:
    read where forward runs and kept for backward (autograd runs a CUDA
    backward on a thread of its own, where the settings have their defaults)."""
    return (thread_settings.triton_strategy,)


@dataclass(frozen=True)
class Plan:
    """How one layer's recurrence is launched, and the kernels that launch it.

    block_b: batch rows per program (1: the GEMV form); block_n: hidden
    units per program (the whole padded H for "tile"); block_k: the
    reduction chunk of the split product; gpu: compiled for a GPU (else
    run by the interpreter); cooperative: the GPU launches cooperative
    grids, which alone guarantee that every program of a persistent split
    is resident at once. Without both, "split" launches once per step and
    phase instead of syncing its grid at a barrier.
    """

    strategy: str
    block_b: int
    block_n: int
    block_k: int
    use_dot: bool
    num_warps: int
    cell: int
    state_dtype: tl.dtype
    dot_dtype: tl.dtype
    precision: str
    gpu: bool
    cooperative: bool = False
    backward_warps: int | None = None  # when backward differs from num_warps

    @property
    def grid_sync(self) -> bool:
        """Whether one persistent launch runs every step, its programs meeting at a grid barrier."""
        return self.strategy == "split" and self.gpu and self.cooperative

    def grid(self, B: int, H: int) -> tuple[int, int]:
        """The launch grid: (batch tiles, hidden-unit blocks)."""
        return triton.cdiv(B, self.block_b), triton.cdiv(H, self.block_n)

    def launches(self) -> dict:
        """Kernel and compile-time arguments per launch kind: "forward",
        "backward" and, for an unsynced split, "backward_recurrent"."""
        common = dict(CELL=self.cell, BLOCK_B=self.block_b, USE_DOT=self.use_dot,
                      DOT_DTYPE=self.dot_dtype, STATE_DTYPE=self.state_dtype,
                      PRECISION=self.precision, num_warps=self.num_warps)
        if self.strategy == "tile":
            return {"forward": (tile_fwd_kernel, dict(common, BLOCK_H=self.block_n)),
                    "backward": (tile_bwd_kernel, dict(common, BLOCK_H=self.block_n,
                                                       num_warps=self.backward_warps or self.num_warps))}
        # No software pipelining: its async copies may go through L1, and the
        # state other programs wrote must be read past it.
        common.update(BLOCK_N=self.block_n, BLOCK_K=self.block_k, num_stages=1)
        stepwise = self.strategy == "stepwise"
        if self.grid_sync:
            # The driver schedules all programs together or fails the launch,
            # rather than leaving some spinning at the barrier for SMs that
            # another stream's kernels hold.
            common["launch_cooperative_grid"] = True
        kinds = {"forward": (split_fwd_kernel, dict(common, EXTERNAL_Q=stepwise,
                                                    GRID_SYNC=self.grid_sync))}
        phases = dict(POINTWISE=True, RECURRENT=self.grid_sync, WRITE_STEP=stepwise,
                      GRID_SYNC=self.grid_sync)
        kinds["backward"] = (split_bwd_kernel, dict(common, **phases))
        if self.strategy == "split" and not self.grid_sync:
            kinds["backward_recurrent"] = (split_bwd_kernel, dict(common, **dict(
                phases, POINTWISE=False, RECURRENT=True)))
        return kinds


def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


_COOPERATIVE_LAUNCH = _cooperative_launch_supported()
CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH = 95


@functools.cache
def _device_launches_cooperative(index: int) -> bool:
    """Whether the driver reports cooperative launches on CUDA device ``index``."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    handle, value = ctypes.c_int(), ctypes.c_int()
    if driver.cuDeviceGet(ctypes.byref(handle), index) != 0:
        return False
    status = driver.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, handle)
    return status == 0 and value.value == 1


def _cooperative(device: torch.device) -> bool:
    """Whether a persistent grid on ``device`` can be launched cooperatively:
    the installed Triton offers it and the device reports it (assumed
    without a GPU, so that the interpreter plans as the device would)."""
    if not _COOPERATIVE_LAUNCH:
        return False
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_launches_cooperative(index)


def _sm_count(device: torch.device) -> int:
    """The SMs this process may use: the device's, or an H100's without a GPU,
    scaled down by an MPS client's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE."""
    count = DEFAULT_SM_COUNT
    if device.type == "cuda" and torch.cuda.is_available():
        count = torch.cuda.get_device_properties(device).multi_processor_count
    try:
        percent = float(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", 100))
    except ValueError:
        percent = 100.0
    return max(1, int(count * min(100.0, max(0.0, percent)) / 100))


def plan(cell: int, B: int, H: int, dtype: torch.dtype, device: torch.device,
         strategy: str | None = None) -> Plan:
    """The launch plan for a layer under ``strategy`` (default: the one in
    force on this thread, ``use_strategy``).

    auto: "stepwise" from STEPWISE_MIN_BATCH rows; else "tile" when W_hh fits
    one program; else "split" when its grid fits the SMs and, on a GPU,
    launches cooperatively; else "stepwise". A forced strategy that cannot
    run the shape raises RuntimeError.
    """
    gates = 3 if cell == GRU else 1
    gpu = device.type == "cuda"
    gemv = B == 1 or dtype == torch.float64
    state = tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter's tl.dot is exact in float32 but wrong on half operands.
    dot = state if gemv or not gpu else _TL_DTYPES[dtype]
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and dtype == torch.float32 else "ieee"
    cooperative = _cooperative(device)
    make = functools.partial(Plan, cell=cell, state_dtype=state, dot_dtype=dot,
                             precision=precision, gpu=gpu, cooperative=cooperative)

    block_h = max(16, triton.next_power_of_2(H))
    form = "gemv" if gemv else ("fp32" if dtype == torch.float32 else "half")
    tile_max = TILE_MAX_BLOCK_H[(form, gates)]
    # Warps per program: where ptxas spills no configuration, forward and
    # backward apart (tests/triton_aot.py checks each one).
    wide = 16 if gates == 3 or block_h >= 128 else 8
    tile = make("tile", 1 if gemv else 16, block_h, block_h, not gemv,
                2 if gemv else (16 if form == "fp32" else wide),
                backward_warps=4 if gemv or form == "fp32" else wide)
    stepwise = make("stepwise", 16, 32, 32, False, 4)
    # Persistent split: every program must be resident for the grid barrier.
    split_b = 1 if gemv else 16
    split_fits = (triton.cdiv(B, split_b) * triton.cdiv(H, SPLIT_BLOCK_N) <= _sm_count(device)
                  or not gpu)
    # float64 RNN at 64 spilled the unsynced forward on sm_90 (8 warps); its
    # GRU at 32 spilled the synced one on sm_80.
    if dtype == torch.float64 and gates == 1:
        split_k = 32
    else:
        split_k = 64 if gemv else (32 if gates == 3 else 16)
    split_warps = 8 if gemv or (gates == 3 and form == "fp32") else 4
    split = make("split", split_b, SPLIT_BLOCK_N, split_k, not gemv, split_warps)

    forced = thread_settings.triton_strategy if strategy is None else strategy
    if forced == "tile" and block_h > tile_max:
        raise RuntimeError(f"fastrnn Triton strategy 'tile' holds W_hh in registers only up to "
                           f"hidden size {tile_max} here, got {H}")
    if forced == "split" and not split_fits:
        raise RuntimeError(f"fastrnn Triton strategy 'split' needs a grid of at most "
                           f"{_sm_count(device)} programs, batch {B} x hidden {H} needs more")
    if forced != "auto":
        return {"tile": tile, "split": split, "stepwise": stepwise}[forced]
    if B >= STEPWISE_MIN_BATCH:
        return stepwise
    if block_h <= tile_max:
        return tile
    return split if split_fits and (cooperative or not gpu) else stepwise


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


def _lengths(lengths: Tensor | None, T: int, B: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32)


def _check(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, gates: int) -> None:
    if x.dim() != 3 or h0.dim() != 2 or w_ih.dim() != 2 or w_hh.dim() != 2:
        raise RuntimeError("fastrnn: expected input (T, B, I), hx (B, H), weight_ih (G, I), weight_hh (G, H)")
    T, B, I = x.shape
    H = h0.shape[1]
    if h0.shape[0] != B or w_ih.shape != (gates * H, I) or w_hh.shape != (gates * H, H):
        raise RuntimeError(
            f"fastrnn: inconsistent layer shapes: input {tuple(x.shape)}, hx {tuple(h0.shape)}, "
            f"weight_ih {tuple(w_ih.shape)}, weight_hh {tuple(w_hh.shape)}")


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """x W_ih^T + bias for all steps at once: (T, B, G)."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    proj = torch.mm(x2, w_ih.t()) if bias is None else torch.addmm(bias, x2, w_ih.t())
    return proj.view(T, B, w_ih.shape[0])


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device and its stream: make them the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(cell: int, proj: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor | None,
             lengths: Tensor | None, reverse: bool, strategy: str) -> tuple[Tensor, Tensor, Tensor | None]:
    with _on_device(proj.device):
        return _forward_on_device(cell, proj, h0, w_hh, b_hn, lengths, reverse, strategy)


def _forward_on_device(cell: int, proj: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor | None,
                       lengths: Tensor | None, reverse: bool,
                       strategy: str) -> tuple[Tensor, Tensor, Tensor | None]:
    T, B, G = proj.shape
    H = h0.shape[1]
    dtype, device = proj.dtype, proj.device
    # Outputs and h_n come back in the state dtype (float32 for half types):
    # backward differentiates through them, and rounding them first would
    # cost the gradients their accuracy. The layer function narrows them.
    state_dtype = fake.state_dtype(dtype)
    # Zeros past each sequence's end: no step writes there.
    make = torch.zeros if lengths is not None else torch.empty
    output = make(T, B, H, dtype=state_dtype, device=device)
    workspace = make(T, B, 4 * H, dtype=state_dtype, device=device) if cell == GRU else None
    h_n = torch.empty(B, H, dtype=state_dtype, device=device)
    if B == 0:
        return output, h_n, workspace
    p = plan(cell, B, H, dtype, device, strategy)
    kernel, constexprs = p.launches()["forward"]
    ws = output if workspace is None else workspace  # an unread stand-in for the RNN
    w_hh = w_hh.contiguous()
    b_hn = w_hh if b_hn is None else b_hn.contiguous()  # read by the GRU only
    length = _lengths(lengths, T, B, device)
    if p.strategy == "tile":
        kernel[p.grid(B, H)[:1]](proj, w_hh, b_hn, h0.contiguous(), length, output, h_n, ws,
                                 T, B, H, int(reverse), **constexprs)
        return output, h_n, workspace

    state = torch.empty(2, B, H, dtype=state_dtype, device=device)
    state[0] = h0
    barrier = torch.zeros(p.grid(B, H)[0], dtype=torch.int32, device=device)
    stepwise = p.strategy == "stepwise"
    q = torch.empty(B, G, dtype=state_dtype, device=device) if stepwise else proj

    def launch(begin: int, end: int) -> None:
        kernel[p.grid(B, H)](proj, q, w_hh, b_hn, state, length, output, ws, barrier, begin, end,
                             T, B, H, int(reverse), **constexprs)

    if p.grid_sync:
        launch(0, T)
    else:
        # The per-step cuBLAS product runs on the float32 state (float32
        # weights for half types), so that no step's product is rounded.
        w_mm = w_hh.to(state_dtype) if stepwise else None
        for s in range(T):
            if stepwise:
                torch.mm(state[s % 2], w_mm.t(), out=q)
            launch(s, s + 1)
    h_n.copy_(state[T % 2])
    return output, h_n, workspace


def previous_states(output: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """The state each step started from, (T, B, H), at that step's time.

    Zero past a sequence's length: those steps' gate gradients are zero, and
    the state held there (which may be infinite) would make the weight
    product 0 * inf = NaN.
    """
    h0 = h0.to(output.dtype)[None]
    prev = torch.cat([output[1:], h0]) if reverse else torch.cat([h0, output[:-1]])
    if lengths is not None:
        steps = torch.arange(output.shape[0], device=output.device)[:, None, None]
        lengths = lengths.to(output.device)[None, :, None]
        if reverse:
            # A reversed sequence starts from h0 at its own last element.
            prev = torch.where(steps == lengths - 1, h0, prev)
        prev = torch.where(steps < lengths, prev, 0)
    return prev


def _backward(cell: int, grad_output: Tensor, grad_hy: Tensor, x: Tensor, h0: Tensor,
              w_ih: Tensor, w_hh: Tensor, output: Tensor, workspace: Tensor | None,
              lengths: Tensor | None, reverse: bool, input_requires_grad: bool, strategy: str):
    with _on_device(x.device):
        return _backward_on_device(cell, grad_output, grad_hy, x, h0, w_ih, w_hh, output, workspace,
                                   lengths, reverse, input_requires_grad, strategy)


def _backward_on_device(cell: int, grad_output: Tensor, grad_hy: Tensor, x: Tensor, h0: Tensor,
                        w_ih: Tensor, w_hh: Tensor, output: Tensor, workspace: Tensor | None,
                        lengths: Tensor | None, reverse: bool, input_requires_grad: bool,
                        strategy: str):
    T, B, _ = x.shape
    H = h0.shape[1]
    G = w_hh.shape[0]
    dtype, device = x.dtype, x.device
    state_dtype = fake.state_dtype(dtype)
    prev = previous_states(output, h0, lengths, reverse)
    make = torch.zeros if lengths is not None else torch.empty
    dp_hh = make(T, B, G, dtype=state_dtype, device=device)
    dp_ih = make(T, B, G, dtype=state_dtype, device=device) if cell == GRU else dp_hh
    # The gradient reaching the state from later steps; dh0 once the sweep ends.
    carry = grad_hy.to(state_dtype).contiguous().clone()
    if B > 0:
        p = plan(cell, B, H, dtype, device, strategy)
        launches = p.launches()
        w = w_hh.contiguous()
        grad_output = grad_output.contiguous()
        ws = output if workspace is None else workspace  # an unread stand-in for the RNN
        length = _lengths(lengths, T, B, device)
        if p.strategy == "tile":
            kernel, constexprs = launches["backward"]
            kernel[p.grid(B, H)[:1]](grad_output, carry, w, output, prev, ws, length, dp_ih, dp_hh,
                                     carry, T, B, H, int(reverse), **constexprs)
        else:
            stepwise = p.strategy == "stepwise"
            step = torch.empty(B, G, dtype=state_dtype, device=device) if stepwise else dp_hh
            # As in forward: float32 products for half types.
            w_mm = w.to(state_dtype) if stepwise else None
            barrier = torch.zeros(p.grid(B, H)[0], dtype=torch.int32, device=device)

            def launch(kind: str, begin: int, end: int) -> None:
                kernel, constexprs = launches[kind]
                kernel[p.grid(B, H)](grad_output, w, output, prev, ws, length, carry, dp_ih, dp_hh,
                                     step, barrier, begin, end, T, B, H, int(reverse), **constexprs)

            if p.grid_sync:
                launch("backward", 0, T)
            else:
                for i in range(T):
                    launch("backward", i, i + 1)
                    if stepwise:
                        carry.addmm_(step, w_mm)
                    else:
                        launch("backward_recurrent", i, i + 1)
    return _weight_grads(dp_ih, dp_hh, carry, x, h0, w_ih, w_hh, prev, input_requires_grad)


def _weight_grads(dp_ih: Tensor, dp_hh: Tensor, grad_h0: Tensor, x: Tensor, h0: Tensor,
                  w_ih: Tensor, w_hh: Tensor, prev: Tensor, input_requires_grad: bool):
    """dx, dh0, dW_ih, dW_hh, db_ih, db_hh from the sweep's gate gradients."""
    T, B, I = x.shape
    G = dp_hh.shape[2]
    dp_ih2 = dp_ih.reshape(T * B, G)
    dp_hh2 = dp_hh.reshape(T * B, G)
    compute = dp_hh.dtype
    grad_w_ih = (dp_ih2.t() @ x.reshape(T * B, I).to(compute)).to(w_ih.dtype)
    grad_w_hh = (dp_hh2.t() @ prev.reshape(T * B, h0.shape[1]).to(compute)).to(w_hh.dtype)
    grad_b_ih = dp_ih2.sum(0).to(w_ih.dtype)
    grad_b_hh = dp_hh2.sum(0).to(w_hh.dtype)
    if input_requires_grad:
        grad_x = (dp_ih2 @ w_ih.to(compute)).view(T, B, I).to(x.dtype)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_h0.to(h0.dtype), grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


# The layer ops are custom operators, so that torch.compile keeps each as one
# opaque node (with its shapes from ``fastrnn.fake``) instead of tracing the
# launch logic; outputs never alias inputs.
@torch.library.custom_op("fastrnn::triton_rnn_forward", mutates_args=())
def rnn_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                b_hh: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, relu: bool,
                strategy: str) -> tuple[Tensor, Tensor]:
    """tanh/ReLU RNN layer forward: (output (T, B, H), h_n (B, H)), launched by ``strategy``."""
    _check(x, h0, w_ih, w_hh, 1)
    biases = [b for b in (b_ih, b_hh) if b is not None]
    bias = sum(biases[1:], biases[0]) if biases else None
    output, h_n, _ = _forward(RELU if relu else TANH, _project(x, w_ih, bias), h0, w_hh, None,
                              lengths, reverse, strategy)
    return output, h_n


@torch.library.custom_op("fastrnn::triton_rnn_backward", mutates_args=())
def rnn_backward(grad_output: Tensor, grad_hy: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor,
                 w_hh: Tensor, output: Tensor, lengths: Optional[Tensor], reverse: bool,
                 relu: bool, input_requires_grad: bool,
                 strategy: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)."""
    return _backward(RELU if relu else TANH, grad_output, grad_hy, x, h0, w_ih, w_hh, output,
                     None, lengths, reverse, input_requires_grad, strategy)


@torch.library.custom_op("fastrnn::triton_gru_forward", mutates_args=())
def gru_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                b_hh: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                strategy: str) -> tuple[Tensor, Tensor, Tensor]:
    """GRU layer forward: (output, h_n, workspace (T, B, 4H): r | z | n | W_hn h + b_hn)."""
    _check(x, h0, w_ih, w_hh, 3)
    H = h0.shape[1]
    # b_hr and b_hz add straight to the pre-activations, so they join the
    # input projection; b_hn sits inside r * (W_hn h + b_hn) and stays apart.
    bias, b_hn = b_ih, torch.zeros(H, dtype=x.dtype, device=x.device)
    if b_hh is not None:
        folded = torch.cat([b_hh[:2 * H], torch.zeros_like(b_hh[2 * H:])])
        bias = folded if bias is None else bias + folded
        b_hn = b_hh[2 * H:]
    return _forward(GRU, _project(x, w_ih, bias), h0, w_hh, b_hn, lengths, reverse, strategy)


@torch.library.custom_op("fastrnn::triton_gru_backward", mutates_args=())
def gru_backward(grad_output: Tensor, grad_hy: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor,
                 w_hh: Tensor, output: Tensor, workspace: Tensor, lengths: Optional[Tensor],
                 reverse: bool, input_requires_grad: bool,
                 strategy: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)."""
    return _backward(GRU, grad_output, grad_hy, x, h0, w_ih, w_hh, output, workspace, lengths,
                     reverse, input_requires_grad, strategy)


@rnn_forward.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu, strategy):
    return fake.layer_forward(x, h0)


@gru_forward.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, strategy):
    return fake.gru_forward(x, h0)


@rnn_backward.register_fake
def _(grad_output, grad_hy, x, h0, w_ih, w_hh, output, lengths, reverse, relu,
      input_requires_grad, strategy):
    return fake.layer_backward(x, h0, w_ih, w_hh, input_requires_grad)


@gru_backward.register_fake
def _(grad_output, grad_hy, x, h0, w_ih, w_hh, output, workspace, lengths, reverse,
      input_requires_grad, strategy):
    return fake.layer_backward(x, h0, w_ih, w_hh, input_requires_grad)
