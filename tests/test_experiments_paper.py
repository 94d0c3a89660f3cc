"""The experiment runner of the paper's §4 (Islamov, Qian, Richtárik, ICML 2021): a smoke run
on a2a (few iterations) and the claim logic."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from torch_rankone.experiments import paper


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``python -m torch_rankone.experiments.paper`` on a2a with small caps, wall-clock on."""
    try:
        paper.load("a2a")
    except FileNotFoundError as exc:
        pytest.skip(f"a2a not available: {exc}")
    out = tmp_path_factory.mktemp("paper")
    before = torch.get_num_threads()
    paths = paper.main(
        ["--dataset", "a2a", "--lam", "1e-3", "--out", str(out), "--threads", "1",
         "--max-iter-first-order", "40", "--max-iter-second-order", "40",
         "--max-iter-nl", "300", "--wallclock", "--no-progress"]
    )  # fmt: skip
    torch.set_num_threads(before)
    return paths


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_writes_figure_and_csvs(smoke):
    assert smoke["figure"].suffix == ".png" and 0 < smoke["figure"].stat().st_size < 400_000
    rows = read(smoke["summary"])
    assert {r["accounting"] for r in rows} == {"theory", "authors-code", "authors-text"}
    names = [r["method"] for r in rows if r["accounting"] == "theory"]
    assert names[:5] == ["NL1", "NL2", "CNL", "NL1 (r=3)", "NL2 (r=3)"] and len(names) == 5 + 13
    assert {"DCGD-RS", "DIANA-RD", "ADIANA-NC", "Newton (m+d)", "BFGS", "DINGO"} <= set(names)
    curves = read(smoke["curves"])
    assert {r["method"] for r in curves} == set(names)
    for r in curves:  # one node's bill never exceeds all nodes'
        if r["bits_authors-code"] and r["bits_authors-text"]:
            assert float(r["bits_authors-text"]) >= float(r["bits_authors-code"])
    # DCGD/DIANA/ADIANA/DINGO run once per family; NL, Newton, BFGS once
    families = {(r["method"], r["parameters"]) for r in curves}
    assert {("DINGO", "theory"), ("DINGO", "authors"), ("NL1", "any"), ("BFGS", "any")} <= families
    assert smoke["figure1"].exists()
    optimum = read(smoke["optimum"])[0]
    assert abs(float(optimum["difference"])) < 1e-12


def test_smoke_nl_and_second_order_reach_1e10_on_a2a(smoke):
    rows = {r["method"]: r for r in read(smoke["summary"]) if r["accounting"] == "theory"}
    for name in ("NL1", "NL2", "Newton", "BFGS", "DINGO"):
        assert rows[name]["iters_1e-10"] != "", name
        assert float(rows[name]["final_gap"]) <= 1e-10
    # first-order methods stop at their (smoke) cap, far from 1e-10
    assert rows["DIANA-RS"]["iters_1e-10"] == "" and rows["DIANA-RS"]["stopped"] == "iterations"


def test_smoke_claims_cover_every_baseline_and_convention(smoke):
    claims = read(smoke["claims"])
    assert len(claims) == 3 * (2 * 13 + 4)  # NL1, NL2 vs all; CNL vs DCGD/DIANA-RS/NC
    assert {r["accounting"] for r in claims} == {"theory", "authors-code", "authors-text"}
    for r in claims:
        assert r["verdict"].split()[0] in {"holds", "fails", "undecided"}
        if r["verdict"] in ("holds", "fails"):  # both reached 1e-10: the measured ratio
            assert (float(r["factor"]) > 1) == (r["verdict"] == "holds")


def test_smoke_wallclock_reaches_the_same_gap(smoke):
    rows = read(smoke["wallclock"])
    assert [r["method"].split()[0] for r in rows] == ["NL1", "scikit-learn", "SciPy"]
    assert all(float(r["gap"]) <= 1e-8 and float(r["seconds"]) > 0 for r in rows)
    assert "C = 1/(λN)" in rows[1]["method"]


def run(name, gaps, bits):
    r = paper.MethodRun(name, gap=list(gaps))
    r.bits = {"theory": list(bits), "authors-code": [b / 10 for b in bits]}
    return r


def test_check_claims_verdicts():
    runs = {
        "NL1": run("NL1", [1, 1e-9, 1e-11], [0, 10, 20]),
        "fast": run("fast", [1, 1e-11], [0, 5]),  # reaches with 5 < 20 bits: claim fails
        "slow": run("slow", [1, 1e-5, 1e-11], [0, 30, 80]),  # reaches with 80: holds ×4
        "stalled": run("stalled", [1, 1e-3, 1e-4], [0, 50, 100]),  # never: holds, > ×5
        "short": run("short", [1, 1e-3], [0, 10]),  # stopped before 20 bits: undecided
    }
    by_conv = {a: runs for a in ("theory", "authors-code")}
    got = {(r["baseline"], r["accounting"]): r for r in paper.check_claims(by_conv)}
    assert got["fast", "theory"]["verdict"] == "fails"
    assert got["fast", "authors-code"]["factor"] == pytest.approx(0.25)
    assert got["slow", "theory"]["verdict"] == "holds"
    assert got["slow", "theory"]["factor"] == pytest.approx(4.0)
    assert got["stalled", "authors-code"]["verdict"].startswith("holds (not reached")
    assert got["stalled", "authors-code"]["factor"] == pytest.approx(5.0)
    assert got["stalled", "theory"]["baseline_gap_at_nl_bits"] == 1.0
    assert got["short", "theory"]["verdict"].startswith("undecided")
    assert not math.isnan(got["slow", "authors-code"]["baseline_gap_at_nl_bits"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        paper.load("iris")
    with pytest.raises(ValueError, match="unknown methods"):
        paper.run_dataset("a2a", 1e-3, methods=["NL1", "SGD"])
    with pytest.raises(SystemExit):
        paper.main(["--dataset", "a2a", "--lam", "0"])


def test_report_tables_from_the_smoke_csvs(smoke):
    md = paper.report(smoke["figure"].parents[1])
    assert "### a2a (n = 15, m = 151), λ = 0.001" in md
    assert md.count("\n| NL1 |") == 3 and "| DINGO | " in md  # one bits table per convention
    for a in ("theory", "authors-code", "authors-text"):
        assert f"**Verdict, `{a}` convention.** NL1:" in md
    assert "scikit-learn newton-cholesky" in md
