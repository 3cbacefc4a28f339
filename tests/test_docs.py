"""Every public name carries a docstring (the API reference users read with help())."""

import inspect

import pytest

MODULES = ["fastrnn", "fastrnn.functional", "fastrnn.autograd", "fastrnn.bench",
           "fastrnn.bench.measure", "fastrnn.bench.report", "fastrnn.triton",
           "fastrnn.triton.engine", "fastrnn.settings"]


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("fastrnn"):
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and (inspect.isfunction(member)
                                                     or isinstance(member, (staticmethod, property))):
                        yield f"{module.__name__}.{name}.{attr}", getattr(obj, attr)


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name):
    module = pytest.importorskip(name)
    missing = [name for name, obj in _public(module) if not (obj.__doc__ or "").strip()]
    assert not missing, missing
