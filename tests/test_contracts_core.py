"""Contracts of the core: the curvature primitives' errors and edge cases (``power_iteration``'s
stopping rule, budget, zero operator and non-finite mode against hand-computed values), the
curvature sources of ``evaluate`` and their messages, and the optimizer base class (masking,
momentum, weight decay, health warnings, checkpoint checks and the 0.1 migration), run through
a minimal gradient-descent subclass whose update is known in closed form."""

from __future__ import annotations

import warnings

import pytest
import torch

from torch_rankone.curvature import (
    functional_per_sample_grads,
    graph_hvp,
    graph_hvp_fn,
    hvp,
    lambda_max,
    per_sample_grads,
    power_iteration,
)
from torch_rankone.optim import CurvatureError, _data_parallel, _protocol
from torch_rankone.optim._data_parallel import (
    Layout,
    ReplicaMismatchError,
    average,
    check_same_params,
    collective_device,
    is_sharded,
    layout_of,
    mean_scalar,
)
from torch_rankone.optim._protocol import (
    SecondOrderOptimizer,
    all_finite,
    evaluate,
    split_groups,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# curvature.py
# ------------------------------------------------------------------------------------------------


def test_hvp_structure_mismatch_names_both_structures():
    params = (torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"(?s)^hvp: v has structure .* params have ") as exc:
        hvp(lambda ps: ps[0].sum() + ps[1].sum(), params, [torch.zeros(2), torch.zeros(3)])
    assert "TreeSpec(list" in str(exc.value) and "TreeSpec(tuple" in str(exc.value)
    with pytest.raises(ValueError, match=r"^hvp: v leaf 1 has shape \(2,\), expected \(3,\)$"):
        hvp(lambda ps: ps[0].sum(), params, (torch.zeros(2), torch.zeros(2)))


def test_hvp_on_a_dict_matches_the_hand_hessian():
    # f = a₀²a₁ + b³: H v by hand
    a = torch.tensor([1.5, -2.0], dtype=F64)
    b = torch.tensor([0.5], dtype=F64)
    va, vb = torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([-1.0], dtype=F64)
    out = hvp(lambda p: p["a"][0] ** 2 * p["a"][1] + (p["b"] ** 3).sum(), {"a": a, "b": b},
              {"a": va, "b": vb})  # fmt: skip
    h_a = torch.tensor([2 * a[1] * va[0] + 2 * a[0] * va[1], 2 * a[0] * va[0]], dtype=F64)
    torch.testing.assert_close(out["a"], h_a, rtol=1e-14, atol=0)
    torch.testing.assert_close(out["b"], 6 * b * vb, rtol=1e-14, atol=0)


def test_graph_hvp_keeps_the_graph_by_default_and_frees_it_on_request():
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad((w**3).sum(), [w], create_graph=True)
    v = [torch.ones(2, dtype=F64)]
    first = graph_hvp([g], [w], v)
    torch.testing.assert_close(graph_hvp([g], [w], v)[0], first[0])  # graph still there
    torch.testing.assert_close(first[0], 6 * w.detach(), rtol=1e-15, atol=0)
    graph_hvp([g], [w], v, retain_graph=False)
    with pytest.raises(RuntimeError, match="second time"):
        graph_hvp([g], [w], v)


def test_graph_hvp_mixes_live_and_constant_gradients():
    """Entries without a graph contribute nothing; the others give their exact ``Hv``; the
    direction of a live entry is paired with that entry (not with the first ``v``)."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    u = torch.tensor([3.0], dtype=F64, requires_grad=True)
    (gu,) = torch.autograd.grad((u**3).sum(), [u], create_graph=True)  # Hu = 6 u
    const = torch.ones(2, dtype=F64)  # a gradient taken without create_graph
    hw, hu = graph_hvp([const, gu], [w, u], [torch.full((2,), 5.0, dtype=F64),
                                             torch.tensor([2.0], dtype=F64)])  # fmt: skip
    assert torch.equal(hw, torch.zeros(2, dtype=F64)) and torch.equal(hu, 6 * u.detach() * 2)
    none = graph_hvp([const], [w], [const])
    assert torch.equal(none[0], torch.zeros(2, dtype=F64))
    msg = "graph_hvp: 1 gradients, 2 parameters, 1 directions"
    with pytest.raises(ValueError, match=f"^{msg}$"):
        graph_hvp([const], [w, u], [const])


def test_graph_hvp_fn_refuses_a_non_scalar_loss_with_its_shape():
    w = torch.ones(3, requires_grad=True)
    message = r"^graph_hvp_fn: loss must be a scalar, got shape \(3,\)$"
    with pytest.raises(ValueError, match=message):
        graph_hvp_fn(w * 2, [w])


def test_per_sample_grads_graph_is_freed_unless_retained():
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    unused = torch.zeros(3, dtype=F64, requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]], dtype=F64)
    losses = (x @ w) ** 2
    gw, gu = per_sample_grads(losses, [w, unused], retain_graph=True)
    torch.testing.assert_close(gw, 2 * (x @ w.detach())[:, None] * x, rtol=1e-15, atol=0)
    assert gu.shape == (3, 3) and gu.dtype == F64 and not gu.any()
    losses.sum().backward()  # retained: the graph can still be used
    per_sample_grads((x @ w) ** 2, [w])
    losses = (x @ w) ** 2
    per_sample_grads(losses, [w])
    with pytest.raises(RuntimeError, match="second time"):
        losses.sum().backward()  # the default frees the graph


def test_per_sample_grads_messages():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"^per_sample_grads: losses must be a 1-D tensor of "
                       r"per-sample losses, got shape \(\)$"):  # fmt: skip
        per_sample_grads((w**2).sum(), [w])
    with pytest.raises(ValueError, match=r"^per_sample_grads: losses do not require grad "
                       r"\(no graph to the params\)$"):  # fmt: skip
        per_sample_grads(torch.ones(3), [w])


def test_functional_per_sample_grads_messages():
    w = torch.ones(2)
    with pytest.raises(ValueError, match="^functional_per_sample_grads: pass at least one "
                       "batched tensor$"):  # fmt: skip
        functional_per_sample_grads(lambda p: p.sum(), w)
    expected = ("functional_per_sample_grads: batch tensors must share a leading batch "
                "dimension, got shapes [(3,), (4,)]")  # fmt: skip
    with pytest.raises(ValueError) as exc:
        functional_per_sample_grads(lambda p, a, b: p.sum(), w, torch.ones(3), torch.ones(4))
    assert str(exc.value) == expected
    with pytest.raises(ValueError, match="got shapes \\[\\(3,\\), \\(\\)\\]"):  # 0-d: no batch
        functional_per_sample_grads(lambda p, a, b: p.sum(), w, torch.ones(3), torch.tensor(1.0))


def _sym(eigenvalues, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T, Q


def _counting(H):
    calls = []

    def hvp_fn(v):
        calls.append(1)
        return [H @ v[0]]

    return hvp_fn, calls


def test_power_iteration_spends_exactly_its_budget_and_reports_the_last_residual():
    H, _ = _sym([4.0, -4.0, 1.0, 0.5])  # ±4: never converges
    like = [torch.zeros(4, dtype=F64)]
    hvp_fn, calls = _counting(H)
    res = power_iteration(hvp_fn, like, max_iters=7, warn=False,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(calls) == 7 and res.num_iters == 7 and res.converged is False
    assert isinstance(res.residual, float) and 1e-3 < res.residual < 10
    # one product from a known start: λ, the residual and the next iterate by hand
    one = power_iteration(_counting(H)[0], like, max_iters=1, warn=False, init=[H[:, 0].clone()])
    v = H[:, 0] / H[:, 0].norm()
    hv = H @ v
    lam = v @ hv
    assert one.num_iters == 1 and not one.converged
    assert one.residual == pytest.approx(float((hv - lam * v).norm() / lam.abs()), rel=1e-12)
    assert float(one.eigenvalue) == pytest.approx(float(lam), rel=1e-14)
    torch.testing.assert_close(one.eigenvector[0], hv / hv.norm(), rtol=1e-14, atol=1e-15)


def test_power_iteration_residual_is_relative_to_the_eigenvalue():
    """``‖Hv − λv‖/|λ|``: the same for ``H`` and ``100 H`` (a product would scale by 10⁴)."""
    H, _ = _sym([3.0, 1.0, 0.5])
    like = [torch.zeros(3, dtype=F64)]
    init = [torch.tensor([1.0, 2.0, -1.0], dtype=F64)]
    a = power_iteration(lambda v: [H @ v[0]], like, max_iters=1, warn=False, init=init)
    b = power_iteration(lambda v: [100 * H @ v[0]], like, max_iters=1, warn=False, init=init)
    assert b.residual == pytest.approx(a.residual, rel=1e-12)
    assert float(b.eigenvalue) == pytest.approx(100 * float(a.eigenvalue), rel=1e-12)


def test_power_iteration_stops_at_a_residual_equal_to_tol():
    H, _ = _sym([3.0, 1.0, 0.5])
    like = [torch.zeros(3, dtype=F64)]
    init = [torch.tensor([1.0, 2.0, -1.0], dtype=F64)]
    r = power_iteration(lambda v: [H @ v[0]], like, max_iters=1, warn=False, init=init).residual
    res = power_iteration(lambda v: [H @ v[0]], like, max_iters=5, tol=r, init=init)
    assert res.converged is True and res.num_iters == 1 and res.residual == r


def test_power_iteration_zero_operator_and_orthogonal_start():
    like = [torch.zeros(3, dtype=F64)]
    init = [torch.tensor([0.0, 3.0, 4.0], dtype=F64)]
    zero = power_iteration(lambda v: [torch.zeros_like(v[0])], like, init=init)
    assert zero.converged is True and zero.num_iters == 1 and zero.residual == 0.0
    assert float(zero.eigenvalue) == 0.0 and zero.eigenvalue.shape == ()
    torch.testing.assert_close(zero.eigenvector[0], init[0] / 5, rtol=0, atol=1e-16)
    # λ = vᵀHv = 0 with Hv ≠ 0 (a swap): the residual is infinite, never "converged"
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    res = power_iteration(lambda v: [swap @ v[0]], [torch.zeros(2, dtype=F64)], max_iters=3,
                          warn=False, init=[torch.tensor([1.0, 0.0], dtype=F64)])  # fmt: skip
    assert res.residual == float("inf") and not res.converged and float(res.eigenvalue) == 0
    # the identity from a unit vector: ‖Hv‖ = λ = 1 exactly, residual 0 at the first product
    eye = power_iteration(
        lambda v: [v[0].clone()], like, init=[torch.tensor([0.0, 0.6, 0.8], dtype=F64)]
    )
    assert eye.converged and eye.num_iters == 1 and eye.residual == 0.0


def test_power_iteration_non_finite_products():
    like = [torch.zeros(3, dtype=F64)]
    init = [torch.tensor([2.0, 0.0, 0.0], dtype=F64)]
    msg = r"^power_iteration: the HVP returned non-finite values$"
    with pytest.raises(FloatingPointError, match=msg):
        power_iteration(lambda v: [v[0] * float("inf")], like, init=init)
    calls = []

    def third_is_nan(v):  # two finite products (a stalling operator), then NaN
        calls.append(1)
        out = torch.stack([v[0][1], v[0][0], v[0][2]])
        return [out * float("nan")] if len(calls) == 3 else [out]

    res = power_iteration(third_is_nan, like, init=[torch.tensor([1.0, 0.5, 0.0], dtype=F64)],
                          raise_nonfinite=False)  # fmt: skip
    assert res.num_iters == 3 and res.residual == float("inf") and res.converged is False
    assert torch.isnan(res.eigenvalue) and res.eigenvalue.dtype == F64
    # the iterate the NaN product was taken at (two swaps of the normalised start)
    torch.testing.assert_close(
        res.eigenvector[0], torch.tensor([1.0, 0.5, 0.0], dtype=F64) / 1.25**0.5
    )


def test_power_iteration_warning_text_and_location():
    H, _ = _sym([4.0, -4.0, 1.0])
    like = [torch.zeros(3, dtype=F64)]
    with pytest.warns(RuntimeWarning) as rec:
        res = power_iteration(lambda v: [H @ v[0]], like, max_iters=3, tol=1e-5,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(rec) == 1 and rec[0].filename == __file__
    assert str(rec[0].message) == (
        f"power_iteration: not converged after 3 iterations (relative residual "
        f"{res.residual:.2e} > tol 1.0e-05); the eigenvalue {float(res.eigenvalue):.6g} may be "
        "underestimated. Raise max_iters, or the top two eigenvalues are nearly equal in "
        "magnitude."
    )
    assert res.converged is False and res.residual > 1e-5


def test_lambda_max_passes_its_options_and_warns_at_the_callers_line():
    H, Q = _sym([-5.0, 2.0, 1.0, 0.5])
    like = [torch.zeros(4, dtype=F64)]

    def hvp_fn(v):
        return [H @ v[0]]

    est = lambda_max(hvp_fn, like, generator=torch.Generator().manual_seed(0))
    ref = power_iteration(hvp_fn, like, generator=torch.Generator().manual_seed(0))
    assert torch.equal(est, ref.eigenvalue) and abs(float(est) + 5) < 1e-9
    # tol and max_iters reach power_iteration: a loose tol stops earlier than the default
    loose = lambda_max(hvp_fn, like, tol=1e-2, generator=torch.Generator().manual_seed(0))
    ref = power_iteration(hvp_fn, like, tol=1e-2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loose, ref.eigenvalue) and loose != est
    H2, _ = _sym([4.0, -4.0, 1.0, 0.5])
    with pytest.warns(RuntimeWarning, match="not converged after 100 iterations") as rec:
        lambda_max(lambda v: [H2 @ v[0]], like, generator=torch.Generator().manual_seed(0))
    assert rec[0].filename == __file__
    with pytest.warns(RuntimeWarning, match="not converged after 4 iterations"):
        lambda_max(lambda v: [H2 @ v[0]], like, max_iters=4)


# ------------------------------------------------------------------------------------------------
# _protocol.evaluate: the three curvature sources, their modes and their refusals
# ------------------------------------------------------------------------------------------------


def _cubic(dtype=F64):
    """``f = Σ w³ + w₀ u²`` of ``w ∈ R²``, ``u ∈ R``, and ``z ∈ R³`` that the loss ignores, with
    its gradient and ``Hv`` by hand."""
    w = torch.tensor([0.5, -1.0], dtype=dtype, requires_grad=True)
    u = torch.tensor([2.0], dtype=dtype, requires_grad=True)
    z = torch.ones(3, dtype=dtype, requires_grad=True)

    def f():
        return (w**3).sum() + w[0] * u[0] ** 2

    def grad():
        wd, ud = w.detach(), u.detach()
        return [3 * wd**2 + torch.stack([ud[0] ** 2, torch.zeros((), dtype=dtype)]),
                2 * wd[0] * ud, torch.zeros(3, dtype=dtype)]  # fmt: skip

    def hv(v):
        wd, ud = w.detach(), u.detach()
        hw = 6 * wd * v[0] + torch.stack([2 * ud[0] * v[1][0], torch.zeros((), dtype=dtype)])
        return [hw, 2 * ud * v[0][0] + 2 * wd[0] * v[1], torch.zeros(3, dtype=dtype)]

    return [w, u, z], f, grad, hv


def _closures(params, f):
    def backward(create_graph=False):
        def closure():
            for p in params:
                p.grad = None
            loss = f()
            loss.backward(create_graph=create_graph)
            return loss

        return closure

    return {"loss": f, "backward": backward(), "graph_backward": backward(create_graph=True)}


EVALUATE_CASES = [  # (source given, hvp mode) -> (Evaluation.source, HVP kind)
    ("graph", "auto", "graph", "exact"),
    ("graph", "exact", "graph", "exact"),
    ("graph_backward", "auto", "graph", "exact"),
    ("graph_backward", "exact", "graph", "exact"),
    ("graph_backward", "fd", "backward_closure", "fd"),
    ("backward", "auto", "backward_closure", "fd"),
    ("backward", "fd", "backward_closure", "fd"),
    ("loss", "auto", "loss_closure", "exact"),
    ("loss", "exact", "loss_closure", "exact"),
    ("loss", "fd", "loss_closure", "fd"),
]


@pytest.mark.parametrize("need_hvp", [True, False])
@pytest.mark.parametrize(("given", "mode", "source", "kind"), EVALUATE_CASES)
def test_evaluate_every_source_and_mode(given, mode, source, kind, need_hvp):
    """Loss (detached; ``None`` for graph gradients), the plain gradient, ``Hv`` (exact or a
    central difference), the source's name and which parameter got no gradient, against the
    hand-computed derivatives of a cubic; the parameters are unchanged by the products."""
    params, f, grad, hv = _cubic()
    closure = None
    if given == "graph":
        f().backward(create_graph=True)
    else:
        closure = _closures(params, f)[given]
    ev = evaluate(params, closure, mode, need_hvp=need_hvp)
    assert ev.source == source
    assert ev.no_grad == (False, False, True)
    value = float(f().detach())
    if given == "graph":
        assert ev.loss is None
    else:
        assert not ev.loss.requires_grad and float(ev.loss) == value
    for g, want in zip(ev.grads, grad()):
        assert not g.requires_grad
        torch.testing.assert_close(g, want, rtol=1e-15, atol=0)
    if not need_hvp:
        assert ev.hvp_fn is None
        return
    before = [p.detach().clone() for p in params]
    v = [torch.tensor([0.3, -0.8], dtype=F64), torch.tensor([1.1], dtype=F64),
         torch.tensor([1.0, 2.0, 3.0], dtype=F64)]  # fmt: skip
    out = ev.hvp_fn(v)
    tol = 1e-13 if kind == "exact" else 1e-8  # central differences: ~1e-10 measured
    for h, want in zip(out, hv(v)):
        torch.testing.assert_close(h, want, rtol=tol, atol=tol)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    if kind == "fd":  # the difference quotient is not exact: it is not the graph's product
        assert any(not torch.equal(h, want) for h, want in zip(out, hv(v)))


def test_evaluate_ignores_a_stale_graph_gradient_when_the_closure_wrote_none():
    """``.grad`` left from an earlier ``backward(create_graph=True)`` is not this call's: a loss
    closure that ran no backward is differentiated itself."""
    params, f, grad, hv = _cubic()
    (2 * f()).backward(create_graph=True)  # stale, and twice the current gradient
    ev = evaluate(params, f, "auto")
    assert ev.source == "loss_closure"
    torch.testing.assert_close(ev.grads[0], grad()[0], rtol=1e-15, atol=0)


def test_evaluate_refusals_say_what_to_do():
    conventions = _protocol._CONVENTIONS
    params, f, _, _ = _cubic()
    closures = _closures(params, f)

    def refused(closure, mode, **kwargs):
        with pytest.raises(CurvatureError) as exc:
            evaluate(params, closure, mode, **kwargs)
        return str(exc.value)

    for p in params:
        p.grad = None
    assert refused(None, "auto") == (
        "step() got no closure and the gradients carry no graph. " + conventions
    )
    f().backward(create_graph=True)
    assert refused(None, "fd") == (
        "hvp='fd' re-evaluates gradients at shifted parameters and needs a closure. " + conventions
    )
    assert refused(closures["backward"], "exact") == (
        "hvp='exact' cannot use a closure that calls backward() itself (gradients without a "
        "graph). Return the loss without calling backward, or call "
        "loss.backward(create_graph=True) in it, or use hvp='fd'. " + conventions
    )
    assert refused(lambda: 1.5, "auto") == (
        "the closure must return the loss as a tensor, got <class 'float'>"
    )
    assert refused(lambda: f().detach(), "auto") == (
        "the closure returned a loss without a graph and did not call backward(). " + conventions
    )
    assert refused(lambda: params[0] * 2, "auto") == (
        "the closure must return a scalar loss, got shape (2,)"
    )
    # FSDP2 shards get gradients only from backward(): everything else is refused
    for closure, mode in [(None, "auto"), (closures["backward"], "exact"), (f, "auto"),
                          (f, "fd")]:  # fmt: skip
        assert refused(closure, mode, sharded=True) == _protocol._SHARDED
    ev = evaluate(params, closures["backward"], "auto", sharded=True)
    assert ev.source == "backward_closure" and ev.hvp_fn is not None


def test_evaluate_refuses_sparse_gradients():
    emb = torch.nn.Embedding(5, 2, sparse=True).double()

    def closure():
        emb.zero_grad()
        loss = emb(torch.tensor([1, 3])).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(CurvatureError) as exc:
        evaluate(list(emb.parameters()), closure, "auto")
    assert str(exc.value) == (
        "sparse gradients (e.g. nn.Embedding(sparse=True)) are not supported: the curvature "
        "solves need dense vectors; use sparse=False"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_only_for_finite_differences(dtype):
    params, f, grad, _ = _cubic(dtype)
    closures = _closures(params, f)
    message = (
        f"finite-difference HVPs need float32 or float64 parameters, got ['{dtype}']: the step "
        "eps^(1/3) is 0.1-0.2 in half precision, so the difference quotient means nothing. "
        "Train in float32 (bfloat16 autocast is fine) or give an exact curvature source "
        "(loss.backward(create_graph=True), or a closure that returns the loss without calling "
        "backward)."
    )
    for closure, mode in [(f, "fd"), (closures["backward"], "auto")]:
        with pytest.raises(CurvatureError) as exc:
            evaluate(params, closure, mode)
        assert str(exc.value) == message
    # without products, or with exact ones, half precision is fine
    for closure, mode, need_hvp in [(f, "fd", False), (closures["backward"], "fd", False),
                                    (f, "auto", True), (f, "exact", True)]:  # fmt: skip
        ev = evaluate(params, closure, mode, need_hvp=need_hvp)
        torch.testing.assert_close(ev.grads[0], grad()[0])
        assert (ev.hvp_fn is None) == (not need_hvp)


class _NoDoubleBackward(torch.autograd.Function):
    """``x²`` whose backward refuses to build a graph, with the message of a ``torch.compile``'d
    backward (donated buffers)."""

    message = "This backward function was compiled with non-empty donated buffers"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(_NoDoubleBackward.message)
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_compiled_backward_is_refused_for_exact_hvps_and_works_with_finite_differences():
    x = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)

    def loss():
        return _NoDoubleBackward.apply(x).sum() * x[0]

    with pytest.raises(CurvatureError) as exc:
        evaluate([x], loss, "auto")
    assert str(exc.value) == _protocol._COMPILED
    assert isinstance(exc.value.__cause__, RuntimeError)
    # finite differences never build a graph: f = x₀(x₀² + x₁²), Hv by hand
    ev = evaluate([x], loss, "fd")
    v = [torch.tensor([1.0, 0.5], dtype=F64)]
    xd = x.detach()
    h = torch.tensor([[6 * xd[0], 2 * xd[1]], [2 * xd[1], 2 * xd[0]]], dtype=F64)
    torch.testing.assert_close(ev.hvp_fn(v)[0], h @ v[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ev.grads[0], torch.stack([3 * xd[0] ** 2 + xd[1] ** 2,
                                                         2 * xd[0] * xd[1]]))  # fmt: skip


def test_other_backward_errors_pass_through_unchanged(monkeypatch):
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    monkeypatch.setattr(_BackwardRaises, "message", "broken backward")
    with pytest.raises(RuntimeError, match="^broken backward$") as exc:
        evaluate([x], lambda: _BackwardRaises.apply(x).sum(), "auto")
    assert type(exc.value) is RuntimeError
    # a "compiled" error without create_graph is not the double-backward refusal either
    monkeypatch.setattr(_BackwardRaises, "message", "a compiled backward failed")
    with pytest.raises(RuntimeError) as exc:
        _protocol._loss_grads(_BackwardRaises.apply(x).sum(), [x], create_graph=False)
    assert type(exc.value) is RuntimeError and "compiled" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# SecondOrderOptimizer: the base class through a minimal gradient-descent subclass
# ------------------------------------------------------------------------------------------------


class _GD(SecondOrderOptimizer):
    """``x ← x(1 − lr·wd) − lr·m̂``: the base class's preamble, masking and counters, with the
    identity as preconditioner (``m̂ = g`` without momentum)."""

    def __init__(self, params, lr=0.1, momentum=0.0, weight_decay=0.0, hvp="auto", **kwargs):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "hvp": hvp}
        super().__init__(params, defaults, **kwargs)

    def _step(self, closure):
        inputs = self._evaluate_step(closure)
        if inputs is None:
            return None
        self.inputs = inputs
        if getattr(self, "probe", None) is not None:  # Hv of the step's HVP, before the update
            self.probe_hv = inputs.hvp(self.probe)
        ok = all_finite(inputs.loss, *inputs.direction_input)
        self._apply_masked(inputs.groups, split_groups(inputs.direction_input, inputs.groups), ok)
        self._detach_grads(inputs.params, inputs.grads)
        return inputs.loss


class _Plain(_GD):
    """Only ``lr``: the optional update extras (momentum, weight decay) are absent."""

    def __init__(self, params, lr=0.1, **kwargs):
        SecondOrderOptimizer.__init__(self, params, {"lr": lr}, **kwargs)


def _quadratic(c=(1.0, 2.0, 3.0), x0=(1.0, -1.0, 0.5)):
    """``f = ½ Σ cᵢ xᵢ²`` over three scalar parameters: ``g = c ⊙ x``."""
    xs = [torch.tensor([v], dtype=F64, requires_grad=True) for v in x0]
    cs = list(c)

    def loss():
        return sum(0.5 * ci * (xi**2).sum() for ci, xi in zip(cs, xs))

    return xs, cs, loss


def test_update_with_momentum_and_decoupled_weight_decay_per_group():
    """Two groups with their own ``lr`` (and a frozen one): ``m_t = β m_{t−1} + (1 − β) g_t``,
    ``m̂_t = m_t / (1 − β^t)``, ``x ← x(1 − lr·wd) − lr·m̂`` by hand over two steps."""
    xs, cs, loss = _quadratic()
    frozen = torch.zeros(2, dtype=F64)  # requires_grad False: left out of the step
    beta, wd, lrs = 0.5, 0.1, (0.1, 0.2)
    opt = _GD([{"params": [xs[0], xs[1]]}, {"params": [xs[2]], "lr": lrs[1]},
               {"params": [frozen]}], lr=lrs[0], momentum=beta, weight_decay=wd)  # fmt: skip
    lr_of = [lrs[0], lrs[0], lrs[1]]
    x = [float(v) for v in (1.0, -1.0, 0.5)]
    m = [0.0, 0.0, 0.0]
    for t in (1, 2):
        returned = opt.step(loss)
        want_loss = sum(0.5 * c * xi**2 for c, xi in zip(cs, x))
        assert float(returned) == pytest.approx(want_loss, rel=1e-15)
        g = [c * xi for c, xi in zip(cs, x)]
        m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
        x = [xi * (1 - lr * wd) - lr * mi / (1 - beta**t) for xi, lr, mi in zip(x, lr_of, m)]
        for p, want in zip(xs, x):
            assert float(p.detach()) == pytest.approx(want, rel=1e-14)
        for p, want in zip(xs, m):
            assert float(opt.state[p]["momentum_buffer"]) == pytest.approx(want, rel=1e-14)
        for p, gi in zip(xs, g):  # .grad: the plain gradient, no graph
            assert not p.grad.requires_grad and float(p.grad) == pytest.approx(gi, rel=1e-15)
    assert torch.equal(frozen, torch.zeros(2, dtype=F64)) and opt.counters()["step"] == 2


def test_momentum_is_bias_corrected_in_the_parameters_dtype():
    """float32 parameters: ``1 − β^t`` (computed in float64) is cast to float32, not left as
    float64 (which would promote the direction)."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = _GD([x], lr=0.5, momentum=0.9)
    opt.step(lambda: (x**2).sum())
    assert opt.inputs.direction_input[0].dtype == torch.float32
    torch.testing.assert_close(x.detach(), torch.tensor([0.0, 0.0]))  # m̂₁ = g₀ = 2x


def test_without_the_extras_the_step_is_plain_gradient_descent():
    xs, cs, loss = _quadratic()
    opt = _Plain(xs, lr=0.25)
    opt.step(loss)
    for p, c, x0 in zip(xs, cs, (1.0, -1.0, 0.5)):
        assert float(p.detach()) == pytest.approx(x0 - 0.25 * c * x0, rel=1e-15)
    groups = [list(xs)]
    assert not opt._uses_weight_decay(groups) and opt._momentum_gradient(groups, [1]) == [1]


def test_a_non_finite_step_changes_nothing_and_is_counted():
    xs, _, loss = _quadratic()
    opt = _GD(xs, lr=0.1, momentum=0.5, weight_decay=0.1)
    opt.step(loss)
    before = [p.detach().clone() for p in xs]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in xs]
    opt.step(lambda: loss() * float("nan"))
    assert all(torch.equal(p, b) for p, b in zip(xs, before))  # no step, no decay
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(xs, buffers))
    assert opt.counters() == {"step": 1, "skipped_steps": 1}
    # a finite direction whose lr·y overflows is masked too, and so is an infinite decay
    big = _GD(xs, lr=1.5e308)  # 1.3e308 for the first parameter, inf for the second
    big.step(loss)
    assert all(torch.equal(p, b) for p, b in zip(xs, before))
    assert big.counters() == {"step": 0, "skipped_steps": 1}
    decay = _GD(xs, lr=1e300, weight_decay=1e300)
    with torch.no_grad():  # as in step(); twice: an update without a momentum pass before it
        for _ in range(2):
            ok = decay._apply_masked([xs], [[torch.zeros(1, dtype=F64)] * 3], torch.tensor(True))
            assert not bool(ok) and all(torch.equal(p, b) for p, b in zip(xs, before))
    assert decay.counters() == {"step": 0, "skipped_steps": 2}


def test_weight_decay_as_a_tensor_and_an_empty_parameter():
    """``lr`` given as a tensor (schedulers may) multiplies the decay on device; an empty
    parameter takes part without breaking the finiteness check."""
    x = torch.tensor([2.0], dtype=F64, requires_grad=True)
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    opt = _GD([x, empty], lr=torch.tensor(0.5, dtype=F64), weight_decay=0.2)
    opt.step(lambda: (x**2).sum() + empty.sum())
    assert float(x.detach()) == pytest.approx(2.0 * (1 - 0.5 * 0.2) - 0.5 * 4.0, rel=1e-15)
    y = torch.tensor([2.0], requires_grad=True)  # float32: the factor follows the parameter
    opt = _GD([y], lr=0.5, weight_decay=0.2)
    opt.step(lambda: (y**2).sum())
    assert y.dtype == torch.float32
    assert float(y.detach()) == pytest.approx(2.0 * 0.9 - 2.0, rel=1e-6)


def test_parameters_without_a_gradient_get_no_step_no_decay_and_no_grad():
    """After a full step, a step where only ``xs[1]`` gets a gradient leaves the others (and
    their momentum buffers) alone; the group without any gradient is skipped, not the end."""
    xs, cs, loss = _quadratic()
    opt = _GD([{"params": [xs[0]]}, {"params": [xs[1], xs[2]]}], lr=0.1, weight_decay=0.5,
              momentum=0.5)  # fmt: skip
    opt.step(loss)
    after_one = [p.detach().clone() for p in xs]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in xs]
    assert all(b.abs().min() > 0 for b in buffers)
    opt.step(lambda: 0.5 * cs[1] * (xs[1] ** 2).sum())  # xs[0] and xs[2] get no gradient
    assert xs[0].grad is None and xs[2].grad is None and xs[1].grad is not None
    for i in (0, 2):
        assert torch.equal(xs[i].detach(), after_one[i])
        assert torch.equal(opt.state[xs[i]]["momentum_buffer"], buffers[i])
    x1, m1 = float(after_one[1]), float(buffers[1])
    m2 = 0.5 * m1 + 0.5 * cs[1] * x1
    assert float(opt.state[xs[1]]["momentum_buffer"]) == pytest.approx(m2, rel=1e-14)
    assert float(xs[1].detach()) == pytest.approx(x1 * 0.95 - 0.1 * m2 / (1 - 0.25), rel=1e-14)


def test_a_group_without_momentum_inputs_does_not_end_the_momentum_pass():
    xs, cs, loss = _quadratic()
    frozen = torch.zeros(1, dtype=F64)  # no trainable parameter in the first group
    opt = _GD([{"params": [frozen]}, {"params": xs}], lr=0.1, momentum=0.5)
    opt.step(loss)
    for p, c, x0 in zip(xs, cs, (1.0, -1.0, 0.5)):
        assert float(p.detach()) == pytest.approx(x0 - 0.1 * c * x0, rel=1e-15)


def test_shared_lr_and_uses_weight_decay():
    a, b = (torch.zeros(1, requires_grad=True) for _ in range(2))
    opt = _GD([{"params": [a]}, {"params": [b]}], lr=0.1)
    groups = [[a], [b]]
    assert opt._shared_lr(groups) == 0.1
    opt.param_groups[1]["lr"] = float("0.1")  # equal, another object
    assert opt.param_groups[1]["lr"] is not opt.param_groups[0]["lr"]
    assert opt._shared_lr(groups) == 0.1
    opt.param_groups[1]["lr"] = 0.2
    assert opt._shared_lr(groups) is None and opt._shared_lr([[a], []]) == 0.1
    lr = torch.tensor(0.1)
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
    assert opt._shared_lr(groups) is None  # equal tensors would need a sync to compare
    assert opt._shared_lr([[a], []]) is lr
    assert not opt._uses_weight_decay(groups)
    opt.param_groups[1]["weight_decay"] = 0.1
    assert opt._uses_weight_decay(groups) and not opt._uses_weight_decay([[a], []])


def test_zeros_state_creates_once_and_returns_the_entry():
    p = torch.ones(2, 3, dtype=F64).t()  # non-contiguous: the buffer keeps its strides
    opt = _GD([p.requires_grad_()])
    buf = opt._zeros_state(p, "extra")
    assert buf is opt.state[p]["extra"] and torch.equal(buf, torch.zeros(3, 2, dtype=F64))
    assert buf.stride() == p.stride()
    buf.add_(1)
    assert opt._zeros_state(p, "extra") is buf and float(buf.sum()) == 6


def test_split_groups_cuts_in_order():
    assert split_groups([1, 2, 3, 4, 5, 6], [[0], [0, 0], [0, 0, 0]]) == [[1], [2, 3], [4, 5, 6]]
    assert split_groups([1, 2], [[], [0, 0]]) == [[], [1, 2]]


# ---- checkpoints ----------------------------------------------------------------------------


def _trained_gd(dtype=F64):
    xs = [torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True),
          torch.tensor([3.0], dtype=dtype, requires_grad=True)]  # fmt: skip
    opt = _GD(xs, lr=0.1, momentum=0.5, generator=torch.Generator().manual_seed(0))
    opt.step(lambda: sum((x**2).sum() for x in xs))
    opt.step(lambda: sum((x**2).sum() for x in xs) * float("nan"))  # one skipped step
    return xs, opt


def _refusal(opt, state_dict):
    with pytest.raises(ValueError) as exc:
        opt.load_state_dict(state_dict)
    return str(exc.value)


def test_load_state_dict_refusals_name_the_problem():
    xs, opt = _trained_gd()
    saved = opt.state_dict()
    assert _refusal(opt, [1]) == (
        "_GD.load_state_dict: expected a dict with 'state' and 'param_groups'"
    )
    assert _refusal(opt, {"state": {}}) == (
        "_GD.load_state_dict: expected a dict with 'state' and 'param_groups'"
    )
    two = {**saved, "param_groups": saved["param_groups"] * 2}
    assert _refusal(opt, two) == (
        "_GD.load_state_dict: the checkpoint has 2 param groups, this optimizer 1"
    )
    group = {k: v for k, v in saved["param_groups"][0].items() if k not in ("momentum", "hvp")}
    group["param_names"] = ["a", "b"]  # named parameters' checkpoints carry their names
    assert _refusal(opt, {**saved, "param_groups": [group]}) == (
        "_GD.load_state_dict: not a _GD checkpoint: its param group lacks ['momentum'] (it has "
        "['lr', 'weight_decay'])"
    )
    one = {**saved["param_groups"][0], "params": [0]}
    assert _refusal(opt, {**saved, "param_groups": [one]}) == (
        "_GD.load_state_dict: a param group of the checkpoint has 1 parameters, this optimizer's 2"
    )
    # version 0.1's string keys come first: the parameters' entries are still checked
    state = {"step_calls": 3, 0: {**saved["state"][0], "exp_avg": torch.zeros(2)}, 1: {}}
    assert _refusal(opt, {**saved, "state": state}) == (
        "_GD.load_state_dict: the checkpoint's state has entries _GD does not keep: "
        "['exp_avg'] (another optimizer's checkpoint?)"
    )
    state = {0: saved["state"][0], 1: {"momentum_buffer": torch.zeros(2, dtype=F64)}}
    assert _refusal(opt, {**saved, "state": state}) == (
        "_GD.load_state_dict: state 'momentum_buffer' of parameter 1 has shape (2,), the "
        "parameter (1,)"
    )
    state = {0: saved["state"][0], 1: {"momentum_buffer": 0.0}}  # not even a tensor
    assert _refusal(opt, {**saved, "state": state}).endswith("has shape (), the parameter (1,)")
    # without momentum in the checkpoint's options, its buffers are not this optimizer's
    nomo = {**saved["param_groups"][0], "momentum": 0.0}
    assert "entries _GD does not keep: ['momentum_buffer']" in _refusal(
        opt, {**saved, "param_groups": [nomo]}
    )
    # an option added after 0.1 (hvp) may be missing: the default is taken
    old = {k: v for k, v in saved["param_groups"][0].items() if k != "hvp"}
    opt.param_groups[0]["hvp"] = "exact"
    opt.load_state_dict({**saved, "param_groups": [old]})
    assert opt.param_groups[0]["hvp"] == "auto"


def test_load_state_dict_keeps_the_counters_integers_and_continues_the_generator():
    """torch casts floating state to the parameters' dtype: the counters stay int64, the
    generator continues where it was saved."""
    xs, opt = _trained_gd(torch.float32)
    saved = opt.state_dict()
    draws = torch.randn(3, generator=opt.generator)
    ys = [x.detach().clone().requires_grad_() for x in xs]
    fresh = _GD(ys, lr=0.1, momentum=0.5, generator=torch.Generator().manual_seed(5))
    fresh.load_state_dict(saved)
    state = fresh.global_state
    assert state["step"].dtype == state["skipped_steps"].dtype == torch.int64
    assert fresh.counters() == {"step": 1, "skipped_steps": 1} and state["step_calls"] == 2
    assert state["damping"].dtype == torch.float32 and torch.isnan(state["damping"])
    assert torch.equal(torch.randn(3, generator=fresh.generator), draws)
    assert fresh._seed_synced is True  # the loaded state is every rank's: no broadcast
    for x, y in zip(xs, ys):
        torch.testing.assert_close(fresh.state[y]["momentum_buffer"],
                                   opt.state[x]["momentum_buffer"], rtol=0, atol=0)  # fmt: skip


def test_version_0_1_global_state_moves_into_the_first_parameters_entry():
    xs, opt = _trained_gd()
    saved = opt.state_dict()
    first = dict(saved["state"][0])
    legacy_globals = {k: first.pop(k) for k in ("step_calls", "step", "skipped_steps",
                                                  "generator_state")}  # fmt: skip
    legacy = {"state": {**legacy_globals, 0: first, 1: saved["state"][1]},
              "param_groups": saved["param_groups"]}  # fmt: skip
    ys = [x.detach().clone().requires_grad_() for x in xs]
    fresh = _GD(ys, lr=0.1, momentum=0.5)
    fresh.load_state_dict(legacy)
    assert fresh.counters() == {"step": 1, "skipped_steps": 1}
    assert fresh.global_state["step_calls"] == 2 and isinstance(legacy["state"]["step"],
                                                                torch.Tensor)  # fmt: skip
    assert "step" in legacy["state"]  # the caller's dict is not changed
    assert all(isinstance(k, int) for k in fresh.state_dict()["state"])
    # only global entries (no entry of the first parameter at all, as 0.1 could save)
    bare = {"state": {**legacy_globals}, "param_groups": saved["param_groups"]}
    other = _GD([x.detach().clone().requires_grad_() for x in xs], lr=0.1, momentum=0.5)
    other.load_state_dict(bare)
    assert other.counters() == {"step": 1, "skipped_steps": 1}
    # a checkpoint of an optimizer that never stepped may hold no state at all
    empty = _GD([x.detach().clone().requires_grad_() for x in xs], lr=0.1, momentum=0.5)
    empty.load_state_dict({"state": {}, "param_groups": saved["param_groups"]})
    assert empty.counters() == {"step": 0, "skipped_steps": 0}
    # the current format comes back unchanged (the same object)
    assert _protocol._migrate_global_state(saved) is saved


def test_state_survives_copying_and_old_global_keys_say_where_they_went():
    import copy

    xs, opt = _trained_gd()
    clone = copy.deepcopy(opt)
    assert isinstance(clone.state, _protocol._ParamState)
    assert clone.state[torch.zeros(1)] == {}  # per-parameter entries are still created
    with pytest.raises(KeyError) as exc:
        clone.state["skipped_steps"]
    assert exc.value.args[0] == (
        "'skipped_steps': optimizer-global state is kept in the first parameter's state since "
        "version 0.2; read opt.global_state[...] or opt.counters()"
    )


class _FakeCudaGenerator:
    """A generator of another device kind: its ``set_state`` refuses a CPU generator's state."""

    device = torch.device("cuda")

    def set_state(self, state):
        raise RuntimeError("wrong generator state size")


def test_a_generator_state_of_another_device_kind_continues_on_its_own_kind():
    xs, opt = _trained_gd()
    state = torch.Generator().manual_seed(11).get_state()
    owned = _GD([x.detach().clone().requires_grad_() for x in xs])
    owned.generator = _FakeCudaGenerator()
    with pytest.warns(UserWarning) as rec:
        owned._restore_generator(state)
    assert rec[0].filename == __file__ and str(rec[0].message) == (
        "_GD: the checkpoint's random generator is not a cuda generator's; random directions "
        "continue from it on the cpu (bit-identical to the saved run; pass generator= or start "
        "anew to draw on the parameters' device)"
    )
    assert isinstance(owned.generator, torch.Generator) and owned.generator.device.type == "cpu"
    assert torch.equal(owned.generator.get_state(), state)
    given = _GD([x.detach().clone().requires_grad_() for x in xs], generator=torch.Generator())
    given.generator = _FakeCudaGenerator()  # the user's generator: never replaced
    with pytest.raises(RuntimeError, match="^wrong generator state size$"):
        given._restore_generator(state)


# ------------------------------------------------------------------------------------------------
# Data parallelism, in one process: a fake torch.distributed with two ranks
# ------------------------------------------------------------------------------------------------


class _FakeDist:
    """``torch.distributed`` seen from the first rank of a group of two: the other rank holds
    every value plus 2, so a mean over the ranks is the value plus 1 (a missing or a repeated
    average shows); its generator state is ``rank0_state``; its parameter signature
    ``other_signature``. Every call must name ``group`` (the optimizer's process group), whose
    first rank is global rank 4 (0 for the default group)."""

    def __init__(self, world=2, initialized=True, backend="gloo", group=None):
        self.world, self.initialized, self.backend, self.group = world, initialized, backend, group
        self.reduces, self.broadcasts, self.gathers = [], 0, 0
        self.rank0_state = torch.Generator().manual_seed(123).get_state()
        self.other_signature = None

    def _check(self, group):
        assert group is self.group, f"collective on group {group!r}, expected {self.group!r}"

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def get_world_size(self, group=None):
        self._check(group)
        return self.world

    def get_backend(self, group=None):
        self._check(group)
        return self.backend

    def get_global_rank(self, group, rank):
        self._check(group)
        assert group is not None and rank == 0
        return 4

    def get_process_group_ranks(self, group):
        self._check(group)
        assert group is not None
        return [4, 7]

    def all_reduce(self, t, group=None):
        self._check(group)
        self.reduces.append((t.numel(), t.dtype))
        t.add_(t + 2)

    def broadcast(self, t, src, group=None):
        self._check(group)
        assert src == (0 if group is None else 4)
        self.broadcasts += 1
        t.copy_(self.rank0_state)

    def all_gather(self, out, t, group=None):
        self._check(group)
        assert len(out) == self.world and t.dtype == torch.int64
        self.gathers += 1
        out[0].copy_(t)
        other = self.other_signature
        out[1].copy_(t if other is None else torch.tensor(other, dtype=t.dtype))


@pytest.fixture
def fake_dist(monkeypatch):
    fake = _FakeDist()
    monkeypatch.setattr(_data_parallel, "dist", fake)
    monkeypatch.setattr(_protocol, "dist", fake)
    return fake


def test_average_buckets_by_size_and_dtype(fake_dist, monkeypatch):
    monkeypatch.setattr(_data_parallel, "BUCKET_NUMEL", 4)
    ts = [torch.arange(3, dtype=F64), torch.ones(1, dtype=F64), torch.ones(2, 1, dtype=F64),
          torch.ones(2, dtype=F64), torch.ones(2), torch.arange(5.0)]  # fmt: skip
    inputs = [t.clone() for t in ts]
    out = average(ts, None)
    # full buckets (3 + 1, then 2 + 2 after a flush), a new one per dtype, a large tensor alone
    assert fake_dist.reduces == [(4, F64), (4, F64), (2, torch.float32), (5, torch.float32)]
    for o, t in zip(out, inputs):
        assert o.shape == t.shape and o.dtype == t.dtype and torch.equal(o, t + 1)
    assert all(torch.equal(t, i) for t, i in zip(ts, inputs))  # not in place
    assert average([], None) == [] and fake_dist.reduces[4:] == []
    same = average(ts, None, inplace=True)
    assert all(s is t and torch.equal(t, i + 1) for s, t, i in zip(same, ts, inputs))


def test_average_of_one_bucket_and_mean_scalar(fake_dist):
    ts = [torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([[3.0]], dtype=F64)]
    out = average(ts, None)
    assert fake_dist.reduces == [(3, F64)]
    assert torch.equal(out[1], torch.tensor([[4.0]], dtype=F64))
    loss = torch.tensor(2.5, requires_grad=True) * 1
    mean = mean_scalar(loss, None)
    assert mean.shape == () and mean.dtype == torch.float32 and float(mean) == 3.5
    assert not mean.requires_grad and float(loss.detach()) == 2.5  # the input is left alone


def test_collective_device_follows_the_backend(monkeypatch):
    """NCCL takes the parameters' device, gloo the CPU."""
    like = torch.zeros(1, device="meta")
    for backend, want in [("gloo", "cpu"), ("nccl", "meta"), ("NCCL", "meta"),
                          ("cpu:gloo,cuda:nccl", "meta")]:  # fmt: skip
        monkeypatch.setattr(_data_parallel, "dist", _FakeDist(backend=backend))
        assert collective_device(None, like).type == want


def test_parameter_signatures_and_the_mismatch_error(fake_dist):
    a, b = torch.zeros(2, 3), torch.zeros(4, dtype=F64)
    sig = _data_parallel._signature
    count, total, digest = sig([a, b])
    assert (count, total) == (2, 10) and 0 <= digest < 2**56  # fits an int64 tensor
    assert sig([b, a])[2] != digest and sig([a.double(), b])[2] != digest
    assert sig([a.t(), b])[2] != digest and sig([a, b]) == (count, total, digest)
    check_same_params([a, b], Layout("single", None), "X")
    assert fake_dist.gathers == 0
    check_same_params([a, b], Layout("replicas", None), "X")
    assert fake_dist.gathers == 1
    fake_dist.other_signature = sig([a, b, b])
    with pytest.raises(ReplicaMismatchError) as exc:
        check_same_params([a, b], Layout("replicas", None), "RankOneNewton")
    assert str(exc.value) == (
        "RankOneNewton: the ranks hold different parameter lists (rank 0: 2 tensors, 10 "
        "elements, rank 1: 3 tensors, 14 elements; or the same counts with other shapes, dtypes "
        "or order). Every rank must build the same model and pass its parameters in the same "
        "order."
    )
    fake_dist.other_signature = sig([b, a])  # same counts, other order
    fake_dist.group = "pg"
    with pytest.raises(ReplicaMismatchError, match=r"\(rank 4: 2 tensors, 10 elements, rank 7: "):
        check_same_params([a, b], Layout("replicas", "pg"), "X")


class _Mesh:
    def __init__(self, ndim=1, group="mesh-group"):
        self.ndim, self.group = ndim, group

    def get_group(self):
        return self.group


class _Shard:
    """What ``is_sharded`` looks for in a DTensor."""

    def __init__(self, mesh):
        self.device_mesh, self.placements = mesh, ("Shard(0)",)


def test_layout_of_every_kind_and_refusal(fake_dist):
    plain = [torch.zeros(2), torch.zeros(1)]
    assert layout_of(plain, None) == Layout("replicas", None)
    fake_dist.group = "pg"
    assert layout_of(plain, "pg") == Layout("replicas", "pg")
    fake_dist.world = 1
    assert layout_of(plain, "pg") == Layout("single", "pg")
    fake_dist.world, fake_dist.initialized = 2, False
    assert layout_of(plain, "pg") == Layout("replicas", "pg")  # a group given: distributed
    fake_dist.group = None
    assert layout_of(plain, None) == Layout("single", None)
    mesh = _Mesh()
    assert not is_sharded(plain[0]) and is_sharded(_Shard(mesh))
    half = type("Half", (), {"device_mesh": mesh})()
    assert not is_sharded(half)
    shards = [_Shard(mesh), _Shard(mesh)]
    assert layout_of(shards, None) == Layout("shards", "mesh-group")
    assert layout_of(shards, "mesh-group") == Layout("shards", "mesh-group")
    with pytest.raises(ValueError) as exc:
        layout_of([shards[0], plain[0]], None)
    assert str(exc.value) == (
        "some parameters are DTensors (FSDP2) and some are not: shard the whole model with "
        "fully_shard, or optimise the two kinds with separate optimizers"
    )
    hsdp = ("sharded parameters are supported on one 1-D device mesh (FSDP2 fully_shard); HSDP "
            "and tensor parallelism are not")  # fmt: skip
    for params in ([_Shard(_Mesh(ndim=2))], [_Shard(mesh), _Shard(_Mesh())]):
        with pytest.raises(NotImplementedError) as exc:
            layout_of(params, None)
        assert str(exc.value) == hsdp
    with pytest.raises(ValueError) as exc:
        layout_of(shards, "another-group")
    assert str(exc.value) == (
        "process_group must be None (or the mesh's group) for FSDP2-sharded parameters: the "
        "shards' mesh decides which ranks take part"
    )


class _FakeDDP(torch.nn.parallel.DistributedDataParallel):
    """A ``DistributedDataParallel`` instance without a process group (only its type counts)."""

    def __init__(self, module):
        torch.nn.Module.__init__(self)
        self.module = module


def _replica_step(source, *, grads_synced=None, module=None):
    """One ``_GD`` step (lr 1) on ``f = Σ x²`` at ``x = (1, 2)``: ``g = 2x``, ``H = 2I``."""
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = _GD([x], lr=1.0, grads_synced=grads_synced, module=module)
    opt.probe = [torch.tensor([1.0, -1.0], dtype=F64)]
    closure = None
    if source == "graph":
        (x**2).sum().backward(create_graph=True)
        opt.caller_grad = x.grad
    elif source == "backward":

        def closure():
            x.grad = None
            loss = (x**2).sum()
            loss.backward()
            return loss
    else:

        def closure():
            return (x**2).sum()

    loss = opt.step(closure)
    g = torch.tensor([2.0, 4.0], dtype=F64)
    return opt, x, loss, g, 2 * opt.probe[0]


@pytest.mark.parametrize(
    ("source", "grads_synced", "ddp", "grads_averaged", "hvps_averaged"),
    [
        ("loss", None, False, True, True),
        ("loss", True, False, True, True),  # DDP never saw an autograd.grad gradient
        ("backward", None, False, True, True),
        ("backward", False, True, True, True),
        ("backward", None, True, False, False),  # a DDP module: its backward averaged
        ("backward", True, False, False, False),
        ("graph", True, False, False, True),  # double backward bypasses DDP's hooks
        ("graph", None, False, True, True),
    ],
)
def test_replicas_average_what_the_model_did_not(fake_dist, source, grads_synced, ddp,
                                                 grads_averaged, hvps_averaged):  # fmt: skip
    module = _FakeDDP(torch.nn.Linear(1, 1)) if ddp else None
    opt, x, loss, g, hv = _replica_step(source, grads_synced=grads_synced, module=module)
    assert opt._layout == Layout("replicas", None)
    names = {"loss": "loss_closure", "backward": "backward_closure", "graph": "graph"}
    assert opt.inputs.evaluation.source == names[source]
    want_g = g + 1 if grads_averaged else g
    torch.testing.assert_close(opt.inputs.grads[0], want_g, rtol=1e-15, atol=0)
    # the optimizer's own gradient copies are averaged in place; the caller's graph gradients
    # (and unaveraged ones) are left alone
    same = opt.inputs.grads[0] is opt.inputs.evaluation.grads[0]
    assert same == (not grads_averaged or source != "graph")
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 2.0], dtype=F64) - want_g,
                               rtol=1e-15, atol=0)  # fmt: skip
    tol = 1e-8 if source == "backward" else 1e-15  # finite differences
    want_hv = hv + 1 if hvps_averaged else hv
    torch.testing.assert_close(opt.probe_hv[0], want_hv, rtol=tol, atol=tol)
    if source == "graph":
        assert loss is None
        assert torch.equal(opt.caller_grad.detach(), g)  # the caller's: not averaged in place
    else:
        assert float(loss) == 5.0 + 1  # the mean over the ranks
    assert fake_dist.broadcasts == 1 and fake_dist.gathers == 1


def test_replicas_draw_from_rank_0s_generator_once(fake_dist):
    x = torch.tensor([1.0], requires_grad=True)
    opt = _GD([x], generator=torch.Generator().manual_seed(7))
    assert not opt._seed_synced
    opt.step(lambda: (x**2).sum())
    assert torch.equal(opt.generator.get_state(), fake_dist.rank0_state) and opt._seed_synced
    opt.step(lambda: (x**2).sum())
    assert fake_dist.broadcasts == 1  # once, at the first step
    loaded = _GD([x.detach().clone().requires_grad_()])
    loaded.load_state_dict(opt.state_dict())
    loaded.step(lambda: (x**2).sum())
    assert fake_dist.broadcasts == 1  # a loaded generator state is every rank's already


def test_one_process_needs_no_collective(fake_dist):
    fake_dist.initialized = False
    opt, x, loss, g, hv = _replica_step("loss")
    assert opt._layout == Layout("single", None) and not opt._replicas()
    assert float(loss) == 5.0 and torch.equal(opt.inputs.grads[0], g)
    assert fake_dist.reduces == [] and fake_dist.broadcasts == 0 and opt._seed_synced
    assert opt._average([g]) == [g] and opt._mean_loss(None) is None


def test_sharded_steps_agree_on_one_finite_flag(fake_dist, monkeypatch):
    """FSDP2 shards: gradients are FSDP's already (never averaged again), the loss is the mean
    over the ranks, and a non-finite piece on another rank masks the step on this one."""
    others_nonfinite = []

    def sum_over_shards(t):  # the other rank's count of non-finite pieces
        assert t.dtype == torch.float32  # a count every backend can sum (not a bool)
        return t + others_nonfinite[0]

    monkeypatch.setattr(_protocol, "sum_over_shards", sum_over_shards)
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)

    def closure():
        x.grad = None
        loss = (x**2).sum()
        loss.backward()
        return loss

    for other, applied in [(1.0, False), (0.0, True)]:
        others_nonfinite[:] = [other]
        opt = _GD([x], lr=0.25)
        opt._layout = Layout("shards", None)
        before = x.detach().clone()
        loss = opt.step(closure)
        assert float(loss) == float((before**2).sum()) + 1
        want = before - 0.25 * 2 * before if applied else before
        assert torch.equal(x.detach(), want) and opt.counters()["step"] == int(applied)
    with pytest.raises(CurvatureError):  # shards take gradients from backward() only
        opt.step(lambda: (x**2).sum())


# ---- details of the update and of the finite differences -----------------------------------


def test_a_huge_but_finite_update_is_applied():
    """The finiteness check takes the max-abs of ``lr·y``: a 2-norm would overflow on two
    entries of 1e200 and mask a finite step."""
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = _GD([x], lr=1.0)
    opt.step(lambda: (1e200 * x).sum())
    assert torch.equal(x.detach(), torch.full((2,), -1e200, dtype=F64))
    assert opt.counters() == {"step": 1, "skipped_steps": 0}


def test_a_float32_tensor_lr_decays_float64_parameters_in_float64():
    lr = torch.tensor(0.3)  # float32: lr·wd is float32, 1 − lr·wd is taken in float64
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = _GD([x], lr=lr, weight_decay=0.1)
    opt.step(lambda: 0 * x.sum())
    factor = 1 - (lr * 0.1).to(F64)
    assert torch.equal(x.detach(), factor.reshape(1))
    assert float(x.detach()) != float((1 - lr * 0.1).to(F64))  # float32 would round it


def test_fd_epsilon_floors_both_norms():
    """``ε = eps^{1/3} · max(1, ‖x‖) / ‖v‖``: below ``‖x‖ = 1`` the step is absolute, and a small
    ``‖v‖`` is divided by as it is (only 0 is floored)."""
    cbrt = torch.finfo(F64).eps ** (1 / 3)
    x = [torch.tensor([0.3, 0.4], dtype=F64)]  # ‖x‖ = 0.5
    v = [torch.tensor([0.03, 0.04], dtype=F64)]  # ‖v‖ = 0.05
    assert float(_protocol.fd_epsilon(x, v)) == pytest.approx(cbrt / 0.05, rel=1e-15)
    x = [torch.tensor([0.9, 1.2], dtype=F64)]  # ‖x‖ = 1.5
    assert float(_protocol.fd_epsilon(x, v)) == pytest.approx(cbrt * 1.5 / 0.05, rel=1e-15)
    zero = float(_protocol.fd_epsilon(x, [torch.zeros(2, dtype=F64)]))
    assert zero == pytest.approx(cbrt * 1.5 / 1e-300, rel=1e-12)
    assert torch.finfo(torch.float32).eps ** (1 / 3) == pytest.approx(
        float(_protocol.fd_epsilon([torch.zeros(1)], [torch.ones(1)])), rel=1e-6
    )


def test_a_backward_closure_is_recognised_when_the_first_parameter_gets_no_gradient():
    params, f, grad, _ = _cubic()
    order = [params[2], params[0], params[1]]  # z (never differentiated) first
    ev = evaluate(order, _closures(params, f)["backward"], "auto")
    assert ev.source == "backward_closure" and ev.no_grad == (True, False, False)
    torch.testing.assert_close(ev.grads[1], grad()[0], rtol=1e-15, atol=0)


# ---- construction checks, health warnings, loss scalers ------------------------------------


def test_construction_refusals_name_the_option():
    x = torch.zeros(2, requires_grad=True)
    cases = [
        ({"module": 3}, TypeError, "module must be an nn.Module, got int"),
        ({"momentum": 1.0}, ValueError, "momentum must be < 1 (an exponential average), got 1.0"),
        ({"momentum": float("nan")}, ValueError, "momentum must be a finite number, got nan"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay must be >= 0.0, got -1.0"),
        ({"lr": -0.5}, ValueError, "param group lr must be >= 0.0, got -0.5"),
        ({"hvp": "bad"}, ValueError, "hvp must be one of ('auto', 'exact', 'fd'), got 'bad'"),
        ({"grads_synced": "yes"}, TypeError, "grads_synced must be None, True or False, got 'yes'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error) as exc:
            _GD([x], **kwargs)
        assert str(exc.value) == message
    with pytest.raises(TypeError) as exc:
        _GD([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    assert str(exc.value) == (
        "_GD does not support complex parameters (the curvature models are real symmetric "
        "matrices); optimise torch.view_as_real(p) instead"
    )


class _TwoPerGroup(_GD):
    _per_group = ("lr", "weight_decay")


def test_param_groups_may_differ_only_in_the_per_group_options():
    a, b, c = (torch.zeros(1, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError) as exc:
        _GD([{"params": [a]}, {"params": [b], "momentum": 0.5}])
    assert str(exc.value) == (
        "_GD: 'momentum' must be the same for all parameter groups (only lr may differ), got "
        "0.0 and 0.5"
    )
    opt = _TwoPerGroup([{"params": [a]}, {"params": [b], "weight_decay": 0.5}])
    with pytest.raises(ValueError, match=r"\(only lr, weight_decay may differ\), got 'auto' and "
                       "'fd'$"):  # fmt: skip
        opt.add_param_group({"params": [c], "hvp": "fd"})
    assert len(opt.param_groups) == 2 and c not in opt.state  # refused: nothing changed
    with pytest.raises(ValueError, match="^hvp must be one of"):
        opt.add_param_group({"params": [c], "hvp": "bad"})
    opt.add_param_group({"params": [c], "lr": 0.5})
    assert len(opt.param_groups) == 3 and opt.state[c] == {}


def test_state_entries_exist_from_construction_with_their_types():
    p = torch.ones(2, 3, dtype=F64).t().requires_grad_()  # non-contiguous
    opt = _GD([p], momentum=0.5)
    state = opt.global_state
    assert state["step_calls"] == 0 and state["step"].shape == ()
    assert state["step"].dtype == state["skipped_steps"].dtype == torch.int64
    assert state["damping"].dtype == F64 and torch.isnan(state["damping"])
    assert state["momentum_buffer"].stride() == p.stride() and not state["momentum_buffer"].any()
    assert "momentum_buffer" not in _GD([p]).state[p]  # no momentum, no buffer
    assert "momentum_buffer" not in _Plain([p]).state[p]  # no momentum option at all
    assert not opt._is_sync_point(0) and opt._is_sync_point(1)


def test_a_loss_scaler_is_refused_before_anything_changes():
    x = torch.ones(1, requires_grad=True)
    message = (
        "_GD cannot be stepped by a GradScaler (float16 mixed precision): the scaler passes no "
        "closure, and its scale would multiply the curvature (HVPs, per-sample gradients) while "
        "only .grad is unscaled, so the step would be silently wrong. Use bfloat16 autocast (no "
        "scaler) or float32."
    )
    for attribute in ("grad_scale", "found_inf"):
        opt = _GD([x])
        setattr(opt, attribute, torch.ones(()))
        with pytest.raises(RuntimeError) as exc:
            opt.step(lambda: x.sum())
        assert str(exc.value) == message and opt.global_state["step_calls"] == 0


class _Health(_GD):
    """``_GD`` with an optimizer-specific counter, raised on the calls listed in ``fallbacks``."""

    _health_counters = {
        **SecondOrderOptimizer._health_counters,
        "fallbacks": ("a fallback ran", "do something"),
    }

    def _step(self, closure):
        loss = super()._step(closure)
        if self.global_state["step_calls"] - 1 in self.fallbacks:  # after this call's check
            self._counter("fallbacks").add_(1)
        return loss


def _health_messages(nan_calls, fallbacks, calls):
    """The RuntimeWarnings of ``calls`` steps (NaN loss on ``nan_calls``)."""
    x = torch.ones(1, dtype=F64, requires_grad=True)
    opt = _Health([x], lr=0.0)
    opt.fallbacks = set(fallbacks)
    messages = []
    for call in range(calls):
        nan = float("nan") if call in nan_calls else 1.0
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            opt.step(lambda nan=nan: (x**2).sum() * nan)
        messages += [(call, str(w.message)) for w in rec if w.category is RuntimeWarning]
        assert all(w.filename == __file__ for w in rec)
    return messages


def test_health_warnings_count_since_the_previous_check():
    """Checks at calls 1, 2, 4, 8: skipped steps are always reported, other counters when they
    fired on more than half of the calls since the previous check."""
    skipped = ("non-finite loss, gradient or curvature: the step was skipped (counters()"
               "['skipped_steps'] = {}). Fix: lower lr, check the data and loss for inf/NaN, or "
               "use float32/float64.")  # fmt: skip
    assert _health_messages({0, 2, 3}, (), 5) == [
        (1, "_Health: 1 of the last 1 step(s) — " + skipped.format(1)),
        (4, "_Health: 2 of the last 2 step(s) — " + skipped.format(3)),
    ]
    fallback = ("_Health: {} of the last 4 step(s) — a fallback ran (counters()['fallbacks'] = "
                "{}). Fix: do something.")  # fmt: skip
    # calls 4..7 before the check at 8: two of four is not most of them, three is
    assert _health_messages(set(), {4, 6}, 9) == []
    assert _health_messages(set(), {4, 5, 6}, 9) == [(8, fallback.format(3, 3))]
    assert _health_messages(set(), {5}, 9) == []
    assert _health_messages({5}, (), 9) == [
        (8, "_Health: 1 of the last 4 step(s) — " + skipped.format(1))
    ]


def test_nccl_broadcasts_the_generator_on_the_parameters_device(fake_dist):
    fake_dist.backend = "nccl"
    x = torch.tensor([1.0], requires_grad=True)
    opt = _GD([x])
    opt.step(lambda: (x**2).sum())
    assert fake_dist.broadcasts == 1
    assert torch.equal(opt.generator.get_state(), fake_dist.rank0_state)


def test_the_step_uses_the_optimizers_hvp_mode_and_module():
    """``hvp="fd"`` reaches ``evaluate`` (a backward that cannot build a graph still works), and
    so does ``module=`` (BatchNorm statistics advance once per step, not per closure call)."""
    x = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = _GD([x], hvp="fd")
    opt.probe = [torch.tensor([1.0, 0.0], dtype=F64)]
    opt.step(lambda: _NoDoubleBackward.apply(x).sum() * x[0])
    assert opt.inputs.evaluation.source == "loss_closure"
    torch.testing.assert_close(opt.probe_hv[0], torch.tensor([6.0, -4.0], dtype=F64),
                               rtol=1e-8, atol=1e-8)  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).double()
    X = torch.randn(8, 2, dtype=F64)
    for module, calls in [(model, 1), (None, 3)]:  # the step's call and the two of one HVP
        opt = _GD(model.parameters(), lr=0.0, module=module)
        opt.probe = [torch.ones_like(p) for p in model.parameters()]
        before = int(model[1].num_batches_tracked)

        def closure(opt=opt):
            opt.zero_grad()
            loss = model(X).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        assert int(model[1].num_batches_tracked) == before + calls


def test_grad_is_left_holding_the_plain_gradient():
    """Graph gradients are replaced by detached ones (the param ↔ grad cycle is dropped); a
    sharded parameter's ``.grad`` keeps its object and gets this rank's piece copied in."""
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = _GD([x], lr=0.0)
    (x**2).sum().backward(create_graph=True)
    assert x.grad.requires_grad
    opt.step()
    assert x.grad is opt.inputs.grads[0] and not x.grad.requires_grad
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=0, atol=0)
    shard = torch.zeros(2, requires_grad=True)
    shard.device_mesh, shard.placements = object(), ()  # what marks a DTensor
    g = torch.tensor([1.0, 2.0])
    opt._detach_grads([shard], [g])
    assert shard.grad is not g and torch.equal(shard.grad, g)
    held = shard.grad
    opt._detach_grads([shard], [torch.tensor([3.0, 4.0])])
    assert shard.grad is held and torch.equal(held, torch.tensor([3.0, 4.0]))


def test_every_collective_runs_on_the_optimizers_process_group(fake_dist):
    fake_dist.group = "pg"
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = _GD([x], lr=1.0, process_group="pg")
    loss = opt.step(lambda: (x**2).sum())
    assert opt._layout == Layout("replicas", "pg") and float(loss) == 6.0
    assert fake_dist.gathers == 1 and fake_dist.broadcasts == 1
    assert torch.equal(x.detach(), torch.tensor([-2.0, -3.0], dtype=F64))  # g averaged: 2x + 1
    # the optimizer's average: new tensors unless asked to write into the given ones
    t = torch.ones(2, dtype=F64)
    (out,) = opt._average([t])
    assert torch.equal(t, torch.ones(2, dtype=F64)) and torch.equal(out, t + 1)
    (same,) = opt._average([t], inplace=True)
    assert same is t and torch.equal(t, torch.full((2,), 2.0, dtype=F64))


# ---- devices: "meta" tensors stand in for an accelerator (no data, but a device of their own) --


def test_per_sample_grads_on_the_losses_device():
    w = torch.zeros(3, device="meta", requires_grad=True)
    x = torch.zeros(4, 3, device="meta")
    (g,) = per_sample_grads((x @ w) ** 2, [w])
    assert g.shape == (4, 3) and g.device.type == "meta"


def test_state_and_steps_live_on_the_parameters_device():
    x = torch.zeros(2, device="meta", requires_grad=True)
    opt = _GD([x], lr=0.1, weight_decay=0.1, momentum=0.5, generator=torch.Generator())
    devices = {k: v.device.type for k, v in opt.global_state.items() if torch.is_tensor(v)}
    assert devices == {"step": "meta", "skipped_steps": "meta", "damping": "meta",
                       "momentum_buffer": "meta"}  # fmt: skip
    opt.step(lambda: (x**2).sum())  # the decay factor is made on the device too
    assert opt.global_state["step"].device.type == "meta" and x.device.type == "meta"
    # an lr tensor on the device: the decay is computed there, never read on the host
    opt.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    opt.global_state["step_calls"] = 3  # not a sync point (those read counters on the host)
    opt.step(lambda: (x**2).sum())
    assert x.device.type == "meta"


def test_state_from_another_device_moves_to_the_parameters():
    x = torch.zeros(2, device="meta", requires_grad=True)
    opt = _GD([x], momentum=0.5, generator=torch.Generator())
    state = opt.global_state
    gen = torch.Generator().get_state()
    counter = torch.zeros((), dtype=torch.int64)
    cpu = {"step": counter, "skipped_steps": counter + 1, "momentum_buffer": torch.zeros(2),
           "generator_state": gen}  # fmt: skip
    state.update(cpu)
    opt._state_to_param_devices()
    assert {k: state[k].device.type for k in cpu} == {
        "step": "meta",
        "skipped_steps": "meta",
        "momentum_buffer": "meta",
        "generator_state": "cpu",
    }  # the generator's state stays where generators read it
    assert state["skipped_steps"].dtype == torch.int64
    state["momentum_buffer"] = torch.zeros(2)  # the counters decide: already there, no pass
    opt._state_to_param_devices()
    assert state["momentum_buffer"].device.type == "cpu"


class _BackwardRaises(torch.autograd.Function):
    """``2x`` whose backward raises ``RuntimeError(message)``; as the derivative of ``x²`` below,
    its backward is the second derivative (the HVP): torch.compile's refusal on a fresh
    compilation."""

    message = "torch.compile with aot_autograd does not currently support double backward"

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError(_BackwardRaises.message)


class _SquareWithRefusingHessian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _BackwardRaises.apply(x) * g


@pytest.mark.parametrize("message", [_BackwardRaises.message, "another failure"])
def test_double_backward_refused_at_the_first_hvp(message, monkeypatch):
    """A gradient built with a graph whose second backward fails: torch.compile's refusal is the
    same CurvatureError as at gradient time; any other error passes through unchanged."""
    monkeypatch.setattr(_BackwardRaises, "message", message)
    x = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    ev = evaluate([x], lambda: _SquareWithRefusingHessian.apply(x).sum(), "exact")
    torch.testing.assert_close(ev.grads[0], 2 * x.detach())
    expected = CurvatureError if "torch.compile" in message else RuntimeError
    with pytest.raises(expected) as exc:
        ev.hvp_fn([torch.ones(2, dtype=F64)])
    assert type(exc.value) is expected
    assert str(exc.value) == (_protocol._COMPILED if expected is CurvatureError else message)
