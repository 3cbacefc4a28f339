"""Backend selection with fastrnn.use_backend."""

import pytest
import torch
import torch.utils.checkpoint

import fastrnn
import fastrnn.autograd
from conftest import BATCH, HIDDEN_SIZE, INPUT_SIZE, LENGTHS, SEQ_LEN, assert_results_close, forward_backward



@pytest.fixture
def no_interpreter(monkeypatch):
    """CPU tensors as the Triton engine sees them without TRITON_INTERPRET=1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


needs_triton_unavailable_on_cpu = pytest.mark.usefixtures("no_interpreter")


def small_gru(**kwargs):
    torch.manual_seed(0)
    return fastrnn.GRU(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, dtype=torch.float64, **kwargs)


def sample_input():
    return torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def gru_function_args():
    generator = torch.Generator().manual_seed(2)
    rand = lambda *s: torch.randn(*s, dtype=torch.float64, generator=generator)
    return (
        rand(SEQ_LEN, BATCH, INPUT_SIZE),
        rand(BATCH, HIDDEN_SIZE),
        rand(3 * HIDDEN_SIZE, INPUT_SIZE),
        rand(3 * HIDDEN_SIZE, HIDDEN_SIZE),
        rand(3 * HIDDEN_SIZE),
        rand(3 * HIDDEN_SIZE),
        None,
        False,
    )


@pytest.mark.parametrize("name", ["", "nonexistent", "tritonx"])
def test_unknown_backend_raises_value_error(name):
    with pytest.raises(ValueError):
        with fastrnn.use_backend(name):
            pass


@pytest.mark.parametrize("name", ["auto", "cpp", "reference"])
def test_known_backends_run_on_cpu(name):
    module = small_gru()
    x = sample_input()
    with fastrnn.use_backend(name):
        output, h_n = module(x)
    assert output.shape == (SEQ_LEN, BATCH, HIDDEN_SIZE)
    assert h_n.shape == (2, BATCH, HIDDEN_SIZE)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("input_kind", ["batched", "packed"])
def test_reference_and_cpp_agree_on_gru(bidirectional, input_kind):
    module = small_gru(bidirectional=bidirectional)
    x = sample_input()
    hx = torch.randn(2 * (2 if bidirectional else 1), BATCH, HIDDEN_SIZE, dtype=torch.float64)
    lengths = LENGTHS if input_kind == "packed" else None
    with fastrnn.use_backend("reference"):
        expected = forward_backward(module, x, hx, lengths=lengths)
    with fastrnn.use_backend("cpp"):
        got = forward_backward(module, x, hx, lengths=lengths)
    with fastrnn.use_backend("auto"):
        default = forward_backward(module, x, hx, lengths=lengths)
    assert_results_close(got, expected, torch.float64)
    assert_results_close(default, expected, torch.float64)


@needs_triton_unavailable_on_cpu
def test_forcing_triton_on_cpu_raises():
    module = small_gru()
    x = sample_input()
    with pytest.raises(RuntimeError, match="(?i)triton"):
        with fastrnn.use_backend("triton"):
            module(x)


@needs_triton_unavailable_on_cpu
def test_forcing_triton_on_cpu_raises_in_function():
    args = gru_function_args()
    with pytest.raises(RuntimeError, match="(?i)triton"):
        with fastrnn.use_backend("triton"):
            x, h0, *rest = args
            fastrnn.autograd.layer("gru", x, (h0,), *rest)


@needs_triton_unavailable_on_cpu
def test_nested_backends_restore_previous():
    # Whether "triton" is active is observable on CPU tensors: it raises.
    module = small_gru()
    x = sample_input()
    module(x)
    with fastrnn.use_backend("triton"):
        with fastrnn.use_backend("cpp"):
            module(x)
            with fastrnn.use_backend("reference"):
                module(x)
            module(x)
            with fastrnn.use_backend("triton"):
                with pytest.raises(RuntimeError):
                    module(x)
            module(x)
        with pytest.raises(RuntimeError):
            module(x)
    module(x)


@needs_triton_unavailable_on_cpu
def test_backend_restored_after_exception():
    module = small_gru()
    x = sample_input()
    with pytest.raises(KeyError):
        with fastrnn.use_backend("cpp"):
            with fastrnn.use_backend("triton"):
                raise KeyError("boom")
    # Neither "triton" nor anything else leaked out of the blocks.
    module(x)
    with fastrnn.use_backend("cpp"):
        with pytest.raises(KeyError):
            with fastrnn.use_backend("triton"):
                raise KeyError("boom")
        module(x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forcing_cpp_on_cuda_raises():
    module = small_gru().cuda()
    x = sample_input().cuda()
    with pytest.raises(RuntimeError):
        with fastrnn.use_backend("cpp"):
            module(x)


def gradients(module, x, use_reentrant=None):
    """Input and parameter gradients of one loss, the module checkpointed
    (``use_reentrant`` True or False) or not (None)."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    if use_reentrant is None:
        output, h_n = module(x)
    else:
        output, h_n = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=use_reentrant)
    (output.sum() + h_n.square().sum()).backward()
    return [x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", ["cpp", "reference", "triton"])
def test_activation_checkpointing_under_each_backend(name, use_reentrant):
    """Checkpointing recomputes forward in backward: the same gradients as
    without it, under each backend."""
    if name == "triton" and fastrnn.backends.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("the Triton engine cannot run CPU tensors here")
    module = small_gru()
    x = sample_input()
    with fastrnn.use_backend(name):
        plain = gradients(module, x)
        recomputed = gradients(module, x, use_reentrant)
    for a, b in zip(recomputed, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
