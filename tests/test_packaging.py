"""Packaging: the wheel installs into a fresh environment holding only torch
and passes the tests there, and fastrnn imports without its optional parts."""

import os
import subprocess
import sys
import textwrap
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The wheel's own tests: module and cell parity and the global swap. They
# need neither triton nor the benchmark tools.
WHEEL_TESTS = ["tests/test_modules.py", "tests/test_cells.py", "tests/test_patching.py"]


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_imports_without_extension_or_triton():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["triton"] = None       # makes `import triton` fail
        sys.modules["fastrnn._C"] = None   # as if the extension were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastrnn
        messages = [str(w.message) for w in caught]
        assert any("fastrnn._C could not be loaded" in m and "pip install" in m
                   for m in messages), messages

        import torch
        torch.manual_seed(0)
        reference, fast = torch.nn.GRU(3, 5), fastrnn.GRU(3, 5)
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(4, 2, 3)
        torch.testing.assert_close(fast(x)[0], reference(x)[0])  # the reference loop
        for name, error in (("cpp", "not available"), ("triton", "triton")):
            try:
                with fastrnn.use_backend(name):
                    fast(x)
            except RuntimeError as e:
                assert error in str(e), e
            else:
                raise AssertionError(name + " did not raise")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert _run([sys.executable, "-c", script], env=env, cwd=ROOT).strip().endswith("ok")


def test_wheel_installs_into_fresh_venv_and_passes_tests(tmp_path):
    """The documented wheel command, then install and test with torch alone."""
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
          str(wheels), ROOT], cwd=ROOT)
    (wheel,) = wheels.glob("fastrnn-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    import torch

    torch_version = torch.__version__.split("+")[0]
    _run([python, "-m", "pip", "install", "--quiet", f"torch=={torch_version}"])
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[test]"])
    # Run from outside the checkout, so that fastrnn comes from the wheel.
    where = _run([python, "-c", "import fastrnn, fastrnn.cpp as c; print(fastrnn.__file__, c.available())"],
                 cwd=tmp_path)
    assert str(env_dir) in where and where.split()[-1] == "True", where
    assert "triton" not in _run([python, "-m", "pip", "list"]).lower()
    output = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   *[os.path.join(ROOT, t) for t in WHEEL_TESTS]], cwd=tmp_path)
    assert " passed" in output and "failed" not in output, output[-2000:]
