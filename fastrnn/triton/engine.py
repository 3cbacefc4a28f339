"""The Triton engine's layer ops: ``layer_forward`` and ``layer_backward`` for
every cell, implementing the schemas of ``fastrnn.ops``.

They are registered when this module is imported: as the CUDA kernels of
``fastrnn::layer_forward`` / ``layer_backward`` and as the CPU kernels of
``fastrnn::triton_layer_forward`` / ``triton_layer_backward`` (the same
kernels on CPU tensors, under the Triton interpreter).

Forward: the input projection of all steps is one GEMM (cuBLAS through
torch), with b_ih and the folded gates' b_hh in its bias; one of three
strategies then runs the time loop (``plan``). Backward: a reverse sweep
writes every step's pre-activation gradients, then dW_ih, dW_hh, the biases
and dx come from GEMMs over all T * B rows. bfloat16 and float16 keep their
state, gates and gradients in float32. What differs between cells is read
from their description (``fastrnn.cells``) and their pointwise math
(``fastrnn.triton.cells``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn import ops
from fastrnn.cells import CELLS, Cell
from fastrnn.settings import setting, settings as thread_settings
from fastrnn.triton.split import split_bwd_kernel, split_fwd_kernel
from fastrnn.triton.tile import tile_bwd_kernel, tile_fwd_kernel

STRATEGIES = ("auto", "tile", "split", "stepwise")
# The cells this engine has kernels for.
KERNEL_CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")

# Largest zero-padded hidden size whose W_hh one tile program keeps in
# registers, by (product form, gates): "gemv" for one-row tiles and float64,
# "fp32" for float32 tl.dot (FMA, IEEE), "half" for bfloat16/float16 tl.dot
# (tensor cores). The ahead-of-time compile test checks that none of these
# spills (tests/triton_aot.py prints the table).
# With a projection W_hr (P, H) beside W_hh (G, P), the tile holds both
# within the same number of weights: (gates + 1) * BLOCK_H * BLOCK_P at most
# gates * the square of the table's BLOCK_H.
TILE_MAX_BLOCK_H = {("gemv", 1): 64, ("gemv", 3): 32, ("gemv", 4): 32,
                    ("fp32", 1): 32, ("fp32", 3): 32, ("fp32", 4): 32,
                    ("half", 1): 128, ("half", 3): 64, ("half", 4): 32}
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


@dataclass(frozen=True)
class Plan:
    """How one layer's recurrence is launched, and the kernels that launch it.

    cell: the cell's description (``fastrnn.cells``); block_b: batch rows
    per program (1: the GEMV form); block_n: hidden units per program (the
    whole padded H for "tile"); block_k: the reduction chunk of the split
    product (the whole padded width of h for "tile"); projects: the layer
    has a projection W_hr; gpu: compiled for a GPU (else run by the interpreter);
    cooperative: the GPU launches cooperative grids, which alone guarantee
    that every program of a persistent split is resident at once. Without
    both, "split" launches once per step and phase instead of syncing its
    grid at a barrier.
    """

    strategy: str
    block_b: int
    block_n: int
    block_k: int
    use_dot: bool
    num_warps: int
    cell: Cell
    state_dtype: tl.dtype
    dot_dtype: tl.dtype
    precision: str
    gpu: bool
    projects: bool = False
    cooperative: bool = False
    backward_warps: int | None = None  # when backward differs from num_warps

    def _register_bound(self, warps: int, backward: bool = False) -> dict:
        """The ``maxnreg`` launch option, where the installed Triton has it and
        the kernel needs it: a whole SM's 65536 registers over one program's
        threads, at most 255 a thread. Without one ptxas aims lower and
        spills a value or two in the tile and split kernels; with one it
        spills in the stepwise kernel and the float32 tl.dot tile backward,
        which get none (tests/triton_aot.py checks every configuration)."""
        fp32_dot = self.use_dot and self.dot_dtype == tl.float32
        if not _MAXNREG or self.strategy == "stepwise" or (
                self.strategy == "tile" and backward and fp32_dot):
            return {}
        return {"maxnreg": min(255, 65536 // (32 * warps))}

    @property
    def grid_sync(self) -> bool:
        """Whether one persistent launch runs every step, its programs meeting at a grid barrier."""
        return self.strategy == "split" and self.gpu and self.cooperative

    def grid(self, B: int, H: int) -> tuple[int, int]:
        """The launch grid: (batch tiles, hidden-unit blocks)."""
        return triton.cdiv(B, self.block_b), triton.cdiv(H, self.block_n)

    def launches(self, bias: bool = True, workspace: bool = True) -> dict:
        """Kernel and compile-time arguments per launch kind: "forward",
        "backward" and, for an unsynced split, "backward_recurrent", for a
        layer with or without biases whose forward does or does not save
        the workspace.

        The compile-time arguments include the pointer arguments a launch
        leaves out, as None (Triton compiles their uses out): the in-loop
        hidden bias B_HH (no bias, or every gate's folds), the workspace WS
        (nothing saved), the separate input-side gradients DP_IH (every
        gate folded: they are DP_HH), the stepwise products Q and DP_STEP
        (not stepwise) and the grid barrier's counters BARRIER (not synced);
        the cell state's (one state), and the projection's (none).

        A split with a projection also launches, unsynced, "forward_project"
        after each step's "forward" and "backward_projected" before its
        "backward".
        """
        cell = self.cell
        two_states = len(cell.states) > 1
        common = dict(CELL=cell.name, GATES=cell.gates, SAVED=cell.saved, BLOCK_B=self.block_b,
                      USE_DOT=self.use_dot, DOT_DTYPE=self.dot_dtype,
                      STATE_DTYPE=self.state_dtype, PRECISION=self.precision,
                      num_warps=self.num_warps)
        forward = dict(FOLDED=cell.folded_gates, **self._register_bound(self.num_warps))
        if not (bias and cell.folded_gates < cell.gates):
            forward["B_HH"] = None
        if not (workspace and cell.saved):
            forward["WS"] = None
        backward_warps = self.backward_warps or self.num_warps
        backward = {"num_warps": backward_warps,
                    **self._register_bound(backward_warps, backward=True)}
        if not cell.saved:
            backward["WS"] = None
        if cell.folded_gates == cell.gates:
            backward["DP_IH"] = None
        if not self.projects:
            forward["W_HR"] = None
            backward.update(W_HR=None, DH=None, UNPROJECTED=None)
        if not two_states:
            backward["PREV_C"] = None
        if self.strategy == "tile":
            if not two_states:
                forward.update(C0=None, C_N=None)
                backward.update(GRAD_CN=None, GRAD_C0=None)
            blocks = dict(BLOCK_H=self.block_n, BLOCK_K=self.block_k)
            return {"forward": (tile_fwd_kernel, dict(common, **forward, **blocks)),
                    "backward": (tile_bwd_kernel, dict(common, **backward, **blocks))}
        if not two_states:
            forward["C"] = None
            backward["DC"] = None
        if not self.projects:
            forward["M"] = None
        if not (self.projects and self.strategy == "stepwise"):
            forward["HR"] = None
            backward.update(DM=None, DH_STEP=None)
        # No software pipelining: its async copies may go through L1, and the
        # state other programs wrote must be read past it.
        common.update(BLOCK_N=self.block_n, BLOCK_K=self.block_k, num_stages=1,
                      GRID_SYNC=self.grid_sync)
        if self.grid_sync:
            # The driver schedules all programs together or fails the launch,
            # rather than leaving some spinning at the barrier for SMs that
            # another stream's kernels hold.
            common["launch_cooperative_grid"] = True
        else:
            common["BARRIER"] = None
        if self.strategy != "stepwise":
            forward["Q"] = None
            backward["DP_STEP"] = None
        sync = self.grid_sync
        project = sync and self.projects
        kinds = {"forward": (split_fwd_kernel, dict(common, **forward, CELL_PHASE=True,
                                                    PROJECT=project)),
                 "backward": (split_bwd_kernel, dict(common, **backward, PROJECTED=project,
                                                     POINTWISE=True, RECURRENT=sync))}
        if self.projects and not sync:
            kinds["forward_project"] = (split_fwd_kernel, dict(
                common, **forward, CELL_PHASE=False, PROJECT=True))
            kinds["backward_projected"] = (split_bwd_kernel, dict(
                common, **backward, PROJECTED=True, POINTWISE=False, RECURRENT=False))
        if self.strategy == "split" and not sync:
            kinds["backward_recurrent"] = (split_bwd_kernel, dict(
                common, **backward, PROJECTED=False, POINTWISE=False, RECURRENT=True))
        return kinds


def _cuda_option_supported(name: str) -> bool:
    """Whether the installed Triton's CUDA backend takes the launch option ``name``."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return name in getattr(CUDAOptions, "__dataclass_fields__", {})


_COOPERATIVE_LAUNCH = _cuda_option_supported("launch_cooperative_grid")
_MAXNREG = _cuda_option_supported("maxnreg")
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


def plan(cell: Cell | str, B: int, H: int, dtype: torch.dtype, device: torch.device,
         strategy: str | None = None, projection: int = 0) -> Plan:
    """The launch plan for a layer of ``cell`` (its description or its name)
    under ``strategy`` (default: the one in force on this thread,
    ``use_strategy``), with a projection to ``projection`` units (0: none).

    auto: "stepwise" from STEPWISE_MIN_BATCH rows; else "tile" when W_hh fits
    one program; else "split" when its grid fits the SMs and, on a GPU,
    launches cooperatively; else "stepwise". A forced strategy that cannot
    run the shape raises RuntimeError.
    """
    cell = CELLS[cell] if isinstance(cell, str) else cell
    gates = cell.gates
    gpu = device.type == "cuda"
    gemv = B == 1 or dtype == torch.float64
    state = tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter's tl.dot is exact in float32 but wrong on half operands.
    dot = state if gemv or not gpu else _TL_DTYPES[dtype]
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and dtype == torch.float32 else "ieee"
    cooperative = _cooperative(device)
    make = functools.partial(Plan, cell=cell, state_dtype=state, dot_dtype=dot,
                             precision=precision, gpu=gpu, projects=projection > 0,
                             cooperative=cooperative)

    block_h = max(16, triton.next_power_of_2(H))
    block_p = max(16, triton.next_power_of_2(projection)) if projection else block_h
    form = "gemv" if gemv else ("fp32" if dtype == torch.float32 else "half")
    tile_max = TILE_MAX_BLOCK_H[(form, gates)]
    tile_fits = (block_h <= tile_max and
                 (gates + (projection > 0)) * block_h * block_p <= gates * tile_max ** 2)
    # Warps per program: where ptxas spills no configuration, forward and
    # backward apart (tests/triton_aot.py checks each one). The LSTM's
    # tiles spilled at 16 warps (128 registers a thread) in half types and
    # in float32's forward.
    lstm = gates == 4
    wide = 8 if lstm else (16 if gates == 3 or block_h >= 128 else 8)
    tile = make("tile", 1 if gemv else 16, block_h, block_p, not gemv,
                (4 if lstm else 2) if gemv else (wide if form == "half" or lstm else 16),
                backward_warps=4 if gemv or form == "fp32" else wide)
    stepwise = make("stepwise", 16, 32, 32, False, 4)
    # Persistent split: every program must be resident for the grid barrier.
    split_b = 1 if gemv else 16
    split_fits = (triton.cdiv(B, split_b) * triton.cdiv(H, SPLIT_BLOCK_N) <= _sm_count(device)
                  or not gpu)
    # float64 RNN at 64 spilled the unsynced forward on sm_90 (8 warps).
    if dtype == torch.float64 and gates == 1:
        split_k = 32
    else:
        split_k = 64 if gemv else (32 if gates >= 3 else 16)
    split_warps = 8 if gemv or (gates == 3 and form == "fp32") else 4
    split = make("split", split_b, SPLIT_BLOCK_N, split_k, not gemv, split_warps)

    forced = thread_settings.triton_strategy if strategy is None else strategy
    if forced == "tile" and not tile_fits:
        raise RuntimeError(f"fastrnn Triton strategy 'tile' holds W_hh in registers only up to "
                           f"hidden size {tile_max} here (less with a projection), got {H}"
                           + (f" projected to {projection}" if projection else ""))
    if forced == "split" and not split_fits:
        raise RuntimeError(f"fastrnn Triton strategy 'split' needs a grid of at most "
                           f"{_sm_count(device)} programs, batch {B} x hidden {H} needs more")
    if forced != "auto":
        return {"tile": tile, "split": split, "stepwise": stepwise}[forced]
    if B >= STEPWISE_MIN_BATCH:
        return stepwise
    if tile_fits:
        return tile
    return split if split_fits and (cooperative or not gpu) else stepwise


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


def _lengths(lengths: Tensor | None, T: int, B: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32)


def _check(cell: Cell, x: Tensor, hx: list[Tensor], w_ih: Tensor, w_hh: Tensor,
           w_hr: Tensor | None) -> None:
    if len(hx) != len(cell.states):
        raise RuntimeError(f"fastrnn: a {cell.name} layer takes {len(cell.states)} state tensors, "
                           f"got {len(hx)}")
    if cell.name not in KERNEL_CELLS:
        raise RuntimeError(f"fastrnn: the Triton engine has no kernels for {cell.name} yet; "
                           "use fastrnn.use_backend('reference') for it on this device")
    if w_hr is not None and not cell.projects:
        raise RuntimeError(f"fastrnn: a {cell.name} layer takes no weight_hr")
    h0 = hx[0]
    if x.dim() != 3 or any(h.dim() != 2 for h in hx) or w_ih.dim() != 2 or w_hh.dim() != 2:
        raise RuntimeError("fastrnn: expected input (T, B, I), hx (B, H), weight_ih (G, I), weight_hh (G, H)")
    T, B, I = x.shape
    H = w_hh.shape[0] // cell.gates
    K = h0.shape[1]
    shapes_ok = (h0.shape[0] == B and w_ih.shape == (cell.gates * H, I)
                 and w_hh.shape == (cell.gates * H, K)
                 and all(c.shape == (B, H) for c in hx[1:])
                 and (w_hr.shape == (K, H) if w_hr is not None else K == H))
    if not shapes_ok:
        raise RuntimeError(
            f"fastrnn: inconsistent layer shapes: input {tuple(x.shape)}, hx "
            f"{[tuple(h.shape) for h in hx]}, weight_ih {tuple(w_ih.shape)}, weight_hh "
            f"{tuple(w_hh.shape)}, weight_hr {None if w_hr is None else tuple(w_hr.shape)}")
    # The split grid's programs own H's units; h's columns must fall within them.
    if w_hr is not None and K >= H:
        raise RuntimeError(f"fastrnn: a projection must be smaller than the hidden size "
                           f"({H}), got {K}")


def _input_bias(cell: Cell, b_ih: Tensor | None, b_hh: Tensor | None, H: int) -> Tensor | None:
    """The bias of the hoisted input projection: b_ih plus the hidden-side
    biases of the folded gates (those adding straight to the pre-activation);
    the other gates' b_hh stays in the time loop."""
    if b_hh is not None and cell.folded_gates < cell.gates:
        folded = cell.folded_gates * H
        b_hh = torch.cat([b_hh[:folded], torch.zeros_like(b_hh[folded:])])
    if b_hh is None or b_ih is None:
        return b_ih if b_hh is None else b_hh
    return b_ih + b_hh


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """x W_ih^T + bias for all steps at once: (T, B, G)."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    proj = torch.mm(x2, w_ih.t()) if bias is None else torch.addmm(bias, x2, w_ih.t())
    return proj.view(T, B, w_ih.shape[0])


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device and its stream: make them the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launcher(kernel, grid, constexprs: dict, **args):
    """``kernel`` on ``grid`` with ``args`` (by name) and ``constexprs``: calling
    the result launches it, with keyword arguments overriding ``args`` (the
    step range). A pointer ``launches()`` leaves out (None) must come as
    None, and every other as a tensor: Python rejects the call otherwise."""
    present = {name: value for name, value in args.items() if value is not None}
    launch = kernel[grid]

    def run(**step):
        launch(**{**present, **step}, **constexprs)

    return run


def layer_forward(cell: str, input: Tensor, hx: list[Tensor], weight_ih: Tensor, weight_hh: Tensor,
                  bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None,
                  lengths: Tensor | None, reverse: bool, save_workspace: bool,
                  strategy: str) -> tuple[Tensor, list[Tensor], Tensor]:
    """One layer's forward (``fastrnn::layer_forward``): (output (T, B, K), the
    final states, workspace (T, B, saved * H), or (0,) without
    ``save_workspace``), all in the state dtype, launched by ``strategy``.
    K is H, or P with a projection ``weight_hr`` (P, H)."""
    desc = CELLS[cell]
    _check(desc, input, hx, weight_ih, weight_hh, weight_hr)
    H = weight_hh.shape[0] // desc.gates
    proj = _project(input, weight_ih, _input_bias(desc, bias_ih, bias_hh, H))
    # The unfolded gates' b_hh, which the kernels add inside the loop.
    loop_bias = (bias_hh[desc.folded_gates * H:]
                 if bias_hh is not None and desc.folded_gates < desc.gates else None)
    with _on_device(input.device):
        return _forward(desc, proj, hx, weight_hh, weight_hr, loop_bias, lengths, reverse,
                        save_workspace, strategy)


def _forward(cell: Cell, proj: Tensor, hx: list[Tensor], w_hh: Tensor, w_hr: Tensor | None,
             b_hh: Tensor | None, lengths: Tensor | None, reverse: bool, save_workspace: bool,
             strategy: str) -> tuple[Tensor, list[Tensor], Tensor]:
    """The time loop over the input projection ``proj``; ``b_hh``: the hidden
    biases of the unfolded gates, which stay in the loop (None: none)."""
    T, B, G = proj.shape
    H = G // cell.gates
    K = hx[0].shape[1]
    dtype, device = proj.dtype, proj.device
    # Outputs and states come back in the state dtype (float32 for half
    # types): backward differentiates through them, and rounding them first
    # would cost the gradients their accuracy. The layer function narrows them.
    state_dtype = ops.state_dtype(dtype)
    # Zeros past each sequence's end: no step writes there.
    make = torch.zeros if lengths is not None else torch.empty
    output = make(T, B, K, dtype=state_dtype, device=device)
    workspace = (make(T, B, cell.saved * H, dtype=state_dtype, device=device) if save_workspace
                 else torch.empty(0, dtype=state_dtype, device=device))
    h_n = torch.empty(B, K, dtype=state_dtype, device=device)
    # The cell state (if any) is updated in place, ending as c_n.
    c_n = hx[1].to(state_dtype).contiguous().clone() if len(hx) > 1 else None
    finals = [h_n] if c_n is None else [h_n, c_n]
    if B == 0:
        return output, finals, workspace
    p = plan(cell, B, H, dtype, device, strategy, K if w_hr is not None else 0)
    saves = save_workspace and cell.saved > 0
    launches = p.launches(bias=b_hh is not None, workspace=saves)
    args = dict(P=proj, W=w_hh.contiguous(), W_HR=None if w_hr is None else w_hr.contiguous(),
                B_HH=None if b_hh is None else b_hh.contiguous(),
                LENGTHS=_lengths(lengths, T, B, device), OUT=output,
                WS=workspace if saves else None, T=T, B=B, H=H, K=K, reverse=int(reverse))
    if p.strategy == "tile":
        kernel, constexprs = launches["forward"]
        _launcher(kernel, p.grid(B, H)[:1], constexprs, H0=hx[0].contiguous(), H_N=h_n,
                  C0=c_n, C_N=c_n, **args)()
        return output, finals, workspace

    state = torch.empty(2, B, K, dtype=state_dtype, device=device)
    state[0] = hx[0]
    stepwise = p.strategy == "stepwise"
    q = torch.empty(B, G, dtype=state_dtype, device=device) if stepwise else None
    # With a projection: each step's o tanh c, and (stepwise) the host's product of it.
    m = torch.zeros(B, H, dtype=state_dtype, device=device) if w_hr is not None else None
    hr = torch.empty(B, K, dtype=state_dtype, device=device) if stepwise and m is not None else None
    barrier = torch.zeros(p.grid(B, H)[0], dtype=torch.int32, device=device) if p.grid_sync else None
    run = {kind: _launcher(kernel, p.grid(B, H), constexprs, Q=q, STATE=state, C=c_n, M=m, HR=hr,
                           BARRIER=barrier, **args)
           for kind, (kernel, constexprs) in launches.items() if kind.startswith("forward")}
    if p.grid_sync:
        run["forward"](step_begin=0, step_end=T)
    else:
        # The per-step cuBLAS products run on the float32 state (float32
        # weights for half types), so that no step's product is rounded.
        w_mm = w_hh.to(state_dtype) if stepwise else None
        w_hr_mm = w_hr.to(state_dtype) if hr is not None else None
        for s in range(T):
            if stepwise:
                torch.mm(state[s % 2], w_mm.t(), out=q)
            run["forward"](step_begin=s, step_end=s + 1)
            if m is not None:
                if hr is not None:
                    torch.mm(m, w_hr_mm.t(), out=hr)
                run["forward_project"](step_begin=s, step_end=s + 1)
    h_n.copy_(state[T % 2])
    return output, finals, workspace


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


def layer_backward(cell: str, grad_output: Tensor, grad_hy: list[Tensor], input: Tensor,
                   hx: list[Tensor], weight_ih: Tensor, weight_hh: Tensor,
                   weight_hr: Tensor | None, output: Tensor, workspace: Tensor,
                   lengths: Tensor | None, reverse: bool, input_requires_grad: bool,
                   hx_requires_grad: bool, strategy: str):
    """One layer's backward (``fastrnn::layer_backward``): (grad_input, grad_hx,
    grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr
    (empty without a projection)); grad_input is empty unless
    ``input_requires_grad``, each of grad_hx unless ``hx_requires_grad``.
    ``output`` and ``workspace`` are what forward returned (with
    ``save_workspace``)."""
    desc = CELLS[cell]
    _check(desc, input, hx, weight_ih, weight_hh, weight_hr)
    T, B, _ = input.shape
    H = weight_hh.shape[0] // desc.gates
    if workspace.shape != (T, B, desc.saved * H):
        raise RuntimeError(f"fastrnn: {cell} backward reads the workspace its forward saved, "
                           f"({T}, {B}, {desc.saved * H}), got {tuple(workspace.shape)} (forward "
                           "without save_workspace?)")
    with _on_device(input.device):
        grad_x, grad_hx, *grad_weights = _backward(
            desc, grad_output, grad_hy, input, hx, weight_ih, weight_hh, weight_hr, output,
            workspace, lengths, reverse, input_requires_grad, strategy)
    if not hx_requires_grad:  # computed on the way (the kernels carry it), not returned
        grad_hx = [h.new_empty(0) for h in grad_hx]
    return (grad_x, grad_hx, *grad_weights)


def _backward(cell: Cell, grad_output: Tensor, grad_hy: list[Tensor], x: Tensor, hx: list[Tensor],
              w_ih: Tensor, w_hh: Tensor, w_hr: Tensor | None, output: Tensor, workspace: Tensor,
              lengths: Tensor | None, reverse: bool, input_requires_grad: bool, strategy: str):
    T, B, _ = x.shape
    G = w_hh.shape[0]
    H = G // cell.gates
    K = hx[0].shape[1]
    dtype, device = x.dtype, x.device
    state_dtype = ops.state_dtype(dtype)
    prev = previous_states(output, hx[0], lengths, reverse)
    # A second state is saved last in each step's workspace row (fastrnn.cells).
    prev_c = (previous_states(workspace[..., (cell.saved - 1) * H:], hx[1], lengths, reverse)
              if len(hx) > 1 else None)
    make = torch.zeros if lengths is not None else torch.empty
    dp_hh = make(T, B, G, dtype=state_dtype, device=device)
    # The input side's gradients differ from the hidden side's in the
    # unfolded gates only (the GRU's n: dn against dn r).
    separate = cell.folded_gates < cell.gates
    dp_ih = make(T, B, G, dtype=state_dtype, device=device) if separate else dp_hh
    # With a projection: the gradient reaching each step's h, and the step's
    # output before the projection, for dW_hr.
    projects = w_hr is not None
    dh = make(T, B, K, dtype=state_dtype, device=device) if projects else None
    unprojected = make(T, B, H, dtype=state_dtype, device=device) if projects else None
    # The gradients reaching the states from later steps; dh0 (dc0) once the sweep ends.
    carry = grad_hy[0].to(state_dtype).contiguous().clone()
    dc = grad_hy[1].to(state_dtype).contiguous().clone() if len(hx) > 1 else None
    if B > 0:
        p = plan(cell, B, H, dtype, device, strategy, K if projects else 0)
        launches = p.launches()
        args = dict(GRAD_OUT=grad_output.contiguous(), W=w_hh.contiguous(),
                    W_HR=w_hr.contiguous() if projects else None, OUT=output, PREV=prev,
                    PREV_C=prev_c, WS=workspace.contiguous() if cell.saved else None,
                    LENGTHS=_lengths(lengths, T, B, device), DP_IH=dp_ih if separate else None,
                    DP_HH=dp_hh, DH=dh, UNPROJECTED=unprojected, T=T, B=B, H=H, K=K,
                    reverse=int(reverse))
        if p.strategy == "tile":
            kernel, constexprs = launches["backward"]
            _launcher(kernel, p.grid(B, H)[:1], constexprs, GRAD_HN=carry, GRAD_H0=carry,
                      GRAD_CN=dc, GRAD_C0=dc, **args)()
        else:
            stepwise = p.strategy == "stepwise"
            step = torch.empty(B, G, dtype=state_dtype, device=device) if stepwise else None
            dh_step = torch.empty(B, K, dtype=state_dtype, device=device) if stepwise and projects else None
            dm = torch.empty(B, H, dtype=state_dtype, device=device) if stepwise and projects else None
            # As in forward: float32 products for half types.
            w_mm = w_hh.to(state_dtype) if stepwise else None
            w_hr_mm = w_hr.to(state_dtype) if dm is not None else None
            barrier = (torch.zeros(p.grid(B, H)[0], dtype=torch.int32, device=device)
                       if p.grid_sync else None)
            run = {kind: _launcher(kernel, p.grid(B, H), constexprs, CARRY=carry, DC=dc,
                                   DP_STEP=step, DH_STEP=dh_step, DM=dm, BARRIER=barrier, **args)
                   for kind, (kernel, constexprs) in launches.items()
                   if kind.startswith("backward")}
            if p.grid_sync:
                run["backward"](step_begin=0, step_end=T)
            else:
                for i in range(T):
                    if projects:
                        run["backward_projected"](step_begin=i, step_end=i + 1)
                        if stepwise:
                            torch.mm(dh_step, w_hr_mm, out=dm)
                    run["backward"](step_begin=i, step_end=i + 1)
                    if stepwise:
                        carry.addmm_(step, w_mm)
                    else:
                        run["backward_recurrent"](step_begin=i, step_end=i + 1)
    grad_states = [carry] if dc is None else [carry, dc]
    grads = _weight_grads(dp_ih, dp_hh, x, w_ih, w_hh, prev, input_requires_grad)
    grad_w_hr = ((dh.reshape(T * B, K).t() @ unprojected.reshape(T * B, H)).to(w_hr.dtype)
                 if projects else w_hh.new_empty(0))
    grad_x = grads[0]
    return (grad_x, [g.to(h.dtype) for g, h in zip(grad_states, hx)], *grads[1:], grad_w_hr)


def _weight_grads(dp_ih: Tensor, dp_hh: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor,
                  prev: Tensor, input_requires_grad: bool):
    """dx, dW_ih, dW_hh, db_ih, db_hh from the sweep's gate gradients."""
    T, B, I = x.shape
    G = dp_hh.shape[2]
    dp_ih2 = dp_ih.reshape(T * B, G)
    dp_hh2 = dp_hh.reshape(T * B, G)
    compute = dp_hh.dtype
    grad_w_ih = (dp_ih2.t() @ x.reshape(T * B, I).to(compute)).to(w_ih.dtype)
    grad_w_hh = (dp_hh2.t() @ prev.reshape(T * B, prev.shape[2]).to(compute)).to(w_hh.dtype)
    grad_b_ih = dp_ih2.sum(0).to(w_ih.dtype)
    grad_b_hh = dp_hh2.sum(0).to(w_hh.dtype)
    if input_requires_grad:
        grad_x = (dp_ih2 @ w_ih.to(compute)).view(T, B, I).to(x.dtype)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


# The engine's kernels for the ops ``fastrnn.ops`` defines: the device-
# dispatched pair's on CUDA tensors, the interpreter pair's on CPU tensors.
_library = torch.library.Library("fastrnn", "IMPL")
for (_forward_op, _backward_op), _device in ((ops.DISPATCHED, "CUDA"), (ops.INTERPRETED, "CPU")):
    _library.impl(_forward_op, layer_forward, _device)
    _library.impl(_backward_op, layer_backward, _device)
