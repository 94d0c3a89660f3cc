"""The experiments of Islamov, Qian and Richtárik (ICML 2021, §4): NL1/NL2 (and CNL) against
the baselines, in communicated bits, under each declared bit convention.

    python -m torch_rankone.experiments.paper --dataset a9a --lam 1e-3 --out docs
    python -m torch_rankone.experiments.paper --report --out docs

Regularised logistic regression on a LIBSVM dataset split into ``n`` nodes of ``m`` rows (the
paper's splits, :data:`DATASETS`; the remainder rows are dropped). Every method starts at
``x⁰ = 0``; ``P*`` is the value at the 20th float64 Newton iterate, as the paper's text states
(:data:`OPTIMUM_ITERATIONS`; the 25th is recorded beside it). The runner writes, under ``--out``:

* ``figures/newton_learn_<dataset>_lam<λ>.png``: ``P(x^k) − P*`` against the communicated bits,
  one panel per convention (named on its axis), and against iterations (one panel per parameter
  family); ``figures/newton_learn_fig1_<dataset>_lam<λ>.png``: NL1/NL2 with RandK(1) and
  RandK(3) against Newton, by iterations and by bits (the paper's Figure 1 on LIBSVM data);
* ``results/newton_learn_<dataset>_lam<λ>_curves.csv`` (the plotted points, log-thinned),
  ``..._summary.csv`` (iterations and bits to reach 1e-8 and 1e-10, per convention and
  method), ``..._claims.csv`` (the paper's claim, per NL variant, baseline and convention),
  ``..._optimum.csv`` (``P*`` from 20 and from 25 Newton iterations) and, with ``--wallclock``,
  ``..._wallclock.csv``.

Bit conventions (:mod:`torch_rankone.distributed.accounting`): ``theory`` (every node's uplink,
index bits, the Option-1 rows; the baselines at their theoretical constants), ``authors-code``
(one node's uplink as the authors' published experiment code counts it, with that code's
constants and stepsizes) and ``authors-text`` (the same runs billed as the paper's text states:
the total over all nodes, index bits included). DCGD, DIANA, ADIANA and DINGO take other
stepsizes under the ``authors-*`` conventions, so they are run once per parameter family; NL,
Newton and BFGS do not depend on it. The point ``k`` of a curve is ``(bits sent before x^k was
known, P(x^k) − P*)``.

The claims checked (§4): NL1 and NL2 with RandK(1) reach ``P − P* ≤ 1e-10`` with fewer bits than
every baseline; CNL with ``C_p`` (``Bernoulli(1/20, RandK(1))``) with fewer bits than DCGD and
DIANA (the paper's Figure 2(d)). A baseline that does not reach 1e-10 within its caps
(iterations, or ``--budget`` times NL's bits) is reported as such, with the bound on the factor
that follows.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..data import libsvm
from ..distributed import Bernoulli, NaturalCompression, RandK, RandomDithering
from ..distributed import baselines as bl
from ..distributed.accounting import CONVENTIONS, convention_family
from ..glm import glm_newton
from ..optim.newton_learn import NewtonLearn

__all__ = [
    "CONVENTIONS",
    "DATASETS",
    "MethodRun",
    "check_claims",
    "main",
    "optimum",
    "run_dataset",
    "wallclock",
]

#: ``(n, m)`` of the paper's experiments (§4, "Parameter setting"); λ ∈ {1e-3, 1e-4}.
DATASETS: dict[str, tuple[int, int]] = {
    "a2a": (15, 151),
    "a7a": (100, 161),
    "a9a": (80, 407),
    "w8a": (142, 350),
}
LAMBDAS = (1e-3, 1e-4)
OPTIMUM_ITERATIONS = 20
TARGETS = (1e-8, 1e-10)
#: NewtonLearn runs: ``name → (variant, compressor)``. NL1/NL2 with RandK(1) are the claims of
#: Figure 2(a)–(c); CNL with ``C_p`` that of Figure 2(d); the RandK(3) runs are Figure 1's.
NL_RUNS: dict[str, tuple[str, Callable]] = {
    "NL1": ("nl1", lambda: RandK(1)),
    "NL2": ("nl2", lambda: RandK(1)),
    "CNL": ("cnl", lambda: Bernoulli(1 / 20, RandK(1))),
    "NL1 (r=3)": ("nl1", lambda: RandK(3)),
    "NL2 (r=3)": ("nl2", lambda: RandK(3)),
}
NL_METHODS = ("NL1", "NL2")
#: The baselines each NewtonLearn claim is checked against (CNL: Figure 2(d)'s).
CLAIMS: dict[str, tuple[str, ...] | None] = {
    "NL1": None,
    "NL2": None,
    "CNL": ("DCGD-RS", "DCGD-NC", "DIANA-RS", "DIANA-NC"),
}
#: Baselines whose constants (hence iterates) depend on the convention family.
FAMILY_DEPENDENT = ("DCGD", "DIANA", "ADIANA", "DINGO")
FAMILIES = {"theory": ("theory",), "authors": ("authors-code", "authors-text")}


@dataclass
class MethodRun:
    """One method's curve: ``gap[k] = P(x^k) − P*`` and the bits sent before ``x^k``, for the
    conventions of its parameter family (``bits[convention]``)."""

    name: str
    gap: list[float] = field(default_factory=list)
    bits: dict[str, list[float]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    stopped: str = ""
    family: str = "any"

    def first(self, target: float) -> int | None:
        """The first ``k`` with ``P(x^k) − P* ≤ target``, or ``None``."""
        return next((k for k, g in enumerate(self.gap) if g <= target), None)

    def gap_within(self, budget: float, accounting: str) -> float:
        """The smallest gap reached with at most ``budget`` bits."""
        gaps = [g for g, b in zip(self.gap, self.bits[accounting]) if b <= budget]
        return min(gaps) if gaps else math.nan


def load(dataset: str) -> tuple[Tensor, Tensor]:
    """The dataset's first ``n·m`` rows in float64 (features, ±1 labels)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    n, m = DATASETS[dataset]
    A, b = libsvm(dataset, dtype=torch.float64)
    if A.shape[0] < n * m:
        raise ValueError(f"{dataset} has {A.shape[0]} rows, fewer than n·m = {n * m}")
    return A[: n * m].contiguous(), b[: n * m].contiguous()


def optimum(A: Tensor, b: Tensor, lam: float, iterations: int = OPTIMUM_ITERATIONS) -> float:
    """``P*``: the value at the ``iterations``-th exact Newton iterate (float64; default the
    paper's 20th)."""
    return glm_newton(A, b, lam=lam, iterations=iterations)[1][-1]


def baseline_factories(d: int) -> dict[str, tuple[Callable, dict, bool]]:
    """``name → (class, keyword arguments, first_order)`` with the paper's compressors:
    RandK with ``r = d/4``, random dithering with ``s = √d``, natural compression."""
    compressors = {
        "RS": RandK(max(1, d // 4)),
        "RD": RandomDithering(max(1, round(math.sqrt(d)))),
        "NC": NaturalCompression(),
    }
    out: dict[str, tuple[Callable, dict, bool]] = {
        "Newton": (bl.DistributedNewton, {}, False),
        "Newton (m+d)": (bl.DistributedNewton, {"structured": True}, False),
        "BFGS": (bl.BFGS, {}, False),
        "DINGO": (bl.DINGO, {}, False),
    }
    for cls in (bl.DCGD, bl.DIANA, bl.ADIANA):
        for short, comp in compressors.items():
            out[f"{cls.__name__}-{short}"] = (cls, {"compressor": comp}, True)
    return out


def _family_dependent(name: str) -> bool:
    return name.split("-")[0] in FAMILY_DEPENDENT


def _iterate(run: MethodRun, opt, convs, p_star: float, max_iter: int, stop: Callable, bar) -> None:
    """Step ``opt`` (history entries with ``bits_<convention>``) until the target, divergence,
    ``stop(run)`` or ``max_iter``; ``x^k``'s point is appended after step ``k + 1``."""
    start = {a: opt.initial_bits[a] for a in convs}
    for k in range(1, max_iter + 2):
        opt.step()
        hist = opt.history
        run.gap.append(hist[-1]["loss"] - p_star)
        run.seconds.append(hist[-2]["time"] if k > 1 else 0.0)
        for a in convs:
            run.bits[a].append(start[a] if k == 1 else hist[-2][f"bits_{a}"])
        bar.update(1)
        if run.gap[-1] <= TARGETS[-1]:
            run.stopped = "target"
            return
        if not math.isfinite(run.gap[-1]):
            run.stopped = "diverged"
            return
        if stop(run):
            run.stopped = "budget"
            return
    run.stopped = "iterations"


class _NLRuns:
    """NewtonLearn run once per convention (its iterates do not depend on it), seen as one
    optimizer with a ``bits_<convention>`` key per history entry."""

    def __init__(self, runs: dict) -> None:
        self.runs = runs
        self.history: list[dict[str, float]] = []
        self.initial_bits = {
            a: float(o.state[o.param_groups[0]["params"][0]]["bits_sent"]) for a, o in runs.items()
        }

    def step(self) -> None:
        losses = {a: float(opt.step()) for a, opt in self.runs.items()}
        if len(set(losses.values())) != 1:
            raise RuntimeError(f"NewtonLearn's iterates differ between conventions: {losses}")
        first = next(iter(self.runs.values())).history[-1]
        entry = dict(first)
        for a, opt in self.runs.items():
            entry[f"bits_{a}"] = opt.history[-1]["bits"]
        self.history.append(entry)


def run_dataset(
    dataset: str,
    lam: float,
    *,
    max_iter_second_order: int = 300,
    max_iter_first_order: int = 5000,
    max_iter_nl: int = 3000,
    budget: float = 3.0,
    seed: int = 0,
    methods: list[str] | None = None,
    conventions: tuple[str, ...] = CONVENTIONS,
    progress: bool = True,
) -> tuple[dict[str, dict[str, MethodRun]], float]:
    """Run the NewtonLearn variants and the baselines on ``dataset`` with ``λ = lam``; returns
    ``runs[convention][method]`` and ``P*``. Methods whose constants depend on the convention
    family run once per family. A first-order run stops once its bits exceed ``budget`` times
    the most bits an NL1/NL2 run needed for 1e-10 (in every convention of its family)."""
    from tqdm.auto import tqdm

    known = list(NL_RUNS) + list(baseline_factories(4))
    names = known if methods is None else methods
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {known}")
    for a in conventions:
        if a not in CONVENTIONS:
            raise ValueError(f"conventions must be among {CONVENTIONS}, got {a!r}")
    A, b = load(dataset)
    n, _ = DATASETS[dataset]
    d = A.shape[1]
    p_star = optimum(A, b, lam)
    factories = baseline_factories(d)
    runs: dict[str, dict[str, MethodRun]] = {a: {} for a in conventions}
    families = {f: tuple(a for a in convs if a in conventions) for f, convs in FAMILIES.items()}
    families = {f: convs for f, convs in families.items() if convs}
    bar = tqdm(total=0, disable=not progress, desc=f"{dataset} λ={lam:g}", unit="it")

    def nl_need(a: str) -> float:
        reached = [
            r.bits[a][r.first(TARGETS[-1])]
            for name, r in runs[a].items()
            if name in NL_METHODS and r.first(TARGETS[-1]) is not None
        ]
        return max(reached) if reached else math.inf

    def over_budget(run: MethodRun) -> bool:
        return all(run.bits[a][-1] > budget * nl_need(a) for a in run.bits)

    # NewtonLearn first (the budget of the first-order runs depends on it), then the baselines
    ordered = [m for m in names if m in NL_RUNS] + [m for m in names if m not in NL_RUNS]
    for name in ordered:
        bar.set_postfix_str(name)
        if name in NL_RUNS:
            variant, comp = NL_RUNS[name]
            opt = _NLRuns(
                {
                    a: NewtonLearn(
                        [torch.zeros(d, dtype=torch.float64)],
                        A,
                        b,
                        lam=lam,
                        variant=variant,
                        compressor=comp(),
                        num_nodes=n,
                        accounting=a,
                        generator=torch.Generator().manual_seed(seed),
                    )
                    for a in conventions
                }
            )
            jobs = [("any", conventions, opt, max_iter_nl, lambda r: False)]
        else:
            cls, kwargs, first_order = factories[name]
            groups = list(families.items()) if _family_dependent(name) else [("any", conventions)]
            jobs = []
            for fam, convs in groups:
                gen = torch.Generator().manual_seed(seed)
                x = torch.zeros(d, dtype=torch.float64)
                o = cls([x], A, b, lam=lam, num_nodes=n, generator=gen, accounting=convs[0],
                        **kwargs)  # fmt: skip
                o.initial_bits = dict(o._bits)
                cap = max_iter_first_order if first_order else max_iter_second_order
                jobs.append((fam, convs, o, cap, over_budget if first_order else lambda r: False))
        for fam, convs, opt, cap, stop in jobs:
            run = MethodRun(name, bits={a: [] for a in convs}, family=fam)
            bar.total += cap + 1
            _iterate(run, opt, convs, p_star, cap, stop, bar)
            for a in convs:
                runs[a][name] = run
    bar.close()
    return runs, p_star


def check_claims(runs: dict[str, dict[str, MethodRun]]) -> list[dict]:
    """Per NewtonLearn variant (:data:`CLAIMS`), baseline and convention: does NL reach 1e-10
    with fewer bits, and by what factor (``baseline bits / NL bits``; a lower bound where the
    baseline stopped first). ``runs[convention][method]``."""
    target = TARGETS[-1]
    rows = []
    for a, by_name in runs.items():
        for nl, against in CLAIMS.items():
            if nl not in by_name:
                continue
            k_nl = by_name[nl].first(target)
            for name, run in by_name.items():
                if name in NL_RUNS or (against is not None and name not in against):
                    continue
                row = {"nl": nl, "baseline": name, "accounting": a}
                k = run.first(target)
                if k_nl is None:
                    row.update(verdict="undecided (NL did not reach 1e-10)", factor=math.nan)
                    rows.append(row)
                    continue
                nl_bits = by_name[nl].bits[a][k_nl]
                row["nl_bits"] = nl_bits
                row["baseline_gap_at_nl_bits"] = run.gap_within(nl_bits, a)
                if k is not None:
                    row["baseline_bits"] = run.bits[a][k]
                    row["factor"] = run.bits[a][k] / nl_bits
                    row["verdict"] = "holds" if row["factor"] > 1 else "fails"
                else:
                    spent = run.bits[a][-1]
                    row["baseline_bits"] = math.nan
                    row["factor"] = spent / nl_bits
                    row["verdict"] = (
                        f"holds (not reached within {len(run.gap) - 1} iterations / "
                        f"{spent:.3g} bits: factor > {spent / nl_bits:.3g})"
                        if spent > nl_bits
                        else "undecided (baseline stopped before spending NL's bits)"
                    )
                rows.append(row)
    return rows


def wallclock(dataset: str, lam: float, target: float = 1e-8, seed: int = 0) -> list[dict]:
    """Seconds to reach ``P − P* ≤ target`` on one machine: NL1 (simulated nodes, RandK(1)),
    scikit-learn's ``LogisticRegression(solver="newton-cholesky")`` and SciPy's L-BFGS-B.

    Same objective: ``P(x) = (1/N) Σ log(1 + exp(−b aᵀx)) + (λ/2)‖x‖²`` is scikit-learn's
    ``(1/2)‖x‖² + C Σ log(1 + exp(−b aᵀx))`` divided by ``C·N``, hence ``C = 1/(λN)``, with
    ``fit_intercept=False``. The library solvers stop on their own tolerance: each is run with
    ``tol`` = 1e-4, 1e-6, … until the returned point reaches the target, and that run's time
    is reported (the earlier, too-loose runs are not counted).
    """
    import numpy as np
    import scipy.optimize
    from sklearn.linear_model import LogisticRegression

    A, b = load(dataset)
    n, _ = DATASETS[dataset]
    N, d = A.shape
    p_star = optimum(A, b, lam)
    An, bn = A.numpy(), b.numpy()

    def gap(w) -> float:
        x = torch.as_tensor(np.asarray(w, dtype=np.float64).reshape(-1))
        return (
            float(torch.nn.functional.softplus(-b * (A @ x)).mean() + lam / 2 * x.dot(x)) - p_star
        )

    rows = []
    x = torch.zeros(d, dtype=torch.float64)
    t0 = time.perf_counter()
    opt = NewtonLearn(
        [x],
        A,
        b,
        lam=lam,
        compressor=RandK(1),
        num_nodes=n,
        generator=torch.Generator().manual_seed(seed),
    )
    setup = time.perf_counter() - t0
    while float(opt.step()) - p_star > target and len(opt.history) < 5000:
        pass
    k = len(opt.history) - 1  # the step that returned P(x^k) ≤ target
    seconds = setup + (opt.history[k - 1]["time"] if k else 0.0)
    rows.append(
        dict(
            method="NL1 (simulated, RandK(1))",
            seconds=seconds,
            iterations=k,
            gap=float(opt.history[k]["loss"]) - p_star,
            setting=f"n={n}",
        )
    )

    def first_reaching(fit: Callable[[float], tuple[np.ndarray, int]], label: str, param: str):
        for tol in (1e-4, 1e-6, 1e-8, 1e-10, 1e-12, 1e-14):
            t0 = time.perf_counter()
            w, its = fit(tol)
            seconds = time.perf_counter() - t0
            g = gap(w)
            if g <= target:
                break
        rows.append(
            dict(method=label, seconds=seconds, iterations=its, gap=g, setting=f"{param}={tol:g}")
        )

    def sk(tol: float):
        clf = LogisticRegression(
            C=1.0 / (lam * N), fit_intercept=False, solver="newton-cholesky", tol=tol, max_iter=1000
        )
        clf.fit(An, bn)
        return clf.coef_.ravel(), int(np.max(clf.n_iter_))

    def fg(w):
        t = An @ w
        s = -bn * (1.0 / (1.0 + np.exp(bn * t)))
        val = np.logaddexp(0.0, -bn * t).mean() + lam / 2 * w.dot(w)
        return val, An.T @ s / N + lam * w

    def lb(tol: float):
        res = scipy.optimize.minimize(
            fg,
            np.zeros(d),
            jac=True,
            method="L-BFGS-B",
            options=dict(gtol=tol, ftol=tol * 1e-3, maxiter=100000),
        )
        return res.x, int(res.nit)

    first_reaching(sk, f"scikit-learn newton-cholesky (C = 1/(λN) = {1 / (lam * N):.4g})", "tol")
    first_reaching(lb, "SciPy L-BFGS-B", "gtol")
    return rows


def _thin(n: int) -> list[int]:
    """Indices 0..n−1 kept in the curves CSV and plot: all of the first 40, then 160
    log-spaced (keeps the CSVs small)."""
    keep = set(range(min(n, 40)))
    keep.update(int(v) for v in torch.logspace(math.log10(40), math.log10(max(n, 2)), 160))
    keep.add(n - 1)
    return sorted(k for k in keep if 0 <= k < n)


def _unique_runs(runs: dict[str, dict[str, MethodRun]]) -> list[MethodRun]:
    seen: dict[int, MethodRun] = {}
    for by_name in runs.values():
        for run in by_name.values():
            seen.setdefault(id(run), run)
    return list(seen.values())


def _label(run: MethodRun) -> str:
    return run.name if run.family == "any" else f"{run.name} [{run.family}]"


CONVENTION_TEXT = {
    "theory": "all nodes' uplink, theory's constants",
    "authors-code": "one node's uplink, authors' code",
    "authors-text": "all nodes, as the paper's text counts",
}


def write_outputs(
    dataset: str,
    lam: float,
    runs: dict[str, dict[str, MethodRun]],
    p_star: float,
    out: Path,
    wall: list[dict] | None = None,
    p_star_25: float | None = None,
) -> dict[str, Path]:
    """CSVs and figures; returns their paths."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "the experiment runner's figures need matplotlib, which torch_rankone does not "
            "install: pip install 'torch_rankone[examples]' (or matplotlib)"
        ) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    convs = list(runs)
    stem = f"newton_learn_{dataset}_lam{lam:g}"
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = {
        k: out / "results" / f"{stem}_{k}.csv" for k in ("curves", "summary", "claims", "optimum")
    }
    unique = _unique_runs(runs)
    with open(paths["curves"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "parameters", "iteration", "gap", *(f"bits_{a}" for a in convs)])
        for run in unique:
            for k in _thin(len(run.gap)):
                w.writerow(
                    [run.name, run.family, k, f"{run.gap[k]:.6g}"]
                    + [f"{run.bits[a][k]:.6g}" if a in run.bits else "" for a in convs]
                )
    summary = []
    for a, by_name in runs.items():
        for run in by_name.values():
            row = {
                "accounting": a,
                "method": run.name,
                "parameters": convention_family(a) if run.family != "any" else "any",
                "iterations_run": len(run.gap) - 1,
                "stopped": run.stopped,
                "final_gap": run.gap[-1],
                "seconds": run.seconds[-1],
            }
            for t in TARGETS:
                k = run.first(t)
                row[f"iters_{t:g}"] = "" if k is None else k
                row[f"bits_{t:g}"] = "" if k is None else f"{run.bits[a][k]:.4g}"
            row["bits_spent"] = f"{run.bits[a][-1]:.4g}"
            summary.append(row)
    _write_dicts(paths["summary"], summary)
    _write_dicts(paths["claims"], check_claims(runs))
    _write_dicts(
        paths["optimum"],
        [
            {
                "dataset": dataset,
                "lam": lam,
                "n": DATASETS[dataset][0],
                "m": DATASETS[dataset][1],
                "p_star_newton20": f"{p_star:.17g}",
                "p_star_newton25": "" if p_star_25 is None else f"{p_star_25:.17g}",
                "difference": "" if p_star_25 is None else f"{p_star - p_star_25:.3g}",
            }
        ],
    )
    if wall:
        paths["wallclock"] = out / "results" / f"{stem}_wallclock.csv"
        _write_dicts(paths["wallclock"], wall)

    main_runs = [r for r in unique if r.name not in ("NL1 (r=3)", "NL2 (r=3)")]
    fams = [f for f in ("theory", "authors") if any(a in runs for a in FAMILIES[f])]
    panels = [*convs, *(f"iterations:{f}" for f in fams)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    for ax, panel in zip(axes, panels):
        for i, run in enumerate(main_runs):
            ks = _thin(len(run.gap))
            if panel.startswith("iterations:"):
                if run.family not in ("any", panel.split(":")[1]):
                    continue
                xs = ks
            elif panel in run.bits:
                # the log axis cannot show 0 bits (methods without initialisation): 1 bit
                xs = [max(run.bits[panel][k], 1) for k in ks]
            else:
                continue
            ys = [max(run.gap[k], 1e-16) for k in ks]
            nl = run.name in NL_RUNS
            ax.plot(xs, ys, "-" if nl else ("--" if i % 2 else ":"), label=run.name,
                    lw=2 if nl else 1.2, color=plt.cm.tab20(i % 20))  # fmt: skip
        ax.set_yscale("log")
        if panel.startswith("iterations:"):
            fam = panel.split(":")[1]
            ax.set_xlabel(f"iterations ({fam} constants)")
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=0)
        else:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"bits — {panel} convention\n({CONVENTION_TEXT[panel]})")
        ax.set_ylabel("P(x^k) − P*")
        ax.axhline(TARGETS[-1], color="gray", lw=0.5)
        ax.set_ylim(1e-12, None)
    axes[0].legend(fontsize=6, ncol=2)
    n, m = DATASETS[dataset]
    fig.suptitle(
        f"{dataset} (n={n}, m={m}), λ={lam:g}, logistic regression, x⁰ = 0, "
        "P* = P(20th Newton iterate)"
    )
    fig.tight_layout()
    paths["figure"] = out / "figures" / f"{stem}.png"
    fig.savefig(paths["figure"], dpi=70)
    plt.close(fig)

    fig1 = [r for r in unique if r.name in ("NL1", "NL2", "NL1 (r=3)", "NL2 (r=3)", "Newton")]
    if fig1:
        panels = ["iterations", *convs]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2))
        for ax, panel in zip(axes, panels):
            for i, run in enumerate(fig1):
                ks = _thin(len(run.gap))
                xs = ks if panel == "iterations" else [max(run.bits[panel][k], 1) for k in ks]
                ax.plot(xs, [max(run.gap[k], 1e-16) for k in ks], label=run.name,
                        color=plt.cm.tab10(i))  # fmt: skip
            ax.set_yscale("log")
            if panel == "iterations":
                ax.set_xlabel("iterations")
            else:
                ax.set_xscale("log", base=2)
                ax.set_xlabel(f"bits — {panel} convention")
            ax.set_ylabel("P(x^k) − P*")
            ax.set_ylim(1e-12, None)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Figure 1 on {dataset} (n={n}, m={m}), λ={lam:g}: NL1/NL2, r = 1 and 3, "
                     "vs Newton")  # fmt: skip
        fig.tight_layout()
        paths["figure1"] = out / "figures" / f"newton_learn_fig1_{dataset}_lam{lam:g}.png"
        fig.savefig(paths["figure1"], dpi=70)
        plt.close(fig)
    return paths


def _write_dicts(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def _cell(r: dict) -> str:
    verdict = r["verdict"].split()[0]
    if verdict == "undecided":
        return "undecided"
    bound = ">" if "not reached" in r["verdict"] else "×"
    return f"{verdict} {bound}{r['factor']}"


def _verdict_sentence(claims: list[dict], nl: str, a: str) -> str:
    rows = [c for c in claims if c["nl"] == nl and c["accounting"] == a]
    if not rows:
        return ""
    parts = []
    for word in ("holds", "fails", "undecided"):
        got = [c for c in rows if c["verdict"].split()[0] == word]
        if got:
            names = ", ".join(
                c["baseline"] + ("" if word == "undecided" else f" {_cell(c).split()[1]}")
                for c in got
            )
            parts.append(f"{word} against {names}")
    return f"{nl}: " + "; ".join(parts) + "."


def overview(summaries: list[Path]) -> list[str]:
    """One row per problem and convention: the baselines each NL variant loses to (factor) and
    the undecided ones; it beats every other baseline."""
    lines = [
        "#### Overview: where the claim fails (NL needs more bits to 1e-10 than the baseline)",
        "",
        "Every baseline not listed as failed or undecided needs more bits than the NL variant "
        "(the claim holds against it). Factor = baseline bits / NL bits.",
        "",
        "| problem | convention | NL1 fails against | NL2 fails against | CNL fails against "
        "| undecided (NL1 / NL2 / CNL) |",
        "|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        stem = summary.name[: -len("_summary.csv")]
        dataset, lam = stem[len("newton_learn_") :].split("_lam")
        claims = _read_dicts(summary.with_name(f"{stem}_claims.csv"))
        for a in dict.fromkeys(c["accounting"] for c in claims):
            cells = [f"{dataset} λ={lam}", a]
            undecided = []
            for nl in ("NL1", "NL2", "CNL"):
                rows = [c for c in claims if c["nl"] == nl and c["accounting"] == a]
                fails = [c for c in rows if c["verdict"].split()[0] == "fails"]
                cells.append(", ".join(f"{c['baseline']} ×{c['factor']}" for c in fails) or "none")
                und = [c["baseline"] for c in rows if c["verdict"].split()[0] == "undecided"]
                undecided.append(", ".join(und) or "–")
            cells.append(" / ".join(undecided))
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def report(out: Path) -> str:
    """Markdown of every ``results/newton_learn_*`` CSV set under ``out``: per problem, ``P*``,
    the claim check per baseline and convention with a verdict per convention, then per
    convention the iterations and bits to 1e-8 and 1e-10, and the wall-clock."""
    lines = [
        "<!-- generated by `python -m torch_rankone.experiments.paper --report --out docs` -->",
        "",
    ]
    summaries = sorted((out / "results").glob("newton_learn_*_summary.csv"))
    lines += overview(summaries)
    for summary in summaries:
        stem = summary.name[: -len("_summary.csv")]
        rest = stem[len("newton_learn_") :]
        dataset, lam = rest.split("_lam")
        n, m = DATASETS.get(dataset, ("?", "?"))
        lines += [f"### {dataset} (n = {n}, m = {m}), λ = {lam}", ""]
        opt = summary.with_name(f"{stem}_optimum.csv")
        if opt.exists():
            o = _read_dicts(opt)[0]
            lines += [
                f"P* = P(20th Newton iterate) = {o['p_star_newton20']}; the 25th iterate's "
                f"value differs by {o['difference'] or 'n/a'}.",
                "",
            ]
        rows = _read_dicts(summary)
        claims = _read_dicts(summary.with_name(f"{stem}_claims.csv"))
        convs = list(dict.fromkeys(r["accounting"] for r in rows))
        lines += [
            "Claim (NL reaches 1e-10 with fewer bits): factor = baseline bits / NL bits, under "
            "the convention named in the column; `>` when the baseline stopped unconverged (a "
            "lower bound). DCGD, DIANA, ADIANA and DINGO are run with the theory's constants "
            "for the `theory` columns and with the authors' code's for the `authors-*` ones.",
            "",
        ]
        nls = list(dict.fromkeys(c["nl"] for c in claims))
        cols = [(nl, a) for nl in nls for a in convs]
        lines += [
            "| baseline | " + " | ".join(f"{nl} {a}" for nl, a in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for base in dict.fromkeys(c["baseline"] for c in claims):
            cells = [base]
            for nl, a in cols:
                r = next(
                    (
                        c
                        for c in claims
                        if (c["baseline"], c["nl"], c["accounting"]) == (base, nl, a)
                    ),
                    None,
                )
                cells.append("" if r is None else _cell(r))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for a in convs:
            lines.append(f"**Verdict, `{a}` convention.** " + " ".join(
                _verdict_sentence(claims, nl, a) for nl in nls))  # fmt: skip
            lines.append("")
        for a in convs:
            lines += [
                f"Bits in the `{a}` convention ({CONVENTION_TEXT.get(a, a)}):",
                "",
                "| method | iters 1e-8 | bits 1e-8 | iters 1e-10 | bits 1e-10 "
                "| stopped (iterations run) |",
                "|---|---|---|---|---|---|",
            ]
            for r in rows:
                if r["accounting"] != a:
                    continue
                cells = [r["method"]]
                for t in ("1e-08", "1e-10"):
                    if r[f"iters_{t}"] == "":
                        cells += ["not reached", f"> {r['bits_spent']}"]
                    else:
                        cells += [r[f"iters_{t}"], r[f"bits_{t}"]]
                cells.append(f"{r['stopped']} ({r['iterations_run']})")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        wall = summary.with_name(f"{stem}_wallclock.csv")
        if wall.exists():
            lines += [
                "| solver (one machine, to P − P* ≤ 1e-8) | seconds | iterations "
                "| P − P* | setting |",
                "|---|---|---|---|---|",
            ]
            for r in _read_dicts(wall):
                lines.append(
                    f"| {r['method']} | {r['seconds']} | {r['iterations']} | "
                    f"{r['gap']} | {r['setting']} |"
                )
            lines.append("")
    return "\n".join(lines)


def _read_dicts(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="a9a", choices=sorted(DATASETS))
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument(
        "--accounting",
        default="all",
        choices=["all", *CONVENTIONS],
        help="bit convention(s) of the runs, plots and claim check",
    )
    parser.add_argument("--out", type=Path, default=Path("paper_results"))
    parser.add_argument("--methods", nargs="*", default=None, help="default: all")
    parser.add_argument("--max-iter-first-order", type=int, default=5000)
    parser.add_argument("--max-iter-second-order", type=int, default=300)
    parser.add_argument("--max-iter-nl", type=int, default=3000)
    parser.add_argument(
        "--budget",
        type=float,
        default=3.0,
        help="stop a first-order method past this many times NL's bits",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument(
        "--wallclock", action="store_true", help="also time NL1 vs scikit-learn and SciPy to 1e-8"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report",
        action="store_true",
        help="only print Markdown tables of the CSVs already under --out (and write them to "
        "results/newton_learn_report.md there)",
    )
    args = parser.parse_args(argv)
    if args.report:
        text = report(args.out)
        (args.out / "results").mkdir(parents=True, exist_ok=True)
        (args.out / "results" / "newton_learn_report.md").write_text(text + "\n")
        print(text)
        return {}
    if args.lam <= 0:
        parser.error("--lam must be > 0 (NL1 needs λ > 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    conventions = CONVENTIONS if args.accounting == "all" else (args.accounting,)
    t0 = time.perf_counter()
    runs, p_star = run_dataset(
        args.dataset,
        args.lam,
        max_iter_second_order=args.max_iter_second_order,
        max_iter_first_order=args.max_iter_first_order,
        max_iter_nl=args.max_iter_nl,
        budget=args.budget,
        seed=args.seed,
        methods=args.methods,
        conventions=conventions,
        progress=not args.no_progress,
    )
    A, b = load(args.dataset)
    p_star_25 = optimum(A, b, args.lam, iterations=25)
    wall = wallclock(args.dataset, args.lam, seed=args.seed) if args.wallclock else None
    paths = write_outputs(args.dataset, args.lam, runs, p_star, args.out, wall, p_star_25)
    print(f"P* (20th Newton iterate) = {p_star:.17g}; 25th: {p_star_25:.17g} "
          f"(difference {p_star - p_star_25:.3g})")  # fmt: skip
    for a, by_name in runs.items():
        for name, run in by_name.items():
            ks = {t: run.first(t) for t in TARGETS}
            print(
                f"[{a}] {name:14s} "
                + "  ".join(
                    f"{t:g}: "
                    + ("not reached" if k is None else f"k={k} bits={run.bits[a][k]:.3g}")
                    for t, k in ks.items()
                )
                + f"  [{run.stopped}, {len(run.gap) - 1} it]"
            )
    for row in check_claims(runs):
        print(
            f"{row['nl']} vs {row['baseline']:14s} [{row['accounting']}]: {row['verdict']}"
            + (f" ×{row['factor']:.3g}" if row["verdict"] in ("holds", "fails") else "")
        )
    for row in wall or []:
        print(f"wall-clock to 1e-8: {row['method']}: {row['seconds']:.3f} s ({row['setting']})")
    for p in paths.values():
        print(f"wrote {p}")
    print(f"run time {time.perf_counter() - t0:.0f} s")
    return paths


if __name__ == "__main__":
    main()
