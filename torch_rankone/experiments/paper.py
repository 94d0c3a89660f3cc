"""The experiments of Islamov et al. 2021 (Figures 1–2): NL1/NL2 against the baselines, in bits.

    python -m torch_rankone.experiments.paper --dataset a9a --lam 1e-3

Regularised logistic regression on a LIBSVM dataset split into ``n`` nodes of ``m`` rows (the
paper's splits, :data:`DATASETS`; the remainder rows are dropped). Every method starts at
``x⁰ = 0``; ``P*`` is the value after :data:`OPTIMUM_ITERATIONS` float64 Newton iterations. The
runner writes, under ``--out``:

* ``figures/paper_<dataset>_lam<λ>.png``: ``P(x^k) − P*`` against the communicated bits (each
  convention in its own panel, named in the axis label) and against iterations;
* ``results/paper_<dataset>_lam<λ>_curves.csv`` (the plotted points, log-thinned),
  ``..._summary.csv`` (iterations and bits to reach 1e-8 and 1e-10 per method),
  ``..._claims.csv`` (the paper's claim, per baseline and convention) and, with ``--wallclock``,
  ``..._wallclock.csv``.

Bit conventions (:mod:`torch_rankone.distributed.accounting`): ``realistic`` sums every node's
uplink with index bits and the Option-1 rows; ``paper`` is one node's uplink as the authors'
code counts it. The point ``k`` of a curve is ``(bits sent before x^k was known, P(x^k) − P*)``.

The claim checked (Islamov et al. 2021, §4): NL1 and NL2 with RandK(1) reach ``P − P* ≤ 1e-10``
with fewer bits than every baseline. A baseline that does not reach 1e-10 within its caps
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
from ..distributed import NaturalCompression, RandK, RandomDithering
from ..distributed import baselines as bl
from ..distributed.accounting import ACCOUNTINGS
from ..glm import glm_newton
from ..optim.newton_learn import NewtonLearn

__all__ = ["DATASETS", "MethodRun", "check_claims", "main", "optimum", "run_dataset", "wallclock"]

#: ``(n, m)`` of the paper's experiments (§4, "Parameter setting").
DATASETS: dict[str, tuple[int, int]] = {
    "a2a": (15, 151),
    "a7a": (100, 161),
    "a9a": (80, 407),
    "w8a": (142, 350),
}
OPTIMUM_ITERATIONS = 25
TARGETS = (1e-8, 1e-10)
NL_METHODS = ("NL1", "NL2")


@dataclass
class MethodRun:
    """One method's curve: ``gap[k] = P(x^k) − P*`` and the bits sent before ``x^k``."""

    name: str
    gap: list[float] = field(default_factory=list)
    bits: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ACCOUNTINGS})
    seconds: list[float] = field(default_factory=list)
    stopped: str = ""

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


def optimum(A: Tensor, b: Tensor, lam: float) -> float:
    """``P*``: the value after :data:`OPTIMUM_ITERATIONS` exact Newton iterations (float64)."""
    return glm_newton(A, b, lam=lam, iterations=OPTIMUM_ITERATIONS)[1][-1]


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


def _record(run: MethodRun, opt, start_bits: dict[str, float], steps: int, p_star: float) -> None:
    """Append ``x^k``'s point after ``opt.step()`` number ``steps`` (``k = steps − 1``)."""
    hist = opt.history
    run.gap.append(hist[-1]["loss"] - p_star)
    run.seconds.append(hist[-2]["time"] if steps > 1 else 0.0)
    for a in ACCOUNTINGS:
        run.bits[a].append(start_bits[a] if steps == 1 else hist[-2][f"bits_{a}"])


def _iterate(
    run: MethodRun, opt, start: dict, p_star: float, max_iter: int, stop: Callable, bar
) -> None:
    for k in range(1, max_iter + 2):
        opt.step()
        _record(run, opt, start, k, p_star)
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


class _NLHistory:
    """NL run pairs (one per convention) seen as one optimizer with both bit keys."""

    def __init__(self, runs: dict) -> None:
        self.runs = runs

    @property
    def history(self) -> list[dict[str, float]]:
        first = self.runs[ACCOUNTINGS[0]].history
        out = []
        for k, h in enumerate(first):
            entry = dict(h)
            for a, opt in self.runs.items():
                entry[f"bits_{a}"] = opt.history[k]["bits"]
            out.append(entry)
        return out

    def step(self) -> None:
        losses = {a: float(opt.step()) for a, opt in self.runs.items()}
        if len(set(losses.values())) != 1:
            raise RuntimeError(f"NewtonLearn's iterates differ between conventions: {losses}")


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
    progress: bool = True,
) -> tuple[dict[str, MethodRun], float]:
    """Run NL1, NL2 and the baselines on ``dataset`` with ``λ = lam``; returns the runs and
    ``P*``. A first-order run stops once its bits exceed ``budget`` times the most bits an NL
    run needed for 1e-10 (in every convention): by then the claim is decided."""
    from tqdm.auto import tqdm

    known = list(NL_METHODS) + list(baseline_factories(4))
    names = known if methods is None else methods
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {known}")
    A, b = load(dataset)
    n, _ = DATASETS[dataset]
    d = A.shape[1]
    p_star = optimum(A, b, lam)
    factories = baseline_factories(d)
    runs: dict[str, MethodRun] = {}
    bar = tqdm(total=0, disable=not progress, desc=f"{dataset} λ={lam:g}", unit="it")

    def nl_need(a: str) -> float:
        reached = [
            r.bits[a][r.first(TARGETS[-1])]
            for r in runs.values()
            if r.name in NL_METHODS and r.first(TARGETS[-1]) is not None
        ]
        return max(reached) if reached else math.inf

    def over_budget(run: MethodRun) -> bool:
        return all(run.bits[a][-1] > budget * nl_need(a) for a in ACCOUNTINGS)

    for name in names:
        bar.set_postfix_str(name)
        run = MethodRun(name)
        if name in NL_METHODS:
            per_conv = {}
            for a in ACCOUNTINGS:
                per_conv[a] = NewtonLearn(
                    [torch.zeros(d, dtype=torch.float64)],
                    A,
                    b,
                    lam=lam,
                    variant=name.lower(),
                    compressor=RandK(1),
                    num_nodes=n,
                    accounting=a,
                    generator=torch.Generator().manual_seed(seed),
                )
            opt = _NLHistory(per_conv)
            start = {
                a: float(o.state[o.param_groups[0]["params"][0]]["bits_sent"])
                for a, o in per_conv.items()
            }
            cap, stop = max_iter_nl, lambda r: False
        else:
            cls, kwargs, first_order = factories[name]
            x = torch.zeros(d, dtype=torch.float64)
            gen = torch.Generator().manual_seed(seed)
            opt = cls([x], A, b, lam=lam, num_nodes=n, generator=gen, **kwargs)
            start = dict(opt._bits)
            cap = max_iter_first_order if first_order else max_iter_second_order
            stop = over_budget if first_order else (lambda r: False)
        bar.total += cap + 1
        _iterate(run, opt, start, p_star, cap, stop, bar)
        runs[name] = run
    bar.close()
    return runs, p_star


def check_claims(runs: dict[str, MethodRun], accountings=ACCOUNTINGS) -> list[dict]:
    """Per NL variant, baseline and convention: does NL reach 1e-10 with fewer bits, and by
    what factor (``baseline bits / NL bits``; a lower bound where the baseline stopped first)."""
    target = TARGETS[-1]
    rows = []
    for nl in NL_METHODS:
        if nl not in runs:
            continue
        k_nl = runs[nl].first(target)
        for name, run in runs.items():
            if name in NL_METHODS:
                continue
            for a in accountings:
                row = {"nl": nl, "baseline": name, "accounting": a}
                k = run.first(target)
                if k_nl is None:
                    row.update(verdict="undecided (NL did not reach 1e-10)", factor=math.nan)
                    rows.append(row)
                    continue
                nl_bits = runs[nl].bits[a][k_nl]
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


def write_outputs(
    dataset: str,
    lam: float,
    runs: dict[str, MethodRun],
    p_star: float,
    out: Path,
    accountings=ACCOUNTINGS,
    wall: list[dict] | None = None,
) -> dict[str, Path]:
    """CSVs, the figure and a Markdown summary; returns their paths."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "the experiment runner's figures need matplotlib, which torch_rankone does not "
            "install: pip install 'torch_rankone[examples]' (or matplotlib)"
        ) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = f"paper_{dataset}_lam{lam:g}"
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = {k: out / "results" / f"{stem}_{k}.csv" for k in ("curves", "summary", "claims")}
    with open(paths["curves"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "iteration", "bits_realistic", "bits_paper", "gap"])
        for run in runs.values():
            for k in _thin(len(run.gap)):
                w.writerow(
                    [
                        run.name,
                        k,
                        f"{run.bits['realistic'][k]:.6g}",
                        f"{run.bits['paper'][k]:.6g}",
                        f"{run.gap[k]:.6g}",
                    ]
                )
    summary = []
    for run in runs.values():
        row = {
            "method": run.name,
            "iterations_run": len(run.gap) - 1,
            "stopped": run.stopped,
            "final_gap": run.gap[-1],
            "seconds": run.seconds[-1],
        }
        for t in TARGETS:
            k = run.first(t)
            row[f"iters_{t:g}"] = "" if k is None else k
            for a in ACCOUNTINGS:
                row[f"bits_{a}_{t:g}"] = "" if k is None else f"{run.bits[a][k]:.4g}"
        for a in ACCOUNTINGS:
            row[f"bits_{a}_spent"] = f"{run.bits[a][-1]:.4g}"
        summary.append(row)
    _write_dicts(paths["summary"], summary)
    claims = check_claims(runs, accountings)
    _write_dicts(paths["claims"], claims)
    if wall:
        paths["wallclock"] = out / "results" / f"{stem}_wallclock.csv"
        _write_dicts(paths["wallclock"], wall)

    panels = [*accountings, "iterations"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, panel in zip(axes, panels):
        for i, run in enumerate(runs.values()):
            ks = _thin(len(run.gap))
            # the log axis cannot show 0 bits (methods without initialisation): 1 bit instead,
            # as the authors' code starts its counters at 1
            xs = ks if panel == "iterations" else [max(run.bits[panel][k], 1) for k in ks]
            ys = [max(run.gap[k], 1e-16) for k in ks]
            style = "-" if run.name in NL_METHODS else ("--" if i % 2 else ":")
            ax.plot(
                xs,
                ys,
                style,
                label=run.name,
                lw=2 if run.name in NL_METHODS else 1.2,
                color=plt.cm.tab20(i % 20),
            )
        ax.set_yscale("log")
        if panel != "iterations":
            ax.set_xscale("log", base=2)
            what = (
                "all nodes' uplink" if panel == "realistic" else "one node's uplink, authors' count"
            )
            ax.set_xlabel(f"communicated bits — {panel} convention ({what})")
        else:
            ax.set_xlabel("iterations")
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=0)
        ax.set_ylabel("P(x^k) − P*")
        ax.axhline(TARGETS[-1], color="gray", lw=0.5)
        ax.set_ylim(1e-12, None)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"{dataset} (n={DATASETS[dataset][0]}, m={DATASETS[dataset][1]}), λ={lam:g}, "
        "logistic regression, x⁰ = 0"
    )
    fig.tight_layout()
    paths["figure"] = out / "figures" / f"{stem}.png"
    fig.savefig(paths["figure"], dpi=80)
    plt.close(fig)
    return paths


def _write_dicts(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def report(out: Path) -> str:
    """Markdown tables of every ``results/paper_*`` CSV under ``out``: iterations and bits to
    1e-8 and 1e-10 per method, the claim check per baseline and convention, wall-clock."""
    lines = []
    for summary in sorted((out / "results").glob("paper_*_summary.csv")):
        stem = summary.name[: -len("_summary.csv")]
        dataset, lam = stem.split("_")[1], stem.split("_lam")[1]
        lines += [f"### {dataset}, λ = {lam}", ""]
        lines += [
            "| method | iters 1e-8 | realistic bits 1e-8 | paper bits 1e-8 | iters 1e-10 "
            "| realistic bits 1e-10 | paper bits 1e-10 | stopped (iterations run) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in _read_dicts(summary):
            cells = [r["method"]]
            for t in ("1e-08", "1e-10"):
                if r[f"iters_{t}"] == "":
                    cells += [
                        "not reached",
                        f"> {r['bits_realistic_spent']}",
                        f"> {r['bits_paper_spent']}",
                    ]
                else:
                    cells += [r[f"iters_{t}"], r[f"bits_realistic_{t}"], r[f"bits_paper_{t}"]]
            cells.append(f"{r['stopped']} ({r['iterations_run']})")
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Claim (NL reaches 1e-10 with fewer bits): factor = baseline bits / NL "
            "bits; `>` when the baseline stopped unconverged (a lower bound).",
            "",
            "| baseline | NL1 realistic | NL1 paper | NL2 realistic | NL2 paper |",
            "|---|---|---|---|---|",
        ]
        claims = _read_dicts(summary.with_name(f"{stem}_claims.csv"))
        for base in dict.fromkeys(r["baseline"] for r in claims):
            cells = [base]
            for nl in NL_METHODS:
                for a in ACCOUNTINGS:
                    r = next(
                        c
                        for c in claims
                        if (c["baseline"], c["nl"], c["accounting"]) == (base, nl, a)
                    )
                    verdict = r["verdict"].split()[0]
                    bound = ">" if "not reached" in r["verdict"] else "×"
                    cells.append(
                        f"{verdict} {bound}{r['factor']}" if verdict != "undecided" else "undecided"
                    )
            lines.append("| " + " | ".join(cells) + " |")
        wall = summary.with_name(f"{stem}_wallclock.csv")
        if wall.exists():
            lines += [
                "",
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
        default="both",
        choices=["both", *ACCOUNTINGS],
        help="bit convention(s) of the plots and the claim check",
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
        help="only print Markdown tables of the CSVs already under --out",
    )
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.out))
        return {}
    if args.lam <= 0:
        parser.error("--lam must be > 0 (NL1 needs λ > 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    accountings = ACCOUNTINGS if args.accounting == "both" else (args.accounting,)
    runs, p_star = run_dataset(
        args.dataset,
        args.lam,
        max_iter_second_order=args.max_iter_second_order,
        max_iter_first_order=args.max_iter_first_order,
        max_iter_nl=args.max_iter_nl,
        budget=args.budget,
        seed=args.seed,
        methods=args.methods,
        progress=not args.no_progress,
    )
    wall = wallclock(args.dataset, args.lam, seed=args.seed) if args.wallclock else None
    paths = write_outputs(args.dataset, args.lam, runs, p_star, args.out, accountings, wall)
    print(f"P* = {p_star:.15g}")
    for name, run in runs.items():
        ks = {t: run.first(t) for t in TARGETS}
        print(
            f"{name:14s} "
            + "  ".join(
                f"{t:g}: "
                + (
                    "not reached"
                    if k is None
                    else f"k={k} " + " ".join(f"{a}={run.bits[a][k]:.3g}" for a in accountings)
                )
                for t, k in ks.items()
            )
            + f"  [{run.stopped}, {len(run.gap) - 1} it]"
        )
    for row in check_claims(runs, accountings):
        print(
            f"{row['nl']} vs {row['baseline']:14s} [{row['accounting']}]: {row['verdict']}"
            + (f" ×{row['factor']:.3g}" if row["verdict"] in ("holds", "fails") else "")
        )
    for row in wall or []:
        print(f"wall-clock to 1e-8: {row['method']}: {row['seconds']:.3f} s ({row['setting']})")
    for p in paths.values():
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
