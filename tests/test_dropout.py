"""Inter-layer dropout of fastrnn.RNN / fastrnn.GRU / fastrnn.LSTM (with and
without proj_size).

torch.nn on CPU applies ``dropout`` to the time-major ``(T, B, D*H)`` output
of every layer but the last. With the same RNG state before the call, the
same masks are drawn, so results can be compared with torch.nn exactly.
On CUDA the comparison is with torch.nn's native (non-cuDNN) path, which
draws its masks with the same dropout op; cuDNN draws its own.
"""

import pytest
import torch

from conftest import (
    ALL_MODULE_KINDS as KINDS,
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    LENGTHS,
    SEQ_LEN,
    assert_close,
    assert_results_close,
    device_param,
    flatten_outputs,
    forward_backward,
    make_pair,
    make_state,
)

kind_param = pytest.mark.parametrize("kind", list(KINDS))
bidir_param = pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])

DTYPE = torch.float64


def build_pair(kind, bidirectional=False, batch_first=False, dropout=0.5):
    torch_cls, fast_cls, extra = KINDS[kind]
    return make_pair(
        torch_cls,
        fast_cls,
        INPUT_SIZE,
        HIDDEN_SIZE,
        num_layers=3,
        dropout=dropout,
        bidirectional=bidirectional,
        batch_first=batch_first,
        dtype=DTYPE,
        **extra,
    )


def batched_input(batch_first=False):
    shape = (BATCH, SEQ_LEN, INPUT_SIZE) if batch_first else (SEQ_LEN, BATCH, INPUT_SIZE)
    return torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(2))


@kind_param
@bidir_param
def test_eval_mode_is_deterministic_and_ignores_dropout(kind, bidirectional):
    reference, candidate = build_pair(kind, bidirectional)
    _, no_dropout = build_pair(kind, bidirectional, dropout=0.0)
    reference.eval()
    candidate.eval()
    x = batched_input()
    # (output, h_n), or an LSTM's (output, h_n, c_n)
    got_a = flatten_outputs(candidate(x))
    got_b = flatten_outputs(candidate(x))
    assert all(torch.equal(a, b) for a, b in zip(got_a, got_b))
    for a, b in zip(got_a, flatten_outputs(no_dropout(x)), strict=True):
        assert_close(a, b)
    for a, b in zip(got_a, flatten_outputs(reference(x)), strict=True):
        assert_close(a, b)


@kind_param
@bidir_param
def test_train_mode_calls_differ(kind, bidirectional):
    _, candidate = build_pair(kind, bidirectional)
    candidate.train()
    x = batched_input()
    out_a, *states_a = flatten_outputs(candidate(x))
    out_b, *states_b = flatten_outputs(candidate(x))
    assert not torch.allclose(out_a, out_b)
    # The first layer is never dropped out, so its final state is unaffected
    # (an LSTM's h_n and c_n alike).
    num_dirs = 2 if bidirectional else 1
    for h_a, h_b in zip(states_a, states_b, strict=True):
        assert_close(h_a[:num_dirs], h_b[:num_dirs])
        assert not torch.allclose(h_a[num_dirs:], h_b[num_dirs:])


@kind_param
@bidir_param
@pytest.mark.parametrize("input_kind", ["time_first", "batch_first", "unbatched", "packed"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx_none", "hx_given"])
@device_param
def test_train_mode_matches_torch_with_same_seed(kind, bidirectional, input_kind, hx_given, device):
    """Same masks, so the same numbers, and the same randomness consumed.

    With packed input torch.nn drops out the packed data only (not padding).
    """
    batch_first = input_kind == "batch_first"
    reference, candidate = build_pair(kind, bidirectional, batch_first=batch_first)
    reference.to(device).train()
    candidate.to(device).train()
    x = batched_input(batch_first)
    if input_kind == "unbatched":
        x = x[:, 0]
    lengths = LENGTHS if input_kind == "packed" else None
    num_states = 3 * (2 if bidirectional else 1)
    hx = None
    if hx_given:
        leading = (num_states,) if input_kind == "unbatched" else (num_states, BATCH)
        hx = make_state(kind, leading, DTYPE, torch.Generator().manual_seed(4))

    def run(module):
        torch.manual_seed(2024)
        result = forward_backward(module, x, hx, lengths=lengths, batch_first=batch_first)
        return result, torch.rand(4, device=device)  # what the RNG gives after the call

    with torch.backends.cudnn.flags(enabled=False):
        expected, after_reference = run(reference)
    got, after_candidate = run(candidate)
    assert_results_close(got, expected, DTYPE)
    assert torch.equal(after_candidate, after_reference)


@kind_param
@bidir_param
@pytest.mark.parametrize("input_kind", ["batched", "packed"])
@device_param
def test_train_mode_gradients_flow(kind, bidirectional, input_kind, device):
    _, candidate = build_pair(kind, bidirectional)
    candidate.to(device).train()
    x = batched_input().to(device)
    lengths = LENGTHS if input_kind == "packed" else None
    result = forward_backward(candidate, x, lengths=lengths)
    for name, param in candidate.named_parameters():
        grad = result["grad_" + name]
        assert grad.shape == param.shape, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    assert torch.isfinite(result["grad_input"]).all()

    # module.backward path through .grad as well
    candidate.zero_grad()
    output, *states = flatten_outputs(candidate(x))
    (output.square().sum() + sum(h.sum() for h in states)).backward()
    for name, param in candidate.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@kind_param
def test_dropout_one_layer_is_noop(kind):
    """With num_layers=1 there is no inter-layer dropout (torch only warns)."""
    torch_cls, fast_cls, extra = KINDS[kind]
    with pytest.warns(UserWarning):
        reference, candidate = make_pair(
            torch_cls, fast_cls, INPUT_SIZE, HIDDEN_SIZE, dropout=0.5, dtype=DTYPE, **extra
        )
    candidate.train()
    x = batched_input()
    got_a = flatten_outputs(candidate(x))
    got_b = flatten_outputs(candidate(x))
    assert all(torch.equal(a, b) for a, b in zip(got_a, got_b))
    for a, b in zip(got_a, flatten_outputs(reference(x)), strict=True):
        assert_close(a, b)
