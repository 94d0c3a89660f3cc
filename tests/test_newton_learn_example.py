"""``examples/newton_learn_distributed.py`` at reduced size (a9a, 8 nodes of 100 rows): in one
process with simulated nodes, and under ``torch.distributed.run`` (torchrun) with 2 gloo
processes — the per-iteration optimality gaps of both runs agree."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "newton_learn_distributed.py"
ARGS = ["--dataset", "a9a", "--nodes", "8", "--rows-per-node", "100", "--variants", "nl1,nl2"]


def _needs_a9a():
    from torch_rankone.data import find_libsvm

    if find_libsvm("a9a") is None:
        pytest.skip("a9a not available (../shared/data/libsvm)")


def _gaps(folder: Path, variant: str) -> list[float]:
    with open(folder / f"newton_learn_a9a_{variant}.csv") as f:
        return [float(row["P_minus_Pstar"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    _needs_a9a()
    spec = importlib.util.spec_from_file_location("newton_learn_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("simulated")
    return module.main([*ARGS, "--out", str(out)]), out


def test_example_simulated_reaches_tolerance(simulated):
    results, out = simulated
    assert [r["variant"] for r in results] == ["nl1", "nl2"]
    for r in results:
        assert r["gap"] <= 1e-10, r
        assert r["bits"] > 0 and r["iterations"] > 10
        assert len(_gaps(out, r["variant"])) == r["iterations"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_example_under_torchrun_matches_simulated(simulated, tmp_path):
    _, sim_out = simulated
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(EXAMPLE), *ARGS, "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    for variant in ("nl1", "nl2"):
        dist_gaps, sim_gaps = _gaps(tmp_path, variant), _gaps(sim_out, variant)
        assert len(dist_gaps) == len(sim_gaps)
        assert max(abs(a - b) for a, b in zip(dist_gaps, sim_gaps)) <= 1e-12
