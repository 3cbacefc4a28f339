"""torch.func over the modules and cells: ``functional_call`` with other
parameters (tied ones too), ``torch.func.grad``, ``jacrev``, ``jacfwd``,
``hessian`` and ``vmap`` (ensembles, per-sample gradients), as torch.nn's;
RNN, GRU, LSTM (with and without proj_size) and their cells."""

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


def _module_pair(kind):
    """(is_cell, (torch.nn module, fastrnn module)) of ``kind``, float64, same weights."""
    is_cell = kind in CELL_KINDS
    torch_cls, fast_cls, kwargs = (CELL_KINDS if is_cell else KINDS)[kind]
    extra = {} if is_cell else {"num_layers": LAYERS, "bidirectional": True}
    pair = make_pair(torch_cls, fast_cls, I, H, dtype=torch.float64, **kwargs, **extra)
    return is_cell, pair


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_torch_func_grad(kind):
    # torch.func.grad over functional_call: the functorch path, which needs
    # the Functions' setup_context. Same gradients as torch.nn's.
    is_cell, (reference, candidate) = _module_pair(kind)
    gen = torch.Generator().manual_seed(10)
    params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)
    width = getattr(reference, "proj_size", 0) or H  # an LSTM's output is proj_size wide with one
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
    is_cell, (reference, candidate) = _module_pair(kind)
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


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_jacobians_and_hessian(kind):
    # jacrev batches the backward with vmap, jacfwd the tangents; hessian
    # nests them. The engines' ops have neither a batching rule nor a
    # forward-mode formula, so under torch.func a layer runs the reference
    # loop: torch.nn's derivatives, every order.
    is_cell, (reference, candidate) = _module_pair(kind)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn((2, I) if is_cell else (3, 2, I), dtype=torch.float64, generator=gen)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        expected = transform(lambda x: flatten_outputs(reference(x))[0])(x)
        got = transform(lambda x: flatten_outputs(candidate(x))[0])(x)
        assert_close(got, expected, msg=transform.__name__)
    expected = torch.func.hessian(lambda x: flatten_outputs(reference(x))[0].pow(2).sum())(x)
    got = torch.func.hessian(lambda x: flatten_outputs(candidate(x))[0].pow(2).sum())(x)
    assert_close(got, expected, msg="hessian")


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_per_sample_gradients(kind):
    # vmap(grad(loss)) over the samples of a batch: each sample's gradients
    # of the parameters, as torch.nn's module gives them one sample at a time.
    is_cell, (reference, candidate) = _module_pair(kind)
    gen = torch.Generator().manual_seed(12)
    params = {n: p.detach() for n, p in reference.named_parameters()}
    samples = torch.randn((B, 1, I) if is_cell else (B, T, 1, I), dtype=torch.float64,
                          generator=gen)

    def loss(module):
        def f(p, x):
            return flatten_outputs(torch.func.functional_call(module, p, (x,)))[0].pow(2).sum()
        return f

    got = torch.func.vmap(torch.func.grad(loss(candidate)), in_dims=(None, 0))(params, samples)
    for i in range(B):
        expected = torch.func.grad(loss(reference))(params, samples[i])
        for name, value in expected.items():
            assert_close(got[name][i], value, msg=f"sample {i} grad {name}")


@pytest.mark.parametrize("kind", list(KINDS) + list(CELL_KINDS))
def test_vmap_over_an_ensemble(kind):
    # Models of one architecture stacked with stack_module_state and run
    # together by vmap over their parameters, then differentiated. torch.nn's
    # cells run under vmap (its modules raise: aten::gru and friends have no
    # batching rule); each member must match torch.nn's module on its own.
    is_cell = kind in CELL_KINDS
    members = [_module_pair(kind)[1] for _ in range(3)]
    for seed, (reference, candidate) in enumerate(members):
        with torch.no_grad():  # distinct members
            for p, q in zip(reference.parameters(), candidate.parameters()):
                p.add_(0.1 * (seed + 1))
                q.copy_(p)
    params, buffers = torch.func.stack_module_state([c for _, c in members])
    gen = torch.Generator().manual_seed(13)
    x = torch.randn((B, I) if is_cell else (T, B, I), dtype=torch.float64, generator=gen)
    base = members[0][1]

    def run(p, b, x):
        return flatten_outputs(torch.func.functional_call(base, (p, b), (x,)))[0]

    got = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    got_grads = torch.func.vmap(torch.func.grad(lambda p, b, x: run(p, b, x).sum()),
                                in_dims=(0, 0, None))(params, buffers, x)
    for i, (reference, _) in enumerate(members):
        leaves = list(reference.parameters())
        out = flatten_outputs(reference(x))[0]
        assert_close(got[i], out.detach(), msg=f"member {i} output")
        grads = torch.autograd.grad(out.sum(), leaves)
        for (name, _), grad in zip(reference.named_parameters(), grads):
            assert_close(got_grads[name][i], grad, msg=f"member {i} grad {name}")
