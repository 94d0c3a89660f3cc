"""The drop-in example (examples/drop_in_adam.py) runs reduced in the suite: every optimizer
trains the digits MLP in the standard loop, and the table is printed."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def drop_in():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("drop_in_adam")


def test_drop_in_quick(drop_in, capsys):
    """2 epochs (22 steps), every optimizer with its defaults: the loss falls well below
    ln 10 ≈ 2.30, accuracy well above chance (0.1), and it is in the table."""
    results = drop_in.main(["--quick"])
    assert [r.optimizer for r in results] == list(drop_in.OPTIMIZERS)
    for r in results:
        assert r.steps == 22 and math.isfinite(r.loss) and r.seconds > 0, r
        assert r.loss < 1.5 and r.accuracy > 0.6, r
    out = capsys.readouterr().out
    assert all(f"| {name}" in out for name in drop_in.OPTIMIZERS)
