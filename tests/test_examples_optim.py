"""The optimizer examples: real progress on mushrooms with the examples' own hyper-parameters,
and both scripts end to end in reduced size (files written, tables sane)."""

from __future__ import annotations

import csv
import importlib
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 200  # the acceptance budget: P − P* ≤ 1e-2 (P(x⁰) − P*) within this many steps


@pytest.fixture(scope="module")
def ex():
    """The example modules, imported as the scripts import each other (examples/ on the path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        yield {name: importlib.import_module(name) for name in ("_common", "rank_one_mushrooms")}


@pytest.fixture(scope="module")
def quickstart():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("quickstart")


@pytest.fixture(scope="module")
def problem(ex):
    """The example's objective on the real mushrooms data, and ``P*``."""
    data = ex["_common"].load_mushrooms()
    if data is None:
        pytest.skip("mushrooms.gz not found in shared/data/libsvm (the ../shared folder is absent)")
    p = ex["_common"].LogisticRegression(*data, lam=ex["rank_one_mushrooms"].LAM)
    return p, ex["_common"].optimum(p)[1]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def test_closed_forms_match_autograd(ex, problem):
    """The closed-form gradient and Hessian the examples log and Newton uses are right."""
    p, _ = problem
    x = 0.1 * torch.randn(p.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.grad(x), torch.func.grad(p.value)(x), rtol=1e-12, atol=1e-15)
    dense = torch.autograd.functional.hessian(p.value, x)
    torch.testing.assert_close(p.hessian(x), dense, rtol=1e-10, atol=1e-14)
    assert p.smoothness() >= torch.linalg.eigvalsh(dense)[-1]  # L bounds λ_max


def test_exact_newton_reaches_optimum(ex, problem):
    p, p_star = problem
    x0 = torch.zeros(p.dim, dtype=torch.float64)
    xs = ex["_common"].newton_iterates(p, x0, 10)
    assert abs(float(p.value(xs[-1])) - p_star) < 1e-10
    assert float(p.grad(xs[-1]).norm()) < 1e-12  # P* is a stationary point, not a stall
    assert p_star == pytest.approx(0.0503019794861, abs=1e-12)  # mushrooms, λ = 1e-3


@pytest.mark.parametrize("which", ["rank_one_tuned", "fisher_tuned"])
def test_progress_on_mushrooms_within_200_steps(ex, problem, which):
    """With the example's hyper-parameters and seed: P − P* ≤ 1e-2 (P(x⁰) − P*) after 200 steps."""
    demo = ex["rank_one_mushrooms"]
    p, p_star = problem
    x0 = torch.zeros(p.dim, dtype=torch.float64)
    method = getattr(demo, which)()
    trace = demo.run_optimizer(method, p, x0, STEPS, demo.SEED, "test")
    gap0 = trace.objective[0] - p_star
    final = trace.objective[STEPS] - p_star
    assert final <= 1e-2 * gap0, (method.name, final / gap0)
    assert all(math.isfinite(v) for v in trace.objective)


def test_mushrooms_example_quick(ex, problem, tmp_path):
    demo = ex["rank_one_mushrooms"]
    results = demo.main(["--quick", "--out", str(tmp_path)])
    for png in ("rank_one_1d.png", "rank_one_mushrooms.png"):
        assert 0 < (tmp_path / png).stat().st_size < 300_000
    columns, rows = _read_csv(tmp_path / "rank_one_mushrooms.csv")
    assert columns == [
        "problem", "method", "step", "objective", "suboptimality", "grad_norm", "seconds"
    ]  # fmt: skip
    one_d, _ = results["1d"]
    mush, p_star = results["mushrooms"]
    assert len(rows) == len(one_d) * (demo.ONE_D_STEPS + 1) + len(mush) * 31  # --quick: 30 steps
    assert {r["method"] for r in rows if r["problem"] == "mushrooms"} == {t.method for t in mush}
    assert p_star == pytest.approx(problem[1], abs=1e-15)

    by_name = {t.method: t for t in mush}
    assert set(by_name) >= {"exact Newton", "torch.optim.LBFGS", "GD 1/L", "FisherNewton α=0.1"}
    assert by_name["exact Newton"].objective[10] - p_star < 1e-10
    # theory α: σ = λ_max sqrt(N(N−1)) ≈ 288 makes it slower than plain GD with step 1/L
    assert by_name["RankOneNewton theory α"].objective[-1] > by_name["GD 1/L"].objective[-1]
    # 1-D: Newton cycles (±10) from x⁰ = 3, the theory-damped rank-one Newton converges
    one = {t.method: t for t in one_d}
    assert one["exact Newton"].objective[-1] > 1.0
    assert one["RankOneNewton theory α"].objective[-1] < 1e-12


def _check_quickstart(qs, tmp_path) -> list:
    runs = qs.main(["--quick", "--out", str(tmp_path)])
    assert {(r.task, r.optimizer) for r in runs} == {
        (task, c.name) for task in ("logreg", "mlp") for c in qs.OPTIMIZERS if task in c.hyper
    }
    names = {c.name for c in qs.OPTIMIZERS}  # every optimizer of the package is in the demo
    assert {"RankOneNewton", "FisherNewton", "NeumannIHVP", "NewtonLearn"} <= names
    for r in runs:
        assert all(math.isfinite(v) for v in (r.loss[-1], r.accuracy, r.seconds)), r
        assert len(r.loss) - 1 == 20
    assert 0 < (tmp_path / "quickstart.png").stat().st_size < 300_000
    columns, rows = _read_csv(tmp_path / "quickstart.csv")
    assert columns[:3] == ["task", "optimizer", "final_loss"] and "test_accuracy" in columns
    assert len(rows) == len(runs)
    for r in (r for r in runs if r.task == "logreg"):
        assert r.loss[-1] < 0.3 * r.loss[0], r  # log 2 → far below in 20 steps
        assert r.accuracy > 0.9, r
    return runs


def test_quickstart_quick(quickstart, tmp_path, capsys):
    _check_quickstart(quickstart, tmp_path)
    out = capsys.readouterr().out
    assert all(c.name in out for c in quickstart.OPTIMIZERS)


def test_quickstart_without_shared_data(quickstart, tmp_path, monkeypatch, capsys):
    """A fresh machine without ../shared: scikit-learn's breast-cancer data instead."""
    monkeypatch.setattr(quickstart, "load_mushrooms", lambda: None)
    _check_quickstart(quickstart, tmp_path)
    assert "breast-cancer" in capsys.readouterr().out
