"""NewtonLearn over ``torch.distributed`` (SPEC §4.4): 3 gloo processes on loopback follow the
simulated run on the union of their shards to 1e-10 (float64), for NL1, NL2 (server on rank 2)
and CNL (server on rank 1); a shape mismatch between ranks and a rank that dies end every
process with a clear error within the process group's timeout — no hang.

Workers (``tests/_newton_learn_worker.py``) rendezvous through a FileStore in a temporary folder
and are killed at a deadline. Each rank holds 2 nodes of 20 rows (6 nodes in all).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _newton_learn_worker import LOCAL_NODES, RUNS, TIMEOUT_S, make_problem, run

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)

WORLD = 3
WORKER = Path(__file__).with_name("_newton_learn_worker.py")
DEADLINE_S = 120.0  # wall-clock limit of one launch (startup of 3 interpreters included)


def launch(folder: Path, scenario: str) -> list[dict]:
    """Run ``scenario`` on WORLD ranks; each rank's saved outcome (or a note that it has none)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    names = [n for _, n in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    if "lo" in names:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    outs = [folder / f"rank{r}.pt" for r in range(WORLD)]
    logs = [folder / f"rank{r}.log" for r in range(WORLD)]
    store = folder / "store"
    procs = []
    start = time.monotonic()
    try:
        for r in range(WORLD):
            with open(logs[r], "w") as log:
                cmd = [sys.executable, str(WORKER), str(r), str(WORLD), str(store), str(outs[r])]
                procs.append(
                    subprocess.Popen(
                        [*cmd, scenario],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=WORKER.parent,
                        env=env,
                    )
                )
        for p in procs:
            p.wait(timeout=max(0.1, start + DEADLINE_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: workers still running after {DEADLINE_S:.0f} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [
        torch.load(o, weights_only=False)
        if o.exists()
        else {"ok": False, "error": "no outcome. Log:\n" + log.read_text(), "type": None}
        for o, log in zip(outs, logs)
    ]


@pytest.fixture(scope="module")
def same_iterates(tmp_path_factory):
    got = launch(tmp_path_factory.mktemp("nl_same"), "same_iterates")
    for r, o in enumerate(got):
        assert o["ok"], f"rank {r}: {o['error']}"
    return [o["result"] for o in got]


@pytest.mark.parametrize("name", list(RUNS))
def test_distributed_iterates_equal_simulated(same_iterates, name):
    kw, start = RUNS[name]
    A, b = make_problem(WORLD)
    kw = {k: v for k, v in kw.items() if k != "server_rank"}
    torch.manual_seed(same_iterates[0][name + "_seed"])  # the server's seed: its generator wins
    ref_traj, ref_loss, ref_bits = run(A, b, kw, start, num_nodes=WORLD * LOCAL_NODES)
    assert (ref_traj[-1] - ref_traj[0]).norm() > 1e-3  # the runs go somewhere
    for r, res in enumerate(same_iterates):
        traj, loss, bits = res[name]
        err = float((traj - ref_traj).abs().max())
        assert err <= 1e-10, f"rank {r} {name}: max |x_dist − x_sim| = {err:.3e}"
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
        assert bits == pytest.approx(ref_bits, rel=1e-14)
    # the ranks' copies of x are identical (x is broadcast from the server)
    assert all(torch.equal(res[name][0], same_iterates[0][name][0]) for res in same_iterates)


def test_shape_mismatch_fails_on_every_rank(tmp_path):
    got = launch(tmp_path, "shape_mismatch")
    for r, o in enumerate(got):
        assert not o["ok"], f"rank {r} accepted mismatched shards"
        assert o["type"] == "ProtocolError", o["error"]
        assert "rows_per_node" in o["error"] and "[20, 21, 20]" in o["error"], o["error"]
        assert o["seconds"] < TIMEOUT_S


def test_dead_rank_ends_every_process_with_a_clear_error(tmp_path):
    begin = time.monotonic()
    got = launch(tmp_path, "dead_rank")
    assert not got[2]["ok"] and "no outcome" in got[2]["error"]  # it died without a word
    for r in (0, 1):
        assert not got[r]["ok"], f"rank {r} finished although rank 2 died"
        assert got[r]["type"] == "ProtocolError", got[r]["error"]
        assert "peer process died" in got[r]["error"]
        assert got[r]["seconds"] < TIMEOUT_S + 15  # startup plus at most one timeout
    assert time.monotonic() - begin < DEADLINE_S
