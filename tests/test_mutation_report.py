"""The committed mutation-testing report (docs/results/mutation.md, made by
``scripts/mutation.py report``) covers every module of linalg, curvature, optim and distributed at
a score of at least 95 %, and every mutant it excludes as equivalent is listed with a reason."""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "results" / "mutation.md"
EQUIVALENT = ROOT / "docs" / "results" / "mutation_equivalent.csv"
ROW = re.compile(
    r"^\| `(?P<module>torch_rankone/[\w/]+\.py)` \| (?P<mutants>\d+) \| (?P<killed>\d+) "
    r"\| (?P<survived>\d+) \| (?P<equivalent>\d+) \| (?P<unreached>\d+) \| (?P<not_run>\d+) "
    r"\| (?P<score>[\d.]+) % \|$"
)


def _rows() -> dict[str, dict[str, str]]:
    matches = map(ROW.match, REPORT.read_text().splitlines())
    return {m["module"]: m.groupdict() for m in matches if m}


def _modules() -> set[str]:
    package = ROOT / "torch_rankone"
    paths = [package / "linalg.py", package / "curvature.py"]
    paths += [*(package / "optim").glob("*.py"), *(package / "distributed").rglob("*.py")]
    return {str(p.relative_to(ROOT)) for p in paths if p.name != "__init__.py"}


def test_every_module_is_reported_at_95_percent_or_more():
    rows = _rows()
    assert _modules() <= rows.keys(), sorted(_modules() - rows.keys())
    for module in _modules():
        row = rows[module]
        killed, survived = int(row["killed"]), int(row["survived"])
        assert killed + survived + int(row["equivalent"]) + int(row["unreached"]) == int(
            row["mutants"]
        ), row
        assert int(row["not_run"]) == 0 and int(row["unreached"]) == 0, row
        assert float(row["score"]) == round(100 * killed / (killed + survived), 1), row
        assert float(row["score"]) >= 95.0, row


def test_equivalent_mutants_are_listed_once_with_a_reason():
    with open(EQUIVALENT, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [row["mutant"] for row in rows]
    assert len(names) == len(set(names))
    assert all(name.startswith("torch_rankone.") and "__mutmut_" in name for name in names)
    assert all(len(row["reason"].strip()) >= 20 for row in rows), "every exclusion needs a reason"
    total = sum(int(row["equivalent"]) for row in _rows().values())
    assert total == len(rows), "the report's equivalents are exactly the listed ones"
