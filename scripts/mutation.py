"""Opt-in mutation testing with mutmut, one module group at a time (not part of CI).

    python scripts/mutation.py run GROUP [--mutants GLOB ...] [--sample N] [--children N]
    python scripts/mutation.py survivors GROUP      # names of surviving, non-equivalent mutants
    python scripts/mutation.py report [GROUP ...]   # the markdown table of docs/results/mutation.md

``run`` copies the working tree (tracked and untracked, not ignored files, plus the built
extension) to ``/tmp/torch_rankone_mutation/GROUP``, writes that group's mutmut configuration
there and runs ``mutmut run``; a second ``run`` of the same group re-tests only what changed.
Each group runs the test files that target its modules: mutmut then picks, per mutant, the
tests that execute the mutated function. The whole suite per mutant is too slow on 2 cores.

The score is killed / (killed + survived - equivalent), where ``equivalent`` are the
surviving mutants listed with a reason in ``docs/results/mutation_equivalent.csv``: mutants
that no test can kill because they do not change behaviour. Mutants whose function no
selected test executes are counted as "not reached", and timeouts count as killed.
``--sample N`` tests a seeded random sample of N of the group's mutants (the others are
"not run" and left out of the score), for a quick estimate when a full run takes too long.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("TORCH_RANKONE_MUTATION_DIR", "/tmp/torch_rankone_mutation"))
EQUIVALENT = ROOT / "docs" / "results" / "mutation_equivalent.csv"

GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "linalg": (
        ["torch_rankone/linalg.py"],
        [
            "tests/test_linalg.py",
            "tests/test_linalg_properties.py",
            "tests/test_reliability_linalg.py",
            "tests/test_glm_fit.py",
            "tests/test_diag_lowrank.py",
            "tests/test_contracts_linalg.py",
        ],
    ),
    "core": (
        [
            "torch_rankone/curvature.py",
            "torch_rankone/optim/_protocol.py",
            "torch_rankone/optim/_data_parallel.py",
        ],
        [
            "tests/test_curvature.py",
            "tests/test_conformance.py",
            "tests/test_protocol.py",
            "tests/test_fd_consistency.py",
            "tests/test_health.py",
            "tests/test_reliability_optim.py",
            "tests/test_checkpoint.py",
            "tests/test_contracts_core.py",
        ],
    ),
    "optimizers": (
        [
            "torch_rankone/optim/rank_one_newton.py",
            "torch_rankone/optim/neumann_ihvp.py",
            "torch_rankone/optim/fisher_newton.py",
        ],
        [
            "tests/test_rank_one_newton.py",
            "tests/test_neumann_ihvp_optim.py",
            "tests/test_fisher_newton.py",
            "tests/test_conformance.py",
            "tests/test_diag_lowrank.py",
            "tests/test_reliability_optim.py",
            "tests/test_fd_consistency.py",
            "tests/test_checkpoint.py",
            "tests/test_contracts_optimizers.py",
        ],
    ),
    "newton_learn": (
        ["torch_rankone/optim/newton_learn.py", "torch_rankone/distributed/*"],
        [
            "tests/test_newton_learn.py",
            "tests/test_compressors.py",
            "tests/test_baselines.py",
            "tests/test_accounting_conventions.py",
            "tests/test_reliability_newton_learn.py",
            "tests/test_contracts_newton_learn.py",
            "tests/test_contracts_baselines.py",
        ],
    ),
}

KILLED = {1, 3, 36, 24, -24, 152, 255, -6, -11}  # test failures, pytest errors, timeouts, crashes
SURVIVED = {0}


def _copy_tree(dest: Path) -> None:
    """Copy what a clean checkout plus the working tree's edits would hold (and the built .so)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    files += [str(p.relative_to(ROOT)) for p in ROOT.glob("torch_rankone/_C*.so")]
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():
            continue
        target = dest / rel
        if target.exists() and target.read_bytes() == src.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _configure(dest: Path, group: str) -> None:
    only, tests = GROUPS[group]
    tests = [t for t in tests if (dest / t).exists()]
    text = (dest / "pyproject.toml").read_text()
    text = text.split("[tool.mutmut]")[0] + "\n".join(
        [
            "[tool.mutmut]",
            'source_paths = ["torch_rankone"]',
            f"only_mutate = {json.dumps(only)}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "--no-header", '
            '"-o", "addopts=", "-m", "not slow and not cuda"]',
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
            "",
        ]
    )
    (dest / "pyproject.toml").write_text(text)


def _mutmut(dest: Path, children: int, names: list[str]) -> int:
    env = dict(os.environ, CI="true", OMP_NUM_THREADS="1")
    mutmut = Path(sys.executable).with_name("mutmut")
    with open(dest / "mutmut.log", "a") as log:  # mutmut's progress line is not for a terminal log
        return subprocess.call(
            [str(mutmut), "run", "--max-children", str(children), *names],
            cwd=dest,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def run(group: str, mutants: list[str], sample: int, children: int) -> int:
    dest = WORK / group
    dest.mkdir(parents=True, exist_ok=True)
    _copy_tree(dest)
    _configure(dest, group)
    (dest / "mutmut.log").write_text("")
    if sample:
        _mutmut(dest, children, ["torch_rankone.no_such_function"])  # only generates the mutants
        names = sorted(n for codes in _results(group).values() for n in codes)
        mutants = random.Random(0).sample(names, min(sample, len(names)))
    rc = _mutmut(dest, children, mutants)
    print(f"mutmut rc={rc}; log: {dest / 'mutmut.log'}")
    report([group])
    return rc


def _equivalent() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    with open(EQUIVALENT, newline="") as f:
        return {row["mutant"]: row["reason"] for row in csv.DictReader(f)}


def _results(group: str) -> dict[str, dict[str, int | None]]:
    """Module -> {mutant name: exit code} from mutmut's .meta files of one group's run."""
    out: dict[str, dict[str, int | None]] = {}
    for meta in glob.glob(
        str(WORK / group / "mutants" / "torch_rankone" / "**" / "*.meta"), recursive=True
    ):
        module = str(Path(meta).relative_to(WORK / group / "mutants"))[: -len(".meta")]
        codes = json.loads(Path(meta).read_text())["exit_code_by_key"]
        if any(fnmatch.fnmatch(module, p) for p in GROUPS[group][0]):  # as mutmut matches
            out[module] = codes
    return out


def survivors(group: str) -> list[str]:
    equivalent = _equivalent()
    return sorted(
        name
        for codes in _results(group).values()
        for name, code in codes.items()
        if code in SURVIVED and name not in equivalent
    )


def report(groups: list[str]) -> None:
    equivalent = _equivalent()
    print("| module | mutants | killed | survived | equivalent | not reached | not run | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    total: Counter[str] = Counter()
    for group in groups:
        for module, codes in sorted(_results(group).items()):
            c: Counter[str] = Counter()
            for name, code in codes.items():
                if code in KILLED:
                    c["killed"] += 1
                elif code in SURVIVED:
                    c["equivalent" if name in equivalent else "survived"] += 1
                elif code is None:
                    c["not run"] += 1
                else:
                    c["not reached"] += 1
            c["mutants"] = len(codes)
            total.update(c)
            print(_row(f"`{module}`", c))
    print(_row("**all**", total))


def _row(label: str, c: Counter[str]) -> str:
    scored = c["killed"] + c["survived"]
    score = f"{100 * c['killed'] / scored:.1f} %" if scored else "-"
    return (
        f"| {label} | {c['mutants']} | {c['killed']} | {c['survived']} | {c['equivalent']} "
        f"| {c['not reached']} | {c['not run']} | {score} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("group", choices=GROUPS)
    p_run.add_argument("--mutants", nargs="*", default=[], help="mutant names or globs")
    p_run.add_argument("--sample", type=int, default=0, help="test a random sample of N mutants")
    p_run.add_argument("--children", type=int, default=2)
    p_surv = sub.add_parser("survivors")
    p_surv.add_argument("group", choices=GROUPS)
    p_rep = sub.add_parser("report")
    p_rep.add_argument("groups", nargs="*", help=f"default: all of {list(GROUPS)}")
    args = parser.parse_args()
    if args.command == "run":
        return run(args.group, args.mutants, args.sample, args.children)
    if args.command == "survivors":
        print("\n".join(survivors(args.group)))
        return 0
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {list(GROUPS)}")
    report(args.groups or list(GROUPS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
