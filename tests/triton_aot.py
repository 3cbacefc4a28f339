"""Ahead-of-time compilation of the Triton kernels fastrnn ships, without a GPU.

``shipped_configs`` asks the engine's own planner which kernel
configurations it launches on a GPU over a grid of cells, dtypes, batch and
hidden sizes and strategies; ``compile_config`` builds one for an NVIDIA
architecture and reads its register, stack, local and shared memory use off
the cubin with cuobjdump.

Run as a script to print the table: ``python tests/triton_aot.py`` (with
``--json``, the rows as JSON). It must run without TRITON_INTERPRET=1,
under which the kernels are interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastrnn.cells import CELLS as CELL_DESCRIPTIONS
from fastrnn.triton.engine import KERNEL_CELLS as CELLS
from fastrnn.triton import engine

ARCHS = (80, 90)
# Largest shared memory one block may use (opt-in), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BATCHES = (1, 2, 16, 17, 48, 100, 255, 256, 1024)
HIDDEN = (13, 32, 40, 64, 100, 128, 256, 512, 1024, 2048)

# Pointer arguments by role: the float32/float64 state (outputs and their
# gradients included), int32, or else the layer's own dtype.
_STATE_ARGS = {"WS", "STATE", "CARRY", "DP_IH", "DP_HH", "DP_STEP", "Q", "OUT", "H_N", "GRAD_HN",
               "GRAD_H0", "GRAD_OUT", "PREV", "C0", "C_N", "C", "M", "HR", "GRAD_CN", "GRAD_C0",
               "PREV_C", "DC", "DH", "DM", "DH_STEP", "UNPROJECTED"}
_INT_ARGS = {"LENGTHS", "BARRIER"}
_SCALAR_ARGS = {"T", "B", "H", "K", "reverse", "step_begin", "step_end"}
_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}


def projections(cell: str, H: int) -> tuple[int, ...]:
    """The projection sizes tried for a layer of ``cell`` with hidden size H:
    none, and for a cell that projects, about half of H and H - 1."""
    if not CELL_DESCRIPTIONS[cell].projects:
        return (0,)
    return (0, *sorted({max(1, H // 2), H - 1}))


@functools.cache
def shipped_configs() -> list[tuple]:
    """Unique (kernel, constexprs, dtype) the planner launches on a GPU, for
    layers with and without biases and projections, saving the workspace
    (training) or not."""
    device = torch.device("cuda")
    seen = {}
    for cell in CELLS:
        for dtype in DTYPES:
            for B in BATCHES:
                for H, P in ((H, P) for H in HIDDEN for P in projections(cell, H)):
                    for strategy in engine.STRATEGIES:
                        with engine.use_strategy(strategy):
                            try:
                                plan = engine.plan(cell, B, H, dtype, device, projection=P)
                            except RuntimeError:  # the strategy cannot run this shape
                                continue
                        # A split also runs step by step where the device cannot
                        # launch it cooperatively.
                        plans = [plan] + ([dataclasses.replace(plan, cooperative=False)]
                                          if plan.grid_sync else [])
                        launches = (k for p in plans for bias in (True, False)
                                    for workspace in (True, False)
                                    for k in p.launches(bias, workspace).values())
                        for kernel, constexprs in launches:
                            key = (kernel.__name__, _type_name(dtype), tuple(sorted(
                                (k, str(v)) for k, v in constexprs.items())))
                            seen.setdefault(key, (kernel, constexprs, dtype))
    return list(seen.values())


def _type_name(dtype: torch.dtype) -> str:
    return _TYPE_NAMES[dtype]


def _signature(kernel, constexprs: dict, dtype: torch.dtype) -> dict:
    state = "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:  # a compile-time value, or a pointer left out (None)
            signature[name] = "constexpr"
        elif name in _SCALAR_ARGS:
            signature[name] = "i32"
        elif name in _INT_ARGS:
            signature[name] = "*i32"
        elif name in _STATE_ARGS:
            signature[name] = "*" + state
        else:  # the layer's own tensors, and the weights (same dtype as the layer)
            signature[name] = "*" + _type_name(dtype)
    return signature


def describe(kernel, constexprs: dict, dtype: torch.dtype) -> str:
    """The kernel, the layer dtype and the compile-time arguments, but those
    that follow from the dtype and the cell (whose name is shown)."""
    shown = {k: v for k, v in constexprs.items()
             if k not in ("STATE_DTYPE", "GATES", "FOLDED", "SAVED")}
    text = ", ".join(f"{k}={v}" for k, v in shown.items())
    return f"{kernel.__name__}[{_type_name(dtype)}; {text}]"


def compile_config(kernel, constexprs: dict, dtype: torch.dtype, arch: int) -> dict:
    """Compiles for sm_<arch>; returns REG, STACK, LOCAL, SHARED (bytes, static
    plus dynamic) and SPILLS: local-memory loads and stores in the SASS
    (a stack frame alone may hold call frames; STL/LDL are register spills)."""
    constexprs = dict(constexprs)
    options = {name: constexprs.pop(name) for name in ("num_warps", "num_stages", "launch_cooperative_grid", "maxnreg")
               if name in constexprs}
    source = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, dtype), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        dump = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True,
                              text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", dump)}
    usage["SHARED"] += compiled.metadata.shared
    usage["SPILLS"] = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    return usage


def _compile_row(args):
    index, arch = args
    kernel, constexprs, dtype = shipped_configs()[index]
    return describe(kernel, constexprs, dtype), arch, compile_config(kernel, constexprs, dtype, arch)


def compile_all(workers: int = 2) -> list[tuple[str, int, dict]]:
    """(description, arch, usage) for every shipped configuration and arch."""
    jobs = [(index, arch) for index in range(len(shipped_configs())) for arch in ARCHS]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_row, jobs))


def table(rows) -> str:
    lines = [f"{'arch':<6} {'REG':>4} {'STACK':>6} {'LOCAL':>6} {'SPILLS':>6} {'SHARED':>7}  kernel"]
    for name, arch, usage in rows:
        lines.append(f"sm_{arch:<3} {usage['REG']:>4} {usage['STACK']:>6} {usage['LOCAL']:>6} "
                     f"{usage['SPILLS']:>6} {usage['SHARED']:>7}  {name}")
    return "\n".join(lines)


def compile_all_in_subprocess() -> list[tuple[str, int, dict]]:
    """compile_all() in a fresh interpreter without TRITON_INTERPRET (for the tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], env=env,
                            capture_output=True, text=True, check=True)
    return [tuple(row) for row in json.loads(result.stdout)]


if __name__ == "__main__":
    rows = compile_all(int(os.environ.get("WORKERS", "2")))
    print(json.dumps(rows) if "--json" in sys.argv else table(rows))
