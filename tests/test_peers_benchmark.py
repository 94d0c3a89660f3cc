"""The peer benchmark (``python -m benchmarks.peers``) runs end to end in its quick mode, counts
what it says it counts, and survives optimizers that diverge or fail."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from torch_rankone.data import find_libsvm

pytest.importorskip("sklearn")
# the repository root (benchmarks/ is not installed; tests/benchmarks/ must not shadow it)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import peers  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every optimizer on every available workload, a few steps, seed 0, via the CLI."""
    out = tmp_path_factory.mktemp("peers")
    threads = torch.get_num_threads()
    try:
        assert (
            peers.main(
                ["--quick", "--out", str(out), "--figure", str(out / "peers.png"), "--no-progress"]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    with (out / "peers.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return out, rows


def _expected():
    workloads = [w for w, wl in WORKLOADS.items() if wl.unavailable() is None]
    optimizers = [
        o
        for o, spec in peers.OPTIMIZERS.items()
        if spec.requires is None or importlib.util.find_spec(spec.requires)
    ]
    return workloads, optimizers


def test_quick_run_covers_every_optimizer_and_workload(quick_run):
    out, rows = quick_run
    workloads, optimizers = _expected()
    assert {"mlp", "cnn"} <= set(workloads)
    assert {"Adam", "RankOneNewton", "NeumannIHVP", "FisherNewton", "LBFGS"} <= set(optimizers)
    ran = {(r["workload"], r["optimizer"]) for r in rows}
    assert ran == {(w, o) for w in workloads for o in optimizers}
    assert all(r["setting"] == "defaults" and r["seed"] == "0" for r in rows)
    if find_libsvm("w8a") is None:  # the data directory is absent: skipped with the reason
        assert "Skipped w8a: LIBSVM w8a not found" in (out / "peers.md").read_text()
    errors = [(r["workload"], r["optimizer"], r["error"]) for r in rows if r["status"] == "error"]
    assert not errors


def test_quick_run_numbers(quick_run):
    _, rows = quick_run
    for r in rows:
        if r["optimizer"] == "Adam":
            assert r["status"] == "ok", r
            assert math.isfinite(float(r["final_train_loss"])) and float(r["final_train_loss"]) > 0
            assert 0.0 <= float(r["test_metric"]) <= 1.0
            assert float(r["ms_per_step"]) > 0
            quick = WORKLOADS[r["workload"]].quick_steps
            assert int(r["steps"]) == int(r["grad_evals"]) == quick
            assert int(r["hvps"]) == 0
            assert json.loads(r["hypers"])["lr"] > 0
        if r["optimizer"] in ("SGD", "LBFGS", "FisherNewton"):
            assert int(r["hvps"]) == 0, r  # FisherNewton: per-sample gradients, no HVP
        if r["optimizer"] == "LBFGS":  # iterations are closure evaluations
            assert int(r["iterations"]) == int(r["grad_evals"]) >= int(r["steps"])
        if r["optimizer"] in ("AdaHessian", "RankOneNewton", "NeumannIHVP"):
            assert int(r["hvps"]) >= int(r["steps"]) > 0, r  # double backward, counted
        if r["optimizer"] in ("RankOneNewton", "NeumannIHVP", "FisherNewton"):
            assert "skipped_steps" in json.loads(r["counters"])  # read off the state


def test_quick_run_writes_table_curves_and_figure(quick_run):
    out, rows = quick_run
    md = (out / "peers.md").read_text()
    for wl in {r["workload"] for r in rows}:
        assert f"(`{wl}`)" in md
    adam_rows = [line for line in md.splitlines() if line.startswith("| Adam | defaults |")]
    assert len(adam_rows) == len({r["workload"] for r in rows})
    for line in adam_rows:
        loss = line.split("|")[3].strip()
        assert math.isfinite(float(loss))
    curves = json.loads((out / "peers_curves.json").read_text())
    assert len(curves) == len(rows)
    for c in curves:
        assert len(c["loss"]) == len(c["time_s"]) == len(c["grad_evals"]) >= 2
        assert c["iteration"][0] == 0
    assert (out / "peers.png").stat().st_size > 10_000


def test_diverging_and_failing_optimizers_are_recorded_not_raised():
    wl = WORKLOADS["mlp"]
    nan_sgd = peers.OptimizerSpec(
        "nan", lambda p, m, **kw: torch.optim.SGD(p, lr=float("nan")), "backward"
    )
    res = peers.run_one(wl, nan_sgd, peers.DEFAULTS, 0, steps=2, curve_points=1)
    assert res.status == "diverged" and math.isnan(res.final_train_loss)

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("boom")

    broken = peers.OptimizerSpec("broken", lambda p, m, **kw: Broken(p, lr=0.1), "backward")
    res = peers.run_one(wl, broken, peers.DEFAULTS, 0, steps=2, curve_points=1)
    assert res.status == "error" and "boom" in res.error

    def refuse(p, m, **kw):
        raise ValueError("no defaults")

    refusing = peers.OptimizerSpec("refusing", refuse, "backward")
    res = peers.run_one(wl, refusing, peers.DEFAULTS, 0, steps=2)
    assert res.status == "error" and "no defaults" in res.error
    assert "refusing" in peers.markdown([res], {}, 0.0)


def test_runs_are_deterministic_per_seed():
    wl, spec = WORKLOADS["mlp"], peers.OPTIMIZERS["RankOneNewton"]
    a, b, c = (peers.run_one(wl, spec, peers.DEFAULTS, s, steps=3) for s in (0, 0, 1))
    assert a.status == b.status == c.status == "ok"
    assert a.curve["loss"] == b.curve["loss"] and a.final_train_loss == b.final_train_loss
    assert a.final_train_loss != c.final_train_loss


def test_grid_reads_defaults_and_best_skips_diverged_settings():
    spec = peers.OPTIMIZERS["Adam"]
    model = WORKLOADS["mlp"].build(0).model
    defaults = peers.default_hypers(spec, model)
    labels = [s.label for s in peers.settings_for(spec, defaults, grid=True)]
    assert labels == ["defaults", "lr×1/3", "lr×3"]
    assert peers.scaled("lr", 3).overrides(defaults) == {"lr": 3 * defaults["lr"]}
    assert [s.label for s in peers.settings_for(spec, defaults, grid=False)] == ["defaults"]

    def result(setting, loss, status="ok"):
        return peers.RunResult("mlp", "X", setting, 0, {}, status=status, final_train_loss=loss)

    runs = [result("defaults", 0.5), result("a", 0.1), result("b", 0.01, status="diverged")]
    runs.append(peers.RunResult("mlp", "X", "b", 1, {}, final_train_loss=0.001))
    assert peers.best_settings(runs) == {("mlp", "X"): "a"}
