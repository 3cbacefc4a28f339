"""The C++ engine's cache of large buffers (csrc/cpu/buffers.cpp): a layer's
outputs, workspace and gradients of 1 MiB and more come from blocks kept
across calls, so that a repeated call touches no fresh pages, and the cache
never holds blocks that a call of new sizes could not use."""

import resource

import pytest
import torch

import fastrnn
from conftest import assert_close

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest

_C = pytest.importorskip("fastrnn._C")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def training_step(module, x):
    """Forward and backward of module; returns the output and final state
    (the output's storage a block of the cache)."""
    output, h_n = module(x)
    (output.sum() + h_n.sum()).backward()
    return output, h_n


def checked_training_step(module, reference, x):
    """training_step, its results checked against torch.nn's; returns the output."""
    output, h_n = training_step(module, x)
    with torch.no_grad():
        want, want_h = reference(x)
    assert_close(output.detach(), want)
    assert_close(h_n.detach(), want_h)
    return output


@pytest.fixture
def gru():
    torch.manual_seed(0)
    reference = torch.nn.GRU(64, 64)
    module = fastrnn.GRU(64, 64)
    module.load_state_dict(reference.state_dict())
    _C.empty_cache()
    yield module, reference
    _C.empty_cache()


def test_a_repeated_call_reuses_its_buffers(gru):
    module, reference = gru
    # A workspace of 1200 x 32 x 4H floats, 37.5 MiB: glibc maps any block
    # over 32 MiB afresh each time, 9,600 pages to fault on.
    x = torch.randn(1200, 32, 64)
    with fastrnn.use_backend("cpp"):
        for _ in range(3):
            output = checked_training_step(module, reference, x)
            del output
            assert _C.cached_bytes() >= 1200 * 32 * 64 * 4
        # A call from the cache faults on next to none of those pages.
        faults = minor_faults()
        training_step(module, x)
        assert minor_faults() - faults < 500
    _C.empty_cache()
    assert _C.cached_bytes() == 0


def test_new_sizes_release_the_unused_blocks(gru):
    module, reference = gru
    longer = torch.randn(400, 32, 64)
    with fastrnn.use_backend("cpp"):
        checked_training_step(module, reference, torch.randn(200, 32, 64))
        assert _C.cached_bytes() > 0
        # Twice the length: no block fits, and every unused one is freed
        # before the first new one is allocated. What the cache holds after
        # the call (the blocks its backward freed) is then what it holds
        # after a second call of the same sizes, which allocates nothing.
        first = checked_training_step(module, reference, longer)
        after_first = _C.cached_bytes()
        del first
        second = checked_training_step(module, reference, longer)
        assert after_first == _C.cached_bytes() > 0
        del second
