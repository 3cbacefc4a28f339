"""What the benchmark times, and how.

A ``Case`` is one (cell, dtype, batch, hidden, steps, mode); a provider
builds a callable running it: ``"fastrnn"``, ``"torch"`` (torch.nn: cuDNN
on CUDA, PyTorch's own kernels on CPU) or ``"reference"`` (fastrnn's plain
PyTorch loop, on tiny shapes only). The sequence modes run a layer once over
``steps`` steps; the step modes make ``steps`` calls of one step each (a cell,
or a layer over a length-1 sequence) carrying the state from call to call,
as generation (``step``, without grad) and teacher-forced training
(``step_backward``, a backward after every call) do, and report the time per call. ``time_calls`` times the providers' callables of one case
by turns after warm-up and returns each one's median with the 20th and 80th
percentiles; on CUDA each call is timed between CUDA events and
synchronised, so the time is the GPU's.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import fastrnn
from fastrnn.cells import CELLS as DESCRIPTIONS

# Benchmarked cells: (its description, the torch.nn module, fastrnn's, the
# projection size as a fraction of the hidden size or 0).
CELLS = {"rnn": (DESCRIPTIONS["rnn_tanh"], torch.nn.RNN, fastrnn.RNN, 0),
         "gru": (DESCRIPTIONS["gru"], torch.nn.GRU, fastrnn.GRU, 0),
         "lstm": (DESCRIPTIONS["lstm"], torch.nn.LSTM, fastrnn.LSTM, 0),
         "lstm_proj": (DESCRIPTIONS["lstm"], torch.nn.LSTM, fastrnn.LSTM, 0.5),
         "rnn_cell": (DESCRIPTIONS["rnn_tanh"], torch.nn.RNNCell, fastrnn.RNNCell, 0),
         "gru_cell": (DESCRIPTIONS["gru"], torch.nn.GRUCell, fastrnn.GRUCell, 0),
         "lstm_cell": (DESCRIPTIONS["lstm"], torch.nn.LSTMCell, fastrnn.LSTMCell, 0)}
SEQUENCE_MODES = ("forward", "forward_backward")
STEP_MODES = ("step", "step_backward")
MODES = SEQUENCE_MODES + STEP_MODES
PROVIDERS = ("fastrnn", "torch", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# The reference loop is there to show what a Python time loop costs; beyond
# this many (steps x batch x hidden) it only slows the run down.
REFERENCE_MAX_WORK = 100 * 16 * 64


@dataclass(frozen=True)
class Case:
    cell: str
    dtype: str
    batch: int
    hidden: int
    steps: int
    mode: str

    @property
    def input_size(self) -> int:
        """The benchmark's layers take inputs as wide as their hidden state."""
        return self.hidden

    @property
    def proj_size(self) -> int:
        """The LSTM's projection size (``proj_size``), 0 for none."""
        return int(CELLS[self.cell][3] * self.hidden)

    @property
    def calls(self) -> int:
        """How many module calls one timed run makes: ``steps`` in the step modes."""
        return self.steps if self.mode in STEP_MODES else 1

    def flops(self) -> float:
        """Multiply-adds x 2 of the layer's GEMMs: the input projection, the
        recurrent product each step and the output projection if any;
        backward does twice forward's."""
        gates = CELLS[self.cell][0].gates * self.hidden
        state = self.proj_size or self.hidden
        per_row = gates * (self.input_size + state) + self.proj_size * self.hidden
        forward = 2.0 * self.steps * self.batch * per_row
        return forward if self.mode in ("forward", "step") else 3.0 * forward


def is_cell(cell: str) -> bool:
    """Whether ``cell`` names a single-step module (``RNNCell`` and its kin)."""
    return cell.endswith("_cell")


def runs_mode(cell: str, mode: str) -> bool:
    """Whether ``cell`` is benchmarked in ``mode``: cells in the step modes only."""
    return mode in STEP_MODES or not is_cell(cell)


def runs_provider(provider: str, case: Case) -> bool:
    """Whether ``provider`` is timed on ``case`` (the reference loop only on
    tiny shapes and not call by call)."""
    if provider == "reference":
        if case.mode in STEP_MODES:
            return False
        return case.steps * case.batch * case.hidden <= REFERENCE_MAX_WORK
    return True


def make_call(provider: str, case: Case, device: torch.device,
              backend: str = "auto") -> Callable[[], None]:
    """A callable running ``case`` once with ``provider``'s implementation;
    fastrnn's under ``fastrnn.use_backend(backend)``."""
    _, torch_cls, fast_cls, _ = CELLS[case.cell]
    dtype = DTYPES[case.dtype]
    generator = torch.manual_seed(0)
    extra = {"proj_size": case.proj_size} if case.proj_size else {}
    module = (torch_cls if provider == "torch" else fast_cls)(case.input_size, case.hidden, **extra)
    module.to(device=device, dtype=dtype)
    backend = "reference" if provider == "reference" else backend
    if case.mode in STEP_MODES:
        return _step_call(module, case, device, dtype, backend, generator)
    x = torch.randn(case.steps, case.batch, case.input_size, generator=generator).to(device, dtype)
    training = case.mode == "forward_backward"
    x.requires_grad_(training)

    def call() -> None:
        with fastrnn.use_backend(backend), torch.set_grad_enabled(training):
            result = module(x)
            if training:
                _backward_all(result)

    return call


def _backward_all(result) -> None:
    """Backward from every tensor a module returned (an output, a state, a
    tuple of states, nested as the module nests them), with gradients of ones."""
    outputs = [t for part in (result if isinstance(result, tuple) else (result,))
               for t in (part if isinstance(part, tuple) else (part,))]
    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _step_call(module: torch.nn.Module, case: Case, device: torch.device, dtype: torch.dtype,
               backend: str, generator: torch.Generator) -> Callable[[], None]:
    """``case.steps`` single-step calls of ``module``, each given the state the
    last one returned; with ``step_backward`` a backward after each call (the
    state carried on detached, its inputs leaves of their own)."""
    cell = is_cell(case.cell)
    shape = (case.batch, case.input_size) if cell else (1, case.batch, case.input_size)
    training = case.mode == "step_backward"
    inputs = [torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(training)
              for _ in range(case.steps)]

    def state_of(result):
        # A cell returns its state(s); a layer (output, state(s)).
        return result if cell else result[1]

    def call() -> None:
        with fastrnn.use_backend(backend), torch.set_grad_enabled(training):
            state = None
            for x in inputs:
                result = module(x, state)
                state = state_of(result)
                if training:
                    _backward_all(result)
                    state = (tuple(t.detach() for t in state) if isinstance(state, tuple)
                             else state.detach())

    return call


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], None], device: torch.device) -> float:
    """Seconds one call takes: between CUDA events on the current stream on
    a GPU (the launches from Python included), by the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def _timing(times: list[float]) -> dict:
    """Median, 20th and 80th percentile of ``times``, and their count."""
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {"median_s": statistics.median(times), "p20_s": deciles[1], "p80_s": deciles[7],
            "runs": len(times)}


def balanced_order(n: int) -> list[int]:
    """A cycle through ``n`` calls in which each call runs right after each
    other call once (an Eulerian circuit of the complete directed graph on
    them, by Hierholzer's algorithm), so each runs n - 1 times a cycle. A
    call finds the caches and the threads as the call before left them:
    timed in a fixed order, even one rotated from round to round, each call
    would mostly follow the same other one (bench/NOTES.md)."""
    if n == 1:
        return [0]
    unused = {call: [other for other in range(n) if other != call] for call in range(n)}
    path, cycle = [0], []
    while path:
        if unused[path[-1]]:
            path.append(unused[path[-1]].pop())
        else:
            cycle.append(path.pop())
    return cycle[::-1][:-1]  # the circuit ends where it starts


def time_calls(calls: dict[str, Callable[[], None]], device: torch.device,
               min_run_time: float = 0.3, min_runs: int = 5) -> dict[str, dict]:
    """Median, 20th and 80th percentile seconds of each of ``calls`` (by
    name), after one warm-up call each. The calls take turns in whole cycles
    of ``balanced_order``, for ``min_run_time`` seconds per call in all: a
    machine whose speed drifts (a shared or throttled CPU) then slows every
    call alike, and their ratios hold where their separate times would not.
    Each call runs a multiple of n - 1 times for n calls, at least
    ``min_runs``."""
    names = list(calls)
    order = balanced_order(len(names))
    # Warmed up in the order that ends where the cycle does, so that the
    # first timed call follows the call it follows in every cycle.
    last = order[-1]
    for i in range(1, len(names) + 1):
        calls[names[(last + i) % len(names)]]()
    _synchronize(device)
    times = {name: [] for name in names}
    start = time.perf_counter()
    runs = 0
    while (runs % len(order) or min(len(t) for t in times.values()) < min_runs
           or time.perf_counter() - start < min_run_time * len(calls)):
        name = names[order[runs % len(order)]]
        times[name].append(_timed(calls[name], device))
        runs += 1
    return {name: _timing(t) for name, t in times.items()}


def time_call(call: Callable[[], None], device: torch.device, min_run_time: float = 0.3,
              min_runs: int = 5) -> dict:
    """Median, 20th and 80th percentile seconds of ``call``, after one warm-up call."""
    return time_calls({"call": call}, device, min_run_time, min_runs)["call"]


def gemm_call(device: torch.device, dtype: torch.dtype = torch.float32,
              size: int | None = None) -> tuple[Callable[[], None], float]:
    """A square GEMM (torch.mm) on ``device`` and its FLOP count: the
    yardstick for the FLOP/s the recurrences reach."""
    size = size or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * size ** 3


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
              min_run_time: float = 0.5) -> float:
    """The machine's own square-GEMM rate in FLOP/s, on its own."""
    call, flops = gemm_call(device, dtype, size)
    return flops / time_call(call, device, min_run_time)["median_s"]


def device_name(device: torch.device) -> str:
    """A readable name for the machine that runs ``device``: the GPU, or the CPU model and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    """The torch, triton (None if absent) and fastrnn versions, for each record."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fastrnn": fastrnn.__version__}


def record(case: Case, provider: str, timing: dict, machine: dict, rate: float) -> dict:
    """One result row: the case, the provider, its timing, the machine
    (``device`` name and versions, gathered once per run), the FLOP/s it
    reached, and that as a fraction of ``rate``, the GEMM rate measured in the
    case's own turns (``gemm_flops``)."""
    achieved = case.flops() / timing["median_s"]
    return {**asdict(case), "provider": provider, **timing,
            "per_call_s": timing["median_s"] / case.calls, **machine, "flops": case.flops(),
            "achieved_flops": achieved, "gemm_flops": rate,
            "gemm_fraction": achieved / rate if rate and math.isfinite(rate) else None}
