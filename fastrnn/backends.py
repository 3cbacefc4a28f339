"""Which engine runs a layer: the backend setting and its resolution.

``"auto"`` (the default) runs CPU tensors on the C++ engine and CUDA tensors
on the Triton engine. ``use_backend`` forces one engine for the code inside
it; the setting is per thread.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

from fastrnn import cpp
from fastrnn.settings import setting, settings

BACKENDS = ("auto", "cpp", "triton", "reference")

_CPU = torch.device("cpu")


def current_backend() -> str:
    """The backend name in force: one of ``BACKENDS``."""
    return settings.backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Forces fastrnn's layers inside the ``with`` block onto one engine.

    ``name`` is ``"auto"``, ``"cpp"`` (the C++ CPU engine), ``"triton"`` (the
    Triton GPU engine; on CPU tensors only when ``TRITON_INTERPRET=1`` was
    set before import) or ``"reference"`` (the plain PyTorch loop). A forced
    engine that cannot run the given tensors raises ``RuntimeError``.
    """
    if name not in BACKENDS:
        raise ValueError(f"Unknown fastrnn backend {name!r}; choose one of {', '.join(BACKENDS)}")
    with setting("backend", name):
        yield


def resolve(device: torch.device) -> str:
    """The engine that runs layers on ``device`` now: "cpp", "triton" or "reference"."""
    name = settings.backend
    if name == "auto":
        if device == _CPU and cpp.available():
            return "cpp"  # without device.type, which builds a string on every call
        return _auto_engine(device.type)
    problem = _forced_engine_problem(name, str(device))
    if problem is not None:
        raise RuntimeError(problem)
    return name


def cpp_may_run() -> bool:
    """Whether the backend setting lets the C++ engine run CPU layers, read
    without a device (the engine itself takes CPU tensors only)."""
    return settings.backend in ("auto", "cpp") and cpp.available()


# What is installed does not change while a process runs: torch.compile takes
# these two as constants (the setting itself is read, and guarded, above).
@torch.compiler.assume_constant_result
def _auto_engine(device_type: str) -> str:
    if device_type in ("cpu", "meta") and cpp.available():
        return "cpp"
    if device_type == "cpu" and cpp.MISMATCH is not None:
        raise RuntimeError(f"fastrnn: {cpp.MISMATCH}")
    if device_type == "cuda":
        reason = triton_unavailable_reason(torch.device(device_type))
        if reason is None:
            return "triton"
        _warn_reference_fallback(device_type, reason)
    return "reference"


@torch.compiler.assume_constant_result
def _forced_engine_problem(name: str, device: str) -> str | None:
    if name == "cpp":
        if torch.device(device).type != "cpu":
            return f"fastrnn backend 'cpp' runs CPU tensors only, got tensors on {device}"
        if not cpp.available():
            return f"fastrnn backend 'cpp' is not available: {cpp.load_error()}"
    if name == "triton":
        reason = triton_unavailable_reason(torch.device(device))
        if reason is not None:
            return f"fastrnn backend 'triton' cannot run tensors on {device}: {reason}"
    return None


@functools.cache
def _warn_reference_fallback(device_type: str, reason: str) -> None:
    warnings.warn(f"fastrnn: the Triton engine cannot run {device_type} tensors ({reason}); they "
                  "run the slow reference loop. Install triton (`pip install fastrnn[gpu]`).",
                  RuntimeWarning, stacklevel=3)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton engine cannot run tensors on ``device``, or None if it can."""
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} is not supported"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    return _triton_load_error()


# The Triton engine module (``fastrnn.triton``) once imported; triton is
# imported on first use only, so that fastrnn imports without it.
triton_engine = None


@functools.cache
def _triton_load_error() -> str | None:
    global triton_engine
    try:
        triton_engine = importlib.import_module("fastrnn.triton")
    except ImportError as error:
        return f"triton could not be imported ({error})"
    return None
