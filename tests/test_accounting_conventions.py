"""The declared bit conventions ("theory", "authors-code", "authors-text"): every baseline's and
NewtonLearn's per-iteration bill under "authors-code" against the count the paper publishes
(R. Islamov, X. Qian, P. Richtárik, ICML 2021, §4), with hand-computed numbers, and the
authors' constants and stepsizes."""

from __future__ import annotations

import math

import pytest
import torch

from torch_rankone import NewtonLearn
from torch_rankone.distributed import NaturalCompression, RandK, RandomDithering
from torch_rankone.distributed import accounting as acc
from torch_rankone.distributed import baselines as bl

N, M, D, LAM = 3, 6, 5, 0.1
LOG2_C_5_2 = math.log2(10)  # log2 C(5, 2): which 2 of the 5 entries


pytestmark = pytest.mark.usefixtures("one_thread")  # small products: one thread


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(N * M, D, generator=g, dtype=torch.float64)
    b = torch.where(torch.rand(N * M, generator=g) < 0.5, -1.0, 1.0).double()
    return A, b


def run(cls, problem, steps=3, accounting="authors-code", **kw):
    A, b = problem
    x = torch.zeros(D, dtype=torch.float64)
    opt = cls([x], A, b, lam=LAM, num_nodes=N, accounting=accounting,
              generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    for _ in range(steps):
        opt.step()
    return opt


def per_iteration(opt, key="bits"):
    bits = [h[key] for h in opt.history]
    return [b - a for a, b in zip(bits, bits[1:])]


@pytest.mark.parametrize(
    ("compressor", "published"),
    [(RandK(2), 64 + LOG2_C_5_2), (RandomDithering(2), 2.8 * 5 + 32), (NaturalCompression(), 45)],
    ids=["RS: 32r + log2 C(d, r)", "RD: 2.8d + 32", "NC: 9d"],
)
@pytest.mark.parametrize("cls", [bl.DCGD, bl.DIANA, bl.ADIANA])
def test_first_order_bill_one_published_vector(problem, cls, compressor, published):
    """One node, one compressed d-vector per iteration — ADIANA included (the authors' code
    bills one, although ADIANA compresses two; "theory" bills both)."""
    opt = run(cls, problem, compressor=compressor)
    assert per_iteration(opt) == pytest.approx([published] * 2, rel=1e-12)
    assert opt.history[-1]["bits_authors-text"] == pytest.approx(N * 3 * published, rel=1e-12)
    if cls is bl.ADIANA and isinstance(compressor, NaturalCompression):
        theory = run(cls, problem, accounting="theory", compressor=compressor)
        assert per_iteration(theory) == [2 * N * 45] * 2  # two vectors, every node


def test_newton_bills_d2_plus_d(problem):
    opt = run(bl.DistributedNewton, problem)
    assert per_iteration(opt) == [32 * (25 + 5)] * 2  # 960 per node
    assert opt.history[-1]["bits_authors-text"] == N * 3 * 960
    opt = run(bl.DistributedNewton, problem, structured=True)
    assert opt.history[0]["bits"] == 32 * 6 * 5 + 32 * (6 + 5)  # rows once, then m + d


def test_bfgs_bills_init_hessian_and_gradients(problem):
    opt = run(bl.BFGS, problem)
    assert opt.history[0]["bits"] == 32 * 15 + 32 * 5  # 32·d(d+1)/2 once, then 32d
    assert per_iteration(opt) == [160] * 2


def test_dingo_bills_uplink_and_the_downlink(problem):
    """authors-code: one node's uplink plus 3·32d = 480 of downlink per iteration;
    authors-text: all nodes' uplink, no downlink."""
    code = run(bl.DINGO, problem)
    assert code.step_cap == (0.01, 5)
    for h in code.history:
        k = code.history.index(h) + 1
        assert h["bits"] - h["bits_authors-text"] / N == pytest.approx(480 * k)
        assert (h["bits_authors-text"] / N) % 160 == 0  # whole d-vectors of 32-bit floats
    theory = run(bl.DINGO, problem, accounting="theory")
    assert theory.step_cap is None
    assert theory.history[-1]["bits"] == theory.history[-1]["bits_authors-text"]


def test_dingo_step_capped_for_five_iterations(problem):
    A, b = problem
    x = torch.zeros(D, dtype=torch.float64)
    opt = bl.DINGO([x], A, b, lam=LAM, num_nodes=N, accounting="authors-code")
    steps = []
    for _ in range(7):
        before = x.clone()
        g = opt.nodes.gradients(before, LAM).mean(0)
        H = opt.nodes.local_hessians(before, LAM)
        p, _, _ = opt._direction({"cases": [0, 0, 0]}, H, g)  # DINGO's direction at x^k
        opt.step()
        steps.append(float((x - before).norm() / p.norm()))
    assert all(a <= 0.01 + 1e-12 for a in steps[:5])  # α ≤ 0.01 in the first 5 iterations
    assert max(steps[5:]) > 0.01  # then the line search starts at α = 1 again


def test_authors_stepsizes(problem):
    A, b = problem
    L = 0.25 * float(torch.linalg.eigvalsh(A.T @ A / (N * M))[-1])  # global, no λ
    omega = RandK(2).omega(D)  # 5/2 − 1 = 1.5
    assert omega == 1.5
    dcgd = run(bl.DCGD, problem, steps=0, compressor=RandK(2))
    assert dcgd.lr == pytest.approx(1 / L, rel=1e-10)
    diana = run(bl.DIANA, problem, steps=0, compressor=RandK(2))
    alpha = 1 / 2.5
    assert diana.alpha == pytest.approx(alpha)
    assert diana.lr == pytest.approx(min(alpha / (2 * LAM), 2 / ((L + LAM) * (1 + 6 * 1.5 / 3))))
    adiana = run(bl.ADIANA, problem, steps=0, compressor=RandK(2))
    assert adiana.constants == bl.adiana_parameters(L + LAM, LAM, omega, N)


def _nl(accounting, variant="nl1"):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(6, 2, generator=g, dtype=torch.float64)
    b = torch.where(torch.rand(6, generator=g) < 0.5, -1.0, 1.0).double()
    x = torch.zeros(2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    opt = NewtonLearn([x], A, b, lam=0.1, variant=variant, compressor=RandK(1), num_nodes=2,
                      accounting=accounting, generator=gen)  # fmt: skip
    for _ in range(3):
        opt.step()
    return opt


@pytest.mark.parametrize(("variant", "beta"), [("nl1", 0), ("nl2", 32)])
def test_newton_learn_authors_code_and_text(variant, beta):
    """d = 2, m = 3, n = 2, RandK(1): the code's 32(d + rd + r) = 160 per node (+32 for β),
    init 32·d(d+1)/2 = 96; the text's total over both nodes, with log2 C(3, 1) index bits."""
    code = _nl("authors-code", variant)
    assert [h["bits"] for h in code.history] == [96 + k * (160 + beta) for k in (1, 2, 3)]
    text = _nl("authors-text", variant)
    per = 2 * (160 + math.log2(3) + beta)
    assert [h["bits"] for h in text.history] == pytest.approx([2 * 96 + k * per for k in (1, 2, 3)])


def test_aliases_and_unknown_names(problem):
    assert acc.canonical("realistic") == "theory" and acc.canonical("paper") == "authors-code"
    opt = run(bl.DCGD, problem, steps=1, accounting="paper", compressor=RandK(2))
    assert opt.accounting == "authors-code" and opt.family == "authors"
    with pytest.raises(ValueError, match="authors-text"):
        run(bl.DCGD, problem, accounting="authors", compressor=RandK(2))
