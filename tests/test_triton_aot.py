"""Every Triton kernel configuration fastrnn ships compiles for sm_80 and
sm_90 without a GPU, spills no registers and fits the shared memory.

The table of register, stack, local and shared memory use is printed with
the test output (and by ``python tests/triton_aot.py``).
"""

import pytest

triton_aot = pytest.importorskip("triton_aot")

# Compiling every configuration for two architectures takes minutes on two cores.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def compiled():
    return triton_aot.compile_all_in_subprocess()


def test_every_shipped_configuration_compiles(compiled, capsys):
    with capsys.disabled():
        print(f"\n{len(compiled)} kernel builds (sm_80, sm_90):\n{triton_aot.table(compiled)}")
    names = {name for name, _, _ in compiled}
    for kernel in ("tile_fwd_kernel", "tile_bwd_kernel", "split_fwd_kernel", "split_bwd_kernel"):
        assert any(name.startswith(kernel) for name in names), kernel
    assert {arch for _, arch, _ in compiled} == set(triton_aot.ARCHS)


def test_no_register_spills(compiled):
    spilled = [(name, arch, usage) for name, arch, usage in compiled if usage["SPILLS"] or usage["LOCAL"]]
    assert not spilled, "register spills:\n" + triton_aot.table(spilled)


def test_shared_memory_within_device_limit(compiled):
    over = [(name, arch, usage) for name, arch, usage in compiled
            if usage["SHARED"] > triton_aot.SHARED_LIMIT[arch]]
    assert not over, "shared memory over the limit:\n" + triton_aot.table(over)


def test_grid_barrier_is_compiled_in(compiled):
    """The persistent split launch ships with its barrier (GRID_SYNC)."""
    assert any(name.startswith("split") and "GRID_SYNC=True" in name for name, _, _ in compiled)
