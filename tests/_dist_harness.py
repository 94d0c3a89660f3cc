"""Two gloo worker processes on loopback, for the multi-process tests (``test_distributed``,
``test_scaling``): they rendezvous through a TCPStore this process serves on ``127.0.0.1`` (on a
socket bound to an OS-chosen port before they start, so no other process can take the port), run
named scenarios in order and save their outcomes to a temporary folder. Workers are killed at a
deadline, so nothing hangs; a rank's failure is reported with its traceback.

:func:`worker_main` is the workers' side.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORLD = 2
DEADLINE_S = 60.0  # wall-clock limit of one two-process launch


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    loopbacks = [n for n in names if n.startswith("lo")]  # Linux "lo", macOS "lo0"
    return "lo" if "lo" in loopbacks else (loopbacks[0] if loopbacks else None)


def _serve_store(folder: Path):
    """A rendezvous store for the workers: ``(store or None, "tcp:PORT" | "file:PATH")``.

    ``TCPStore(port=0)`` would listen on every interface, so the store adopts a socket already
    bound to ``127.0.0.1`` with a port the OS picked (the store owns the descriptor from then
    on). Where it cannot (``master_listen_fd`` is not supported everywhere), a FileStore.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4 * WORLD)
        port = sock.getsockname()[1]
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=DEADLINE_S),
            master_listen_fd=sock.fileno(),
        )
    except (RuntimeError, TypeError, ValueError, OSError):
        sock.close()
        return None, f"file:{folder / 'rendezvous'}"
    sock.detach()  # the store closes it
    return store, f"tcp:{port}"


class Launch:
    """What one run of the workers left: per rank ``{scenario: outcome}``, exit codes, logs."""

    def __init__(
        self, worker: Path, folder: Path, scenarios, *, collective_timeout_s: float = 30.0
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        store, where = _serve_store(folder)
        env = dict(os.environ, OMP_NUM_THREADS="1", DIST_TEST_TIMEOUT=str(collective_timeout_s))
        lo = _loopback_interface()
        if lo is not None:
            env["GLOO_SOCKET_IFNAME"] = lo  # gloo's own connections stay on loopback too
        outs = [folder / f"rank{r}.pt" for r in range(WORLD)]
        logs = [folder / f"rank{r}.log" for r in range(WORLD)]
        procs: list[subprocess.Popen] = []
        start = time.monotonic()
        self.timed_out = False
        try:
            for r in range(WORLD):
                with open(logs[r], "w") as log:
                    cmd = [sys.executable, str(worker), str(r), str(WORLD), where, str(outs[r])]
                    procs.append(
                        subprocess.Popen(
                            [*cmd, *scenarios],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=worker.parent,
                            env=env,
                        )
                    )
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, start + DEADLINE_S - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.timed_out = True
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            del store
        self.seconds = time.monotonic() - start
        self.returncodes = [p.returncode for p in procs]
        self.logs = [log.read_text() for log in logs]
        self.outcomes = [torch.load(o) if o.exists() else {} for o in outs]

    def stopped_at(self, scenarios: list[str]) -> int:
        """Index of the first scenario that some rank did not complete (``len`` if none)."""
        return min(
            next(
                (i for i, name in enumerate(scenarios) if not got.get(name, {}).get("ok")),
                len(scenarios),
            )
            for got in self.outcomes
        )

    def fatal(self) -> bool:
        """Nothing worth retrying: the deadline hit, or a rank failed before any scenario
        (import, rendezvous, ``init_process_group``)."""
        return self.timed_out or any(not got or "<init>" in got for got in self.outcomes)

    def report(self, scenario: str) -> str:
        lines = [f"scenario {scenario!r} on {WORLD} gloo ranks"]
        if self.timed_out:
            lines[0] += f" (workers killed at the {DEADLINE_S:.0f} s deadline)"
        for r, got in enumerate(self.outcomes):
            if scenario in got:
                what = "ok" if got[scenario]["ok"] else got[scenario]["error"]
            else:
                failed = [f"{name}: {o['error']}" for name, o in got.items() if not o["ok"]]
                what = "not run. " + (failed[0] if failed else "Log:\n" + self.logs[r])
            lines.append(f"--- rank {r} (exit code {self.returncodes[r]}): {what[-4000:]}")
        return "\n".join(lines)


class Ranks:
    """Every scenario's outcome. A rank stops at its first failure (its peer then fails in its
    next collective: collectives after a one-sided failure would be mismatched), so the
    scenarios after a failed one are run again by a fresh pair of workers."""

    def __init__(self, worker: Path, folder: Path, scenarios, **launch_kwargs) -> None:
        self.launch_of: dict[str, Launch] = {}
        todo = list(scenarios)
        for attempt in range(len(scenarios)):
            launch = Launch(worker, folder / f"launch{attempt}", todo, **launch_kwargs)
            stop = launch.stopped_at(todo)
            if stop == len(todo) or launch.fatal():
                self.launch_of.update(dict.fromkeys(todo, launch))
                break
            self.launch_of.update(dict.fromkeys(todo[: stop + 1], launch))
            todo = todo[stop + 1 :]
            if not todo:
                break

    def launch(self, scenario: str) -> Launch:
        return self.launch_of[scenario]

    def results(self, scenario: str) -> list[dict]:
        """Every rank's result, or fail the test saying which rank failed and how."""
        launch = self.launch_of[scenario]
        got = [launch.outcomes[r].get(scenario) for r in range(WORLD)]
        if not all(o is not None and o["ok"] for o in got):
            pytest.fail(launch.report(scenario), pytrace=False)
        return [o["result"] for o in got]


def scenarios_in(namespace: dict) -> dict[str, Callable[[int, int], dict]]:
    """A worker module's ``scenario_*`` functions by name (without the prefix), in order."""
    return {
        name.removeprefix("scenario_"): fn
        for name, fn in namespace.items()
        if name.startswith("scenario_")
    }


def worker_main(argv: list[str], scenarios: dict[str, Callable[[int, int], dict]]) -> int:
    """``argv``: RANK WORLD STORE OUT SCENARIO... — runs the scenarios in order and saves
    ``{scenario: outcome}`` to ``OUT``, an outcome being ``{"ok": True, "result": ...,
    "seconds": ...}`` or ``{"ok": False, "error": traceback}``. A rank stops at its first
    failure (collectives after a one-sided failure would be mismatched; its peer fails in its
    next collective), so the scenarios after it are absent."""
    rank, world, where, out, names = int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5:]
    os.environ["DIST_TEST_FOLDER"] = str(Path(out).parent)  # shared by the ranks (checkpoints)
    timeout = datetime.timedelta(seconds=float(os.environ.get("DIST_TEST_TIMEOUT", 30)))
    outcomes: dict = {}

    def save() -> None:
        torch.save(outcomes, out + ".part")
        os.replace(out + ".part", out)  # the parent never reads a half-written file

    try:
        kind, _, address = where.partition(":")
        if kind == "tcp":
            store = dist.TCPStore("127.0.0.1", int(address), is_master=False, timeout=timeout)
        else:
            store = dist.FileStore(address, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    except BaseException:
        outcomes["<init>"] = {"ok": False, "error": traceback.format_exc()}
        save()
        return 1
    try:
        for name in names:
            start = time.perf_counter()
            try:
                result = scenarios[name](rank, world)
            except BaseException:
                outcomes[name] = {"ok": False, "error": traceback.format_exc()}
                break
            outcomes[name] = {"ok": True, "result": result, "seconds": time.perf_counter() - start}
            save()
    finally:
        save()
        if all(o["ok"] for o in outcomes.values()):
            # leave together: a rank tearing gloo down while its peer still talks to it can
            # make the peer abort at exit
            dist.barrier()
        dist.destroy_process_group()
    return 0 if all(o["ok"] for o in outcomes.values()) else 1
