"""Packaging: the wheel installs into a fresh environment holding only torch
and passes the tests there, and fastrnn imports without its optional parts."""

import os
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile

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


@pytest.fixture(scope="module")
def torch_venv(tmp_path_factory):
    """A fresh virtual environment holding only torch (this torch's release)
    and the test tools (fastrnn's `test` extra)."""
    import torch

    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}",
          "pytest>=7", "pytest-timeout", "pytest-xdist", "numpy", "hypothesis"])
    return env_dir, python


def _check_installed(env_dir, python, where):
    """fastrnn comes from the environment with its extension, without triton,
    and the module tests pass there (run from outside the checkout)."""
    found = _run([python, "-c", "import fastrnn, fastrnn.cpp as c; print(fastrnn.__file__, c.available())"],
                 cwd=where)
    assert str(env_dir) in found and found.split()[-1] == "True", found
    assert "triton" not in _run([python, "-m", "pip", "list"]).lower()
    output = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   *[os.path.join(ROOT, t) for t in WHEEL_TESTS]], cwd=where)
    assert " passed" in output and "failed" not in output, output[-2000:]


def test_wheel_installs_into_fresh_venv_and_passes_tests(tmp_path, torch_venv):
    """The documented wheel command, then install and test with torch alone."""
    import torch

    env_dir, python = torch_venv
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
          str(wheels), ROOT], cwd=ROOT)
    (wheel,) = wheels.glob("fastrnn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA")))
    requires = [line for line in metadata.decode().splitlines() if line.startswith("Requires-Dist: torch")]
    # A compiled extension loads only into the torch it was built for: the wheel says which.
    assert requires == [f"Requires-Dist: torch=={torch.__version__.split('+')[0]}"], requires

    _run([python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)])
    _check_installed(env_dir, python, tmp_path)
    _check_mismatch_is_a_clear_error(python, tmp_path)


MISMATCH_CHECK = textwrap.dedent("""
    import warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastrnn
    assert any("built for torch 1.0.0" in str(w.message) and torch.__version__ in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    gru = fastrnn.GRU(3, 4)
    x = torch.randn(2, 1, 3)
    try:
        gru(x)
    except RuntimeError as error:
        assert "built for torch 1.0.0" in str(error) and "pip install" in str(error), error
    else:
        raise AssertionError("an extension built for another torch ran, or fell back silently")
    with fastrnn.use_backend("reference"):
        gru(x)
    print("ok")
""")


def _check_mismatch_is_a_clear_error(python, where):
    """An extension built for another torch: a warning at import naming both
    versions, then a clear error (not a silent slow fallback) where the C++
    engine would run; the reference loop stays available on purpose."""
    _run([python, "-c", "import pathlib, fastrnn; "
          "pathlib.Path(fastrnn.__file__).with_name('_build_info.py').write_text(\"TORCH_VERSION = '1.0.0'\\n\")"],
         cwd=where)
    assert _run([python, "-c", MISMATCH_CHECK], cwd=where).strip() == "ok"


def test_sdist_is_complete_and_installs_into_fresh_venv(tmp_path, torch_venv):
    """The standard frontend's sdist holds everything the build reads, and a
    pip install from it (no isolation: against the installed torch) passes
    the module tests."""
    env_dir, python = torch_venv
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), ROOT], cwd=ROOT)
    (sdist,) = dist.glob("fastrnn-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {os.path.relpath(os.path.join(folder, f), ROOT)
               for folder, _, files in os.walk(os.path.join(ROOT, "csrc")) for f in files}
    assert sources <= names, sources - names
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} <= names
    assert not any(n.endswith((".so", "_build_info.py")) for n in names), sorted(names)

    # The build needs setuptools and wheel beside torch (pyproject's build requirements).
    _run([python, "-m", "pip", "install", "--quiet", "setuptools>=77", "wheel"])
    _run([python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps",
          "--no-build-isolation", str(sdist)], cwd=tmp_path)
    _check_installed(env_dir, python, tmp_path)
