"""torch.func over the modules and cells: ``functional_call`` with other
parameters (tied ones too) and ``torch.func.grad``, as torch.nn's; RNN,
GRU, LSTM (with and without proj_size) and their cells."""

import pytest
import torch

from conftest import (
    ALL_CELL_KINDS as CELL_KINDS,
    ALL_MODULE_KINDS as KINDS,
    assert_close,
    assert_results_close,
    flatten_outputs,
    forward_backward,
    make_pair,
    random_like_shape,
    tie,
)

I, H, B, T = 5, 6, 3, 4
LAYERS = 2

pytestmark = pytest.mark.usefixtures("intra_op_threads")  # see conftest


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_torch_func_grad(kind):
    # torch.func.grad over functional_call: the functorch path, which needs
    # the Functions' setup_context. Same gradients as torch.nn's.
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS, "bidirectional": True}
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    gen = torch.Generator().manual_seed(10)
    params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)
    width = kwargs.get("proj_size", 0) or H  # an LSTM's output is proj_size wide with one
    weight = torch.randn((B, H) if is_cell else (T, B, 2 * width), dtype=torch.float64, generator=gen)

    def loss(module):
        def f(p, x):
            out = torch.func.functional_call(module, p, (x,))
            out = out[0] if isinstance(out, tuple) else out
            return (out * weight).sum()
        return torch.func.grad(f, argnums=(0, 1))(params, x)

    (expected_params, expected_x), (got_params, got_x) = loss(reference), loss(candidate)
    assert_close(got_x, expected_x, msg="grad x")
    for name, value in expected_params.items():
        assert_close(got_params[name], value, msg=f"grad {name}")


# Cells have one set of weights, so nothing to tie.
@pytest.mark.parametrize("kind, tied", [(k, False) for k in list(KINDS) + list(CELL_KINDS)]
                         + [(k, True) for k in KINDS])
def test_functional_call(kind, tied):
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS, "bidirectional": True}
    reference, candidate = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    if tied:
        tie(reference)
        tie(candidate)
    gen = torch.Generator().manual_seed(8)
    # Different tensors for every parameter, one of them non-contiguous.
    params = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen)
              for n, p in reference.named_parameters()}
    first = next(iter(params))
    params[first] = params[first].t().contiguous().t()
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)

    def run(module):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        outputs = flatten_outputs(torch.func.functional_call(module, leaves, (x,)))
        upstream_gen = torch.Generator().manual_seed(9)
        upstream = [random_like_shape(o.shape, o.dtype, upstream_gen).to(o.device) for o in outputs]
        grads = torch.autograd.grad(outputs, list(leaves.values()), upstream)
        return {"output": outputs[0].detach(), **{f"grad_{n}": g for n, g in zip(leaves, grads)}}

    expected = run(reference)
    got = run(candidate)
    assert_results_close(got, expected, torch.float64)
    # Afterwards the modules are back on their own parameters.
    expected = forward_backward(reference, x)
    got = forward_backward(candidate, x)
    assert_results_close(got, expected, torch.float64)
