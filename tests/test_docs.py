"""Every public name carries a docstring (the API reference users read with help())."""

import inspect

import pytest

MODULES = ["fastrnn", "fastrnn.functional", "fastrnn.bench", "fastrnn.triton"]


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("fastrnn"):
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj) and hasattr(obj, "forward"):
                yield f"{module.__name__}.{name}.forward", obj.forward


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name):
    module = pytest.importorskip(name)
    missing = [name for name, obj in _public(module) if not (obj.__doc__ or "").strip()]
    assert not missing, missing
