"""The C++ CPU engine: loads ``fastrnn._C``, which registers the CPU kernels
of the layer ops (``fastrnn.ops``) with the dispatcher.
"""

from __future__ import annotations

import warnings

import torch

from fastrnn import ops  # noqa: F401  (the op schemas the extension implements)


def built_for() -> str | None:
    """The torch release the extension was built against (None: not recorded)."""
    try:
        from fastrnn import _build_info
    except ImportError:
        return None
    return _build_info.TORCH_VERSION


def _release(version: str) -> str:
    return version.split("+")[0]


def _mismatch() -> str | None:
    """Why the extension cannot load into this torch, or None."""
    built = built_for()
    if built is None or _release(built) == _release(torch.__version__):
        return None
    return (f"fastrnn's C++ extension was built for torch {built}, but torch {torch.__version__} "
            "is installed, and an extension loads only into the torch it was built for. "
            "Reinstall fastrnn for this torch: `pip install --force-reinstall --no-deps "
            "--no-build-isolation fastrnn` (from source), or a fastrnn wheel built for torch "
            f"{_release(torch.__version__)}; `fastrnn.use_backend('reference')` runs the slow "
            "reference loop meanwhile")


layer_forward = plain_step = plain_layers = plain_states = None  # set where the extension loads

# Set when the extension was built for another torch: CPU layers then raise
# this instead of falling back to the reference loop (tens of times slower).
MISMATCH: str | None = _mismatch()
if MISMATCH is not None:
    _LOAD_ERROR: str | None = MISMATCH
    warnings.warn(f"fastrnn: {MISMATCH}.", RuntimeWarning, stacklevel=2)
else:
    try:
        from fastrnn import _C  # loading it registers the CPU kernels

        _LOAD_ERROR = None
        # torch.ops.fastrnn.layer_forward without boxing its arguments; one
        # step of it, and a stack of layers, where the call is a plain one;
        # the check of a module's plain call (no __torch_function__ handling:
        # the callers check for it).
        layer_forward, plain_step, plain_layers, plain_states = (
            _C.layer_forward, _C.plain_step, _C.plain_layers, _C.plain_states)
    except ImportError as error:  # a source checkout whose extension is not built
        _LOAD_ERROR = f"the compiled extension fastrnn._C could not be loaded ({error})"
        warnings.warn(
            f"fastrnn: {_LOAD_ERROR}. CPU tensors will run the slow reference loop; build the "
            "extension with `pip install --no-build-isolation .` (or `make build` in a checkout).",
            RuntimeWarning, stacklevel=2)


def available() -> bool:
    """Whether the compiled extension is loaded."""
    return _LOAD_ERROR is None


def load_error() -> str | None:
    """Why the extension is not loaded, or None."""
    return _LOAD_ERROR
