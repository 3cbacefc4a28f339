"""Parameters shared across directions and layers, and parameters replaced
by new (non-contiguous) ones: outputs and gradients as torch.nn's; RNN, GRU,
LSTM (with and without proj_size, whose weight_hr is replaced too) and their
cells."""

import pytest
import torch
import torch.nn as nn

from conftest import (
    ALL_CELL_KINDS as CELL_KINDS,
    ALL_MODULE_KINDS as KINDS,
    assert_close,
    assert_results_close,
    assert_same_exception,
    flatten_outputs,
    forward_backward,
    make_pair,
    make_state,
    tie,
)

I, H, B, T = 5, 6, 3, 4
LAYERS = 2
S = 2 * LAYERS  # states of a bidirectional stack

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest


@pytest.mark.parametrize("kind", list(KINDS))
def test_tied_parameters(kind):
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, bidirectional=True,
                                     dtype=torch.float64, **kwargs)
    tie(reference)
    tie(candidate)
    if kwargs.get("proj_size"):
        for m in (reference, candidate):  # the projection shared across layers too
            m.weight_hr_l1 = m.weight_hr_l0
    names = [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in candidate.named_parameters()] == names
    assert "weight_hh_l1" not in names  # deduplicated: its gradient accumulates into weight_hh_l0
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    hx = make_state(kind, (S, B), torch.float64, gen, hidden=H)
    expected = forward_backward(reference, x, hx)
    got = forward_backward(candidate, x, hx)
    assert_results_close(got, expected, torch.float64)
    # Through .grad as well, the way an optimizer sees it.
    for m in (reference, candidate):
        out, *states = flatten_outputs(m(x))
        (out.square().sum() + sum(h.sum() for h in states)).backward()
    for (name, p), q in zip(candidate.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_replaced_parameters(kind):
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS}
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    suffix = "" if is_cell else "_l0"
    gen = torch.Generator().manual_seed(6)
    new_hh = torch.randn(reference.weight_hh.shape if is_cell else reference.weight_hh_l0.shape,
                         dtype=torch.float64, generator=gen)
    new_ih = torch.randn(getattr(reference, "weight_ih" + suffix).shape[::-1], dtype=torch.float64,
                         generator=gen)
    for m in (reference, candidate):
        setattr(m, "weight_hh" + suffix, nn.Parameter(new_hh.clone()))
        # A transposed (non-contiguous) parameter.
        setattr(m, "weight_ih" + suffix, nn.Parameter(new_ih.clone().t()))
    assert not candidate.get_parameter("weight_ih" + suffix).is_contiguous()
    if hasattr(reference, "weight_hr_l0"):
        # An LSTM's projection, transposed as well.
        new_hr = torch.randn(reference.weight_hr_l0.shape[::-1], dtype=torch.float64, generator=gen)
        for m in (reference, candidate):
            m.weight_hr_l0 = nn.Parameter(new_hr.clone().t())
        assert not candidate.weight_hr_l0.is_contiguous()
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)
    expected = forward_backward(reference, x)
    got = forward_backward(candidate, x)
    assert_results_close(got, expected, torch.float64)
    # A plain tensor is refused the same way.
    assert_same_exception(lambda: setattr(reference, "weight_hh" + suffix, new_hh.clone()),
                          lambda: setattr(candidate, "weight_hh" + suffix, new_hh.clone()))


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_one_tensor_in_two_places_second_order(kind):
    # One tensor in two places of the same layer (b_hh tied to b_ih, W_hh to
    # W_ih where the shapes allow, an LSTM's (h, h) as its state): under
    # create_graph each place gets its own gradient and autograd adds them,
    # first and second order, as torch.nn's.
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, H, H, dtype=torch.float64, **kwargs)
    suffix = "" if is_cell else "_l0"
    tie_weights = not kwargs.get("proj_size")
    for m in (reference, candidate):
        setattr(m, "bias_hh" + suffix, getattr(m, "bias_ih" + suffix))
        if tie_weights:
            setattr(m, "weight_hh" + suffix, getattr(m, "weight_ih" + suffix))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn((B, H) if is_cell else (T, B, H), dtype=torch.float64, generator=gen)
    h = make_state(kind, (B,) if is_cell else (1, B), torch.float64, gen, hidden=H)
    if isinstance(h, tuple) and h[0].shape == h[1].shape:
        h = (h[0], h[0])  # the same tensor as both states
    h = tuple(t.requires_grad_() for t in h) if isinstance(h, tuple) else h.requires_grad_()
    results = []
    for m in (reference, candidate):
        out = flatten_outputs(m(x, h))
        leaves = [*m.parameters(), *(h if isinstance(h, tuple) else (h,))]
        grads = torch.autograd.grad(sum((o * o).sum() for o in out), leaves, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
        results.append((grads, second))
    for (got_grads, got_second), (expected_grads, expected_second) in zip(results[1:], results):
        for index, (a, b) in enumerate(zip(got_grads, expected_grads)):
            assert_close(a, b, msg=f"gradient {index}")
        for index, (a, b) in enumerate(zip(got_second, expected_second)):
            assert_close(a, b, msg=f"second derivative {index}")


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("change", ["parametrized", "plain_tensor"])
def test_cell_weights_not_registered_under_their_names(kind, change):
    # A cell reads its weights from its registered parameters where they
    # are; a parametrized weight, or a plain tensor put where a deleted
    # parameter was, is not registered under the weight's name and must be
    # read as torch.nn reads it, as an attribute.
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(8)
    plain = torch.randn(reference.weight_ih.shape, dtype=torch.float64, generator=gen)
    for m in (reference, candidate):
        if change == "parametrized":
            torch.nn.utils.parametrize.register_parametrization(m, "weight_hh", _Doubled())
        else:
            del m.weight_ih
            m.weight_ih = plain.clone().requires_grad_()
    x = torch.randn(B, I, dtype=torch.float64, generator=gen)
    hx = make_state(kind, (B,), torch.float64, gen, hidden=H)
    assert_results_close(forward_backward(candidate, x, hx), forward_backward(reference, x, hx),
                         torch.float64)
    if change == "plain_tensor":  # not a parameter: its gradient taken on its own
        grads = [torch.autograd.grad(flatten_outputs(m(x, hx))[0].sum(), m.weight_ih)[0]
                 for m in (reference, candidate)]
        assert_close(grads[1], grads[0])


@pytest.mark.parametrize("weight_norm_too", [False, True], ids=["spectral", "spectral_and_weight_norm"])
@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_parametrized_weights_evaluated_as_torch_nn(kind, weight_norm_too):
    # spectral_norm runs a power iteration each time its weight is evaluated
    # in training, so a layer that evaluates it another number of times than
    # torch.nn's drifts from torch.nn's outputs over the calls. torch.nn's
    # count depends on which weights are parametrized (its check stops at the
    # first weight that changed), hence both cases.
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    suffix = "" if is_cell else "_l0"
    # Wider than H: a few power iterations on a small weight converge to
    # within float64's tolerance, whatever their number.
    pair = make_pair(torch_cls, fast_cls, I, 24, dtype=torch.float64, **kwargs)
    for m in pair:
        torch.manual_seed(7)  # spectral_norm's random start vectors
        spectral_norm(m, "weight_hh" + suffix)
        if weight_norm_too:
            weight_norm(m, "weight_ih" + suffix)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*(() if is_cell else (T,)), B, I, dtype=torch.float64, generator=gen)
    for _ in range(3):
        expected, got = (flatten_outputs(m(x)) for m in pair)
        for e, g in zip(expected, got):
            assert_close(g, e)
