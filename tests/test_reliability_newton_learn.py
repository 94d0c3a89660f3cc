"""NewtonLearn under faults and unusual inputs: a skipped (non-finite) step leaves every piece of
state as it was, on every rank; a loss that is not finite at ``x⁰`` is refused at construction;
``solver="cholesky_update"`` follows a changed ``lam``; the built-in losses validate their
targets; a failed ``load_state_dict`` changes nothing; sparse CSR/COO features give the dense
run's iterates.

Run as ``python test_reliability_newton_learn.py RANK WORLD STORE OUT SCENARIO...`` this file is
also the worker of its two-rank ``torch.distributed`` test (see ``tests/_dist_harness.py``).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from torch_rankone import NewtonLearn
from torch_rankone.distributed import RandK
from torch_rankone.glm import GLMLoss

LAM = 1e-3
N_NODES, M_ROWS, D = 4, 25, 6
# the structural state a skipped step must leave exactly as it was (bits/history record it)
MODEL_KEYS = ("h", "H", "A", "B", "chol", "chol_lam", "refactorizations")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
KINDS = {
    "nl1": dict(variant="nl1"),
    "nl2": dict(variant="nl2"),
    "cnl": dict(variant="cnl"),
    "nl1-update": dict(variant="nl1", solver="cholesky_update", compressor=RandK(2)),
}


def problem(seed: int = 0, rows: int = N_NODES * M_ROWS, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    b = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0).double()
    return A, b


def param(d: int = D, value: float = 0.0) -> torch.Tensor:
    return torch.full((d,), value, dtype=torch.float64, requires_grad=True)


def make(x, A, b, **kw) -> NewtonLearn:
    kw.setdefault("num_nodes", N_NODES)
    kw.setdefault("lam", LAM)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return NewtonLearn([x], A, b, **kw)


def model_state(opt: NewtonLearn) -> dict:
    return {k: copy.deepcopy(v) for k, v in opt.global_state.items() if k in MODEL_KEYS}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def grad_norm(A, b, x, lam=LAM) -> float:
    t = A @ x
    return float((A.T @ (-b * torch.sigmoid(-b * t)) / len(b) + lam * x).norm())


def nan_curvature_at(loss: GLMLoss, calls: set[int], rows: slice | None = None) -> GLMLoss:
    """``loss`` whose ``φ''`` is NaN (on ``rows``, default all) at the given calls (0-based,
    counting from the first step)."""
    count = [0]

    def d2(t, b):
        out = loss.d2(t, b)
        if count[0] in calls:
            out = out.clone()
            out[slice(None) if rows is None else rows] = math.nan
        count[0] += 1
        return out

    return loss._replace(d2=d2)


# ------------------------------------------------------------------------------------------------
# 1. A skipped step keeps all state; a loss not finite at x⁰ is refused
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_nan_iterate_skip_leaves_h_hessian_model_and_factor_unchanged(kind):
    """A NaN iterate (non-finite gradient, loss, ``h(x)`` and direction): the learned ``h``,
    ``H``/``A``/``B``, the factor and the refactorisation count stay exactly as they were; the
    step and the skip are counted, the attempt is in the history and the bits."""
    A, b = problem(1)
    x = param(value=0.2)
    opt = make(x, A, b, **KINDS[kind])
    for _ in range(3):
        opt.step()
    before, bits = model_state(opt), float(opt.global_state["bits_sent"])
    with torch.no_grad():
        x.fill_(math.nan)
    opt.step()
    assert_same(model_state(opt), before)
    assert opt.counters() == {"step": 4, "skipped_steps": 1}
    assert len(opt.history) == 4 and math.isnan(opt.history[-1]["loss"])
    assert float(opt.global_state["bits_sent"]) > bits


@pytest.mark.parametrize("kind", list(KINDS))
def test_transient_nan_iterate_does_not_freeze_the_run(kind):
    """After one NaN iterate (x restored to the last finite value) the run converges like an
    undisturbed one instead of skipping every later step."""
    A, b = problem(2)
    x = param(value=0.2)
    opt = make(x, A, b, **KINDS[kind])
    for _ in range(3):
        opt.step()
    good = x.detach().clone()
    with torch.no_grad():
        x.fill_(math.nan)
    opt.step()
    with torch.no_grad():
        x.copy_(good)
    for _ in range(150):
        opt.step()
    assert opt.counters()["skipped_steps"] == 1
    assert grad_norm(A, b, x.detach()) < 1e-9


@pytest.mark.parametrize("kind", ["nl1", "nl2", "nl1-update"])
def test_non_finite_curvature_alone_skips_the_whole_step(kind):
    """``h(x)`` non-finite on some rows while the gradient and loss are finite: ``x`` does not
    move and nothing is learned; the next step proceeds from the same state."""
    A, b = problem(3)
    x = param(value=0.1)
    opt = make(x, A, b, **KINDS[kind])
    opt.step()
    opt.loss = nan_curvature_at(opt.loss, {0}, rows=slice(30, 31))
    before, x_before = model_state(opt), x.detach().clone()
    loss = opt.step()
    assert math.isfinite(float(loss))
    assert torch.equal(x.detach(), x_before)
    assert_same(model_state(opt), before)
    assert opt.counters()["skipped_steps"] == 1
    opt.step()
    assert not torch.equal(x.detach(), x_before) and opt.counters()["skipped_steps"] == 1


def test_custom_loss_not_finite_at_x0_is_refused_at_construction():
    """A naive logistic ``log(1 + e^{−bt})`` overflows at a far ``x⁰``: its ``φ''`` is NaN
    there, so ``H^0`` would be NaN and every step skipped; the constructor refuses, naming
    the loss, and an explicit non-finite ``h0`` likewise."""
    A, b = problem(4)

    def naive_logistic(t, b):
        return torch.log(1 + torch.exp(-b * t))

    with pytest.raises(ValueError, match=r"naive_logistic.*not finite"):
        make(param(value=300.0), A, b, loss=naive_logistic)
    make(param(value=0.1), A, b, loss=naive_logistic)  # finite there: accepted
    h0 = torch.full((len(b),), 0.1, dtype=torch.float64)
    h0[7] = math.inf
    with pytest.raises(ValueError, match="h0.*not finite"):
        make(param(), A, b, h0=h0, variant="nl2")


# ------------------------------------------------------------------------------------------------
# 2. The update solver follows lam
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lam0", "lam1"), [(1e-3, 0.5), (0.5, 1e-3)])
def test_cholesky_update_refactors_after_lam_changes(lam0, lam1):
    """``param_groups[0]["lam"]`` changed mid-run: the update solver refactors for the new λ
    (counted in ``refactorizations``) and gives the refactoring solver's iterates."""
    A, b = problem(5)
    runs, opts = [], []
    for solver in ("cholesky", "cholesky_update"):
        x = param(value=0.5)
        opt = make(x, A, b, compressor=RandK(2), solver=solver, lam=lam0)
        traj = []
        for k in range(20):
            if k == 5:
                opt.param_groups[0]["lam"] = lam1
            opt.step()
            traj.append(x.detach().clone())
        runs.append(torch.stack(traj))
        opts.append(opt)
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-10)
    state = opts[1].global_state
    assert state["chol_lam"] == lam1 and state["refactorizations"] >= 1
    H = state["H"] + lam1 * torch.eye(D, dtype=A.dtype)
    assert torch.allclose(state["chol"] @ state["chol"].T, H, rtol=0, atol=1e-12)


def test_checkpoint_carries_the_lam_of_the_factor():
    """``lam`` changed right before a checkpoint: the factor's λ is in the state, so the
    loaded optimizer refactors at its next step like the uninterrupted one, and both follow
    the refactoring solver."""
    A, b = problem(6)
    runs = {}
    for solver in ("cholesky", "cholesky_update"):
        x = param(value=0.3)
        opt = make(x, A, b, solver=solver)
        for _ in range(3):
            opt.step()
        opt.param_groups[0]["lam"] = 0.2
        runs[solver] = (x, opt)
    x, opt = runs["cholesky_update"]
    saved, x_saved = copy.deepcopy(opt.state_dict()), x.detach().clone()
    assert saved["state"][0]["chol_lam"] == LAM
    y = param()
    with torch.no_grad():
        y.copy_(x_saved)
    other = make(y, A, b, solver="cholesky_update")
    other.load_state_dict(saved)
    assert other.global_state["chol_lam"] == LAM and other.param_groups[0]["lam"] == 0.2
    xr, ref = runs["cholesky"]
    for _ in range(4):
        opt.step(), other.step(), ref.step()
        assert torch.equal(y.detach(), x.detach())
        assert torch.allclose(y.detach(), xr.detach(), rtol=0, atol=1e-10)
    state = other.global_state
    assert state["chol_lam"] == 0.2
    H = state["H"] + 0.2 * torch.eye(D, dtype=A.dtype)
    assert torch.allclose(state["chol"] @ state["chol"].T, H, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 3. Targets of the built-in losses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ((0.0, 1.0), r"2\*y - 1"),
        ((0.0, 2.0), r"torch.where"),
        ((0.0, 1.0, 2.0), r"3 distinct values"),
        ((-1.0, 0.0, 1.0), r"\{-1, \+1\}"),
    ],
    ids=["01", "02", "multiclass", "with-zero"],
)
def test_logistic_refuses_labels_outside_plus_minus_one(labels, match):
    """Rows labelled 0 would contribute nothing (``φ = log 2`` whatever ``x``), other values
    rescale the loss: the built-in logistic loss takes ``b ∈ {−1, +1}`` only and says how to
    map the labels."""
    A, _ = problem(7)
    b = torch.tensor(labels, dtype=torch.float64).repeat(len(A))[: len(A)]
    with pytest.raises(ValueError, match=match):
        make(param(), A, b, loss="logistic")
    make(param(), A, torch.where(b == b.max(), 1.0, -1.0), loss="logistic")  # mapped: fine


@pytest.mark.parametrize("loss", ["logistic", "squared", lambda t, b: (t - b) ** 2])
def test_non_finite_targets_and_features_are_refused(loss):
    A, b = problem(8)
    bad_b = b.clone()
    bad_b[3] = math.nan
    with pytest.raises(ValueError, match="targets.*finite"):
        make(param(), A, bad_b, loss=loss, gamma=1.0)
    bad_A = A.clone()
    bad_A[5, 2] = math.inf
    with pytest.raises(ValueError, match="features.*finite"):
        make(param(), bad_A, b, loss=loss, gamma=1.0)


# ------------------------------------------------------------------------------------------------
# 4. load_state_dict is atomic
# ------------------------------------------------------------------------------------------------


def full_state(opt: NewtonLearn) -> tuple:
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return copy.deepcopy(dict(opt.global_state)), group, opt.generator.get_state()


def _adam_state():
    z = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([z])
    z.grad = torch.ones_like(z)
    adam.step()
    return adam.state_dict()


def _other_state(**kw):
    d = kw.pop("d", D)
    dtype = kw.pop("dtype", torch.float64)
    A, b = problem(9, d=d)
    x = param(d=d).to(dtype).detach().requires_grad_(True)
    opt = make(x, A.to(dtype), b.to(dtype), **kw)
    opt.step()
    return opt.state_dict()


def _drop(key):
    def edit(sd):
        del sd["state"][0][key]
        return sd

    return edit


BAD_CHECKPOINTS = {
    "adam": (lambda sd: _adam_state(), "missing.*'h'"),
    "two-nodes": (lambda sd: _other_state(num_nodes=2), r"'h'.*shape"),
    "other-d": (lambda sd: _other_state(d=5), r"'H'.*shape"),
    "float32": (lambda sd: _other_state(dtype=torch.float32), r"dtype"),
    "no-H": (_drop("H"), "missing.*'H'"),
    "no-generator": (_drop("generator_state"), "generator_state"),
    "two-params": (
        lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "params": [0, 1]}]},
        "param",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_failed_load_state_dict_changes_nothing(case):
    """A checkpoint of another optimizer, another problem size or dtype, or with entries
    missing is refused up front with a ValueError naming the difference; the optimizer's
    state, options and generator are untouched and it steps exactly like an untouched twin."""
    A, b = problem(9)
    x, y = param(value=0.2), param(value=0.2)
    opt, twin = make(x, A, b), make(y, A, b)
    for _ in range(2):
        opt.step(), twin.step()
    edit, match = BAD_CHECKPOINTS[case]
    bad = edit(copy.deepcopy(opt.state_dict()))
    before = full_state(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    after = full_state(opt)
    assert after[1] == before[1] and torch.equal(after[2], before[2])
    assert after[0].keys() == before[0].keys()
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]) if torch.is_tensor(v) else v == after[0][k], k
    for _ in range(2):
        assert torch.equal(opt.step(), twin.step())
        assert torch.equal(x.detach(), y.detach())


# ------------------------------------------------------------------------------------------------
# 5. Sparse features
# ------------------------------------------------------------------------------------------------


def sparse_problem(seed: int, density: float, rows: int = N_NODES * M_ROWS, d: int = 10):
    """About ``density + 1/d`` of the entries nonzero, at least one per row."""
    A, b = problem(seed, rows, d)
    keep = torch.rand(A.shape, generator=torch.Generator().manual_seed(seed + 1)) < density
    keep[torch.arange(rows), torch.arange(rows) % d] = True
    return A * keep, b


LAYOUTS = {
    "csr": lambda A: A.to_sparse_csr(),
    "coo": lambda A: A.to_sparse(),
    "coo-uncoalesced": lambda A: torch.sparse_coo_tensor(
        A.to_sparse().indices().repeat(1, 2),
        A.to_sparse().values().repeat(2) / 2,
        A.shape,
        check_invariants=True,
    ),
}


@pytest.mark.parametrize("density", [0.08, 0.6])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_sparse_features_give_the_dense_iterates(kind, layout, density):
    A, b = sparse_problem(10, density)
    runs = []
    for features in (A, LAYOUTS[layout](A)):
        x = param(d=A.shape[1], value=0.3)
        opt = make(x, features, b, **KINDS[kind])
        runs.append(torch.stack([opt.step() * 0 + x.detach() for _ in range(10)]))
    # below the density threshold no dense copy is made (the rows are gathered from the CSR)
    assert (opt._shard.A is None) == (density < 0.2)
    assert torch.allclose(runs[1], runs[0], rtol=0, atol=1e-12)


def test_a9a_from_the_sparse_loader_matches_dense():
    """``load_libsvm(..., sparse=True)`` straight into NewtonLearn (80 nodes of 407 rows, the
    remainder row dropped): the iterates equal the dense input's."""
    from torch_rankone.data import find_libsvm, load_libsvm

    path = find_libsvm("a9a")
    if path is None:
        pytest.skip("a9a not available")
    A, b = load_libsvm(path, sparse=True)
    rows = 80 * 407
    crow = A.crow_indices()[: rows + 1]
    nnz = int(crow[-1])
    A = torch.sparse_csr_tensor(crow, A.col_indices()[:nnz], A.values()[:nnz], (rows, A.shape[1]))
    runs = []
    for features in (A, A.to_dense()):
        x = param(d=A.shape[1])
        opt = NewtonLearn([x], features, b[:rows], num_nodes=80, generator=torch.Generator())
        runs.append(torch.stack([opt.step() * 0 + x.detach() for _ in range(5)]))
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Two gloo ranks: the skip decision and sparse shards
# ------------------------------------------------------------------------------------------------

LOCAL, M_DIST, D_DIST, STEPS = 2, 10, 10, 8
NAN_ROW = 3  # a row of rank 1's shard whose h(x) is NaN at its third step


def dist_problem():
    """Two ranks of ``LOCAL`` nodes of ``M_DIST`` rows; rank r holds rows of nodes 2r, 2r+1."""
    return sparse_problem(20, 0.08, rows=2 * LOCAL * M_DIST, d=D_DIST)


def dist_run(A, b, *, num_nodes, nan_rows=None):
    x = param(d=D_DIST, value=0.2)
    opt = make(x, A, b, num_nodes=num_nodes)
    if nan_rows is not None:
        opt.loss = nan_curvature_at(opt.loss, {2}, rows=nan_rows)
    traj = torch.stack([opt.step() * 0 + x.detach() for _ in range(STEPS)])
    return {"traj": traj, "counters": opt.counters(), "h": opt.global_state["h"]}


def _shard(rank):
    A, b = dist_problem()
    rows = slice(rank * LOCAL * M_DIST, (rank + 1) * LOCAL * M_DIST)
    return A[rows], b[rows]


def scenario_skip_on_one_rank(rank: int, world: int) -> dict:
    """Only rank 1's ``h(x)`` is NaN (one row, one step): every rank skips that step."""
    A, b = _shard(rank)
    return dist_run(A, b, num_nodes=LOCAL, nan_rows=slice(NAN_ROW, NAN_ROW + 1) if rank else None)


def scenario_sparse_shards(rank: int, world: int) -> dict:
    A, b = _shard(rank)
    return dist_run(A.to_sparse_csr(), b, num_nodes=LOCAL)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    from _dist_harness import Ranks, scenarios_in

    return Ranks(Path(__file__), tmp_path_factory.mktemp("nl_rel"), list(scenarios_in(globals())))


@pytest.mark.slow
def test_distributed_skip_decision_is_the_same_on_every_rank(ranks):
    """The server's verdict travels with the iterate: both ranks skip the step, keep their
    ``h`` finite, count the skip, and follow the simulated run with the same fault."""
    got = ranks.results("skip_on_one_rank")
    A, b = dist_problem()
    nan_row = LOCAL * M_DIST + NAN_ROW
    ref = dist_run(A, b, num_nodes=2 * LOCAL, nan_rows=slice(nan_row, nan_row + 1))
    assert ref["counters"]["skipped_steps"] == 1
    for r in got:
        assert r["counters"] == ref["counters"]
        assert bool(torch.isfinite(r["h"]).all())
        assert torch.allclose(r["traj"], ref["traj"], rtol=0, atol=1e-10)
    assert torch.allclose(torch.cat([got[0]["h"], got[1]["h"]]), ref["h"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_distributed_sparse_shards_give_the_dense_iterates(ranks):
    got = ranks.results("sparse_shards")
    ref = dist_run(*dist_problem(), num_nodes=2 * LOCAL)
    for r in got:
        assert torch.allclose(r["traj"], ref["traj"], rtol=0, atol=1e-10)


if __name__ == "__main__":
    from _dist_harness import scenarios_in, worker_main

    sys.exit(worker_main(sys.argv, scenarios_in(globals())))
