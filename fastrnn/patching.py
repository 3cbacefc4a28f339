"""Speeding up existing code without editing it.

``patch()`` makes ``torch.nn.RNN``, ``GRU``, ``LSTM``, ``RNNCell``, ``GRUCell``
and ``LSTMCell`` construct fastrnn's modules; ``convert()`` switches modules that already
exist, keeping their parameters, and ``unconvert()`` switches them back.
"""

from __future__ import annotations

from torch import nn

from fastrnn import modules

# fastrnn's classes and the torch.nn classes they replace, by name in torch.nn.
_REPLACEMENTS = {name: getattr(modules, name)
                 for name in ("RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell")}
_ORIGINALS = {name: cls._torch_class for name, cls in _REPLACEMENTS.items()}


def is_patched() -> bool:
    """Whether ``torch.nn``'s recurrent classes are fastrnn's now."""
    return all(getattr(nn, name) is _REPLACEMENTS[name] for name in _ORIGINALS)


def _set(classes: dict) -> None:
    for name, cls in classes.items():
        setattr(nn, name, cls)


class patch:
    """Makes torch.nn's recurrent modules and cells fastrnn's.

    Works as a plain call (until ``unpatch()``)::

        fastrnn.patch()
        model = build_model()        # its torch.nn.GRU(...) calls build fastrnn.GRU

    and as a context manager, which restores what was there before on exit::

        with fastrnn.patch():
            model = build_model()

    Only names looked up in ``torch.nn`` after patching are affected: a class
    imported earlier (``from torch.nn import GRU``) stays torch.nn's, and
    modules built earlier stay as they are (see ``convert``).
    """

    def __init__(self) -> None:
        self._was_patched = is_patched()
        _set(_REPLACEMENTS)

    def __enter__(self) -> patch:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._was_patched:
            unpatch()


def unpatch() -> None:
    """Restores torch.nn's own recurrent modules and cells."""
    _set(_ORIGINALS)


def _swap_classes(module: nn.Module, classes: dict) -> nn.Module:
    for submodule in module.modules():
        replacement = classes.get(type(submodule))
        if replacement is not None:
            # fastrnn's classes share torch.nn's bases, constructors and
            # attributes, so swapping the class is the whole conversion.
            submodule.__class__ = replacement
    return module


def convert(module: nn.Module) -> nn.Module:
    """Turns every ``torch.nn.RNN``/``GRU``/``LSTM`` and their cells in ``module`` into fastrnn's.

    In place, ``module`` itself included: each one keeps its parameters (the
    same ``Parameter`` objects, so an optimizer built earlier still holds
    them), buffers, hooks and training mode, and computes with fastrnn from
    then on. Subclasses of those classes are left alone, since they may
    change what ``forward`` does. Returns ``module``.
    """
    return _swap_classes(module, {_ORIGINALS[name]: _REPLACEMENTS[name] for name in _ORIGINALS})


def unconvert(module: nn.Module) -> nn.Module:
    """The inverse of ``convert``: every fastrnn module in ``module`` becomes torch.nn's.

    In place, keeping parameters, buffers, hooks and training mode as
    ``convert`` does (and, as there, leaving subclasses alone), for tools that look for torch.nn's classes (dynamic
    quantization, exporters that know torch.nn's modules). Returns ``module``.
    """
    return _swap_classes(module, {_REPLACEMENTS[name]: _ORIGINALS[name] for name in _ORIGINALS})
