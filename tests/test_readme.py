"""README's Quick start and .ci/run stay in sync: CI runs the README's test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)  # one line each, self-contained
    demo, tests = commands
    assert "examples/" in demo and "pytest" in tests
    for c in commands:
        assert "pip install torch==" in c and "pip install --no-build-isolation -e" in c


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quick_start_commands()[1] in ci_lines


def test_readme_is_a_short_front_door():
    assert (ROOT / "README.md").stat().st_size <= 10_000


def test_public_text_cites_papers_not_internal_documents():
    """Users have neither the project's SPEC nor its seed documents."""
    public = [
        *(ROOT / "torch_rankone").rglob("*.py"),
        *(ROOT / "docs").rglob("*.md"),
        ROOT / "README.md",
    ]
    pattern = re.compile(r"SPEC|seed 00\d|[Ss]eed's|Seed 00\d")
    hits = [
        f"{p.relative_to(ROOT)}:{m.group()}"
        for p in public
        for m in pattern.finditer(p.read_text())
    ]
    assert not hits, hits


def test_every_optimizer_docstring_has_a_runnable_example():
    """Collected by ``--doctest-modules`` (pytest's addopts) and run with the suite."""
    import torch_rankone

    for name in ("RankOneNewton", "NeumannIHVP", "FisherNewton", "NewtonLearn"):
        assert ">>> " in getattr(torch_rankone, name).__doc__, name
