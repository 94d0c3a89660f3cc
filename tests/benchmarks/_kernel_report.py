"""The low-rank kernel's table, shared by the CPU (test_bench_ext.py) and GPU (test_bench_cuda.py)
benchmark reports: one row per (N, k) with the reference, the compiled op, the speedup and the
bandwidth against a ``copy_`` of as many bytes."""

from __future__ import annotations

from collections.abc import Iterable


def lowrank_table(
    best: dict[tuple, float], sizes: Iterable[int], ranks: Iterable[int], *, ms: int, gbs: int
) -> list[str]:
    """Header and rows for the (N, k) cases timed in ``best`` (``ms``/``gbs``: decimals shown)."""
    lines = [
        "lowrank_solve_update, float32, 4 tensors; traffic (2k+4)·N·4 bytes; copy_ of as many",
        f"{'N':>9s} {'k':>2s} {'reference ms':>12s} {'ext ms':>8s} {'speedup':>8s} "
        f"{'ext GB/s':>9s} {'copy GB/s':>9s} {'% copy':>7s}",
    ]
    for n in sizes:
        for k in ranks:
            keys = [("lowrank", n, k, v) for v in ("reference", "extension", "copy")]
            if not all(key in best for key in keys):
                continue
            ref, ext, cp = (best[key] for key in keys)
            gbytes = (2 * k + 4) * n * 4 / 1e9
            lines.append(
                f"{n:9.0e} {k:2d} {1e3 * ref:12.{ms}f} {1e3 * ext:8.{ms}f} {ref / ext:7.2f}x "
                f"{gbytes / ext:9.{gbs}f} {gbytes / cp:9.{gbs}f} {100 * cp / ext:6.0f}%"
            )
    return lines
