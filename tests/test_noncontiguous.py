"""Non-contiguous inputs and initial states (transposed, strided, expanded,
broadcast views) reaching the modules and cells with their strides:
outputs and gradients as torch.nn's; an LSTM's h and c (with and without
proj_size) each in their own layout."""

import pytest
import torch

from conftest import (CELL_KINDS, KINDS, LSTM_CELL_KINDS, LSTM_KINDS, assert_results_close,
                      flatten_outputs, make_pair, random_like_shape)

I, H, B, T = 5, 6, 3, 4
LAYERS = 2

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest


def forward_backward_views(module, leaves, build, grad_seed=1234):
    """Like conftest.forward_backward, but the call's arguments are views
    ``build(*leaves)`` of fresh leaf copies (so their strides reach the
    module); gradients are taken with respect to the leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    outputs = flatten_outputs(module(*build(*leaves)))  # an LSTM's (output, (h_n, c_n)) flat
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = [random_like_shape(o.shape, o.dtype, gen).to(o.device) for o in outputs]
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(outputs, leaves + list(params.values()), upstream,
                                allow_unused=True, materialize_grads=True)
    result = {f"output_{i}": o.detach() for i, o in enumerate(outputs)}
    result.update({f"grad_leaf_{i}": g for i, g in enumerate(grads[:len(leaves)])})
    result.update({f"grad_{n}": g for n, g in zip(params, grads[len(leaves):])})
    return result


S = 2 * LAYERS  # states of a bidirectional stack

# case -> (module kwargs, leaf shapes, build(*leaves) -> call arguments)
LAYOUT_CASES = {
    "input_transposed": ({}, [(B, T, I)], lambda x: (x.transpose(0, 1),)),
    "input_transposed_batch_first": ({"batch_first": True}, [(T, B, I)], lambda x: (x.transpose(0, 1),)),
    "input_strided": ({}, [(2 * T, B, 2 * I)], lambda x: (x[::2, :, 1::2],)),
    "input_every_other_sequence": ({}, [(T, 2 * B, I)], lambda x: (x[:, ::2],)),
    "input_unbatched_transposed": ({}, [(I, T)], lambda x: (x.t(),)),
    "input_broadcast_over_time": ({}, [(1, B, I)], lambda x: (x.expand(T, B, I),)),
    "hx_expanded": ({}, [(T, B, I), (1, 1, H)], lambda x, h: (x, h.expand(S, B, H))),
    "hx_transposed": ({}, [(T, B, I), (B, S, H)], lambda x, h: (x, h.transpose(0, 1))),
    "hx_strided": ({}, [(T, B, I), (S, B, 2 * H)], lambda x, h: (x, h[..., ::2])),
    "both_batch_first": ({"batch_first": True}, [(T, B, I), (H, B, S)],
                         lambda x, h: (x.transpose(0, 1), h.permute(2, 1, 0))),
}

CELL_LAYOUT_CASES = {
    "input_transposed": ([(I, B)], lambda x: (x.t(),)),
    "input_strided": ([(2 * B, 3 * I)], lambda x: (x[::2, ::3],)),
    "hx_expanded": ([(B, I), (1, H)], lambda x, h: (x, h.expand(B, H))),
    "hx_transposed": ([(B, I), (H, B)], lambda x, h: (x, h.t())),
    "unbatched_strided": ([(2 * I,), (2 * H,)], lambda x, h: (x[::2], h[1::2])),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_noncontiguous_inputs(kind, case):
    module_kwargs, leaf_shapes, build = LAYOUT_CASES[case]
    torch_cls, fast_cls, kwargs = KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, bidirectional=True,
                                     dtype=torch.float64, **kwargs, **module_kwargs)
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, dtype=torch.float64, generator=gen) for s in leaf_shapes]
    assert not all(a.is_contiguous() for a in build(*leaves)), "the case must pass a strided view"
    expected = forward_backward_views(reference, leaves, build)
    got = forward_backward_views(candidate, leaves, build)
    assert_results_close(got, expected, torch.float64)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("case", list(CELL_LAYOUT_CASES))
def test_cell_noncontiguous_inputs(kind, case):
    leaf_shapes, build = CELL_LAYOUT_CASES[case]
    torch_cls, fast_cls, kwargs = CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, dtype=torch.float64, generator=gen) for s in leaf_shapes]
    assert not all(a.is_contiguous() for a in build(*leaves))
    expected = forward_backward_views(reference, leaves, build)
    got = forward_backward_views(candidate, leaves, build)
    assert_results_close(got, expected, torch.float64)


def lstm_layout_cases(P):
    """LAYOUT_CASES for an LSTM whose h is ``P`` wide (c is H wide): the
    input-only cases as they are, and views of h and c, together and apart."""
    cases = {name: case for name, case in LAYOUT_CASES.items() if len(case[1]) == 1}
    cases.update({
        "hx_expanded": ({}, [(T, B, I), (1, 1, P), (1, 1, H)],
                        lambda x, h, c: (x, (h.expand(S, B, P), c.expand(S, B, H)))),
        "hx_transposed": ({}, [(T, B, I), (B, S, P), (B, S, H)],
                          lambda x, h, c: (x, (h.transpose(0, 1), c.transpose(0, 1)))),
        "hx_strided": ({}, [(T, B, I), (S, B, 2 * P), (S, B, 2 * H)],
                       lambda x, h, c: (x, (h[..., ::2], c[..., 1::2]))),
        "h_only_transposed": ({}, [(T, B, I), (B, S, P), (S, B, H)],
                              lambda x, h, c: (x, (h.transpose(0, 1), c))),
        "c_only_expanded": ({}, [(T, B, I), (S, B, P), (S, 1, H)],
                            lambda x, h, c: (x, (h, c.expand(S, B, H)))),
        "c_only_strided": ({}, [(T, B, I), (S, B, P), (S, 2 * B, H)],
                           lambda x, h, c: (x, (h, c[:, ::2]))),
        "both_batch_first": ({"batch_first": True}, [(T, B, I), (P, B, S), (H, B, S)],
                             lambda x, h, c: (x.transpose(0, 1), (h.permute(2, 1, 0),
                                                                  c.permute(2, 1, 0)))),
    })
    return cases


LSTM_CASE_NAMES = list(lstm_layout_cases(1))


@pytest.mark.parametrize("kind", list(LSTM_KINDS))
@pytest.mark.parametrize("case", LSTM_CASE_NAMES)
def test_lstm_noncontiguous_inputs(kind, case):
    torch_cls, fast_cls, kwargs = LSTM_KINDS[kind]
    module_kwargs, leaf_shapes, build = lstm_layout_cases(kwargs.get("proj_size", 0) or H)[case]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, num_layers=LAYERS, bidirectional=True,
                                     dtype=torch.float64, **kwargs, **module_kwargs)
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, dtype=torch.float64, generator=gen) for s in leaf_shapes]
    args = flatten_outputs(build(*leaves))
    assert not all(a.is_contiguous() for a in args), "the case must pass a strided view"
    expected = forward_backward_views(reference, leaves, build)
    got = forward_backward_views(candidate, leaves, build)
    assert_results_close(got, expected, torch.float64)


LSTM_CELL_LAYOUT_CASES = {
    "input_transposed": ([(I, B)], lambda x: (x.t(),)),
    "input_strided": ([(2 * B, 3 * I)], lambda x: (x[::2, ::3],)),
    "hx_expanded": ([(B, I), (1, H), (1, H)], lambda x, h, c: (x, (h.expand(B, H), c.expand(B, H)))),
    "hx_transposed": ([(B, I), (H, B), (H, B)], lambda x, h, c: (x, (h.t(), c.t()))),
    "c_only_strided": ([(B, I), (B, H), (B, 2 * H)], lambda x, h, c: (x, (h, c[:, 1::2]))),
    "unbatched_strided": ([(2 * I,), (2 * H,), (3 * H,)],
                          lambda x, h, c: (x[::2], (h[1::2], c[::3]))),
}


@pytest.mark.parametrize("kind", list(LSTM_CELL_KINDS))
@pytest.mark.parametrize("case", list(LSTM_CELL_LAYOUT_CASES))
def test_lstm_cell_noncontiguous_inputs(kind, case):
    leaf_shapes, build = LSTM_CELL_LAYOUT_CASES[case]
    torch_cls, fast_cls, kwargs = LSTM_CELL_KINDS[kind]
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, dtype=torch.float64, generator=gen) for s in leaf_shapes]
    assert not all(a.is_contiguous() for a in flatten_outputs(build(*leaves)))
    expected = forward_backward_views(reference, leaves, build)
    got = forward_backward_views(candidate, leaves, build)
    assert_results_close(got, expected, torch.float64)
