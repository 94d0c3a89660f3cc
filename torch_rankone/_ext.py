"""The one place kernels are dispatched from: compiled ``torch_rankone._C`` ops or references.

Every kernel has a pure-PyTorch reference here with the same semantics. Callers
(``linalg``, the optimizers, NewtonLearn) use only the functions of this module, so whether the
compiled extension is in use is decided here and nowhere else.

Low-rank solve. For ``k`` vectors ``U = [u_1..u_k]`` (each a list of
parameter-shaped tensors), a ``k×k`` matrix ``C`` and a scalar ``c``,

    y = (c·I + U C Uᵀ)⁻¹ g = (g − U a) / c,   a = (c·I_k + C G)⁻¹ C b,
    G = UᵀU,  b = Uᵀg.

This is Woodbury's identity with ``(C⁻¹ + G/c)⁻¹ = c (c·I + C G)⁻¹ C``, which needs no inverse of
``C``; by Sylvester's determinant identity ``c·I_k + C G`` is singular exactly when the ``N×N``
operator is. The ``k×k`` algebra is done in float64 whatever the input dtype. A singular or
non-finite ``k×k`` system gives ``a = NaN`` (never garbage finite numbers), so ``y`` is non-finite;
the in-place update then leaves the parameters untouched and reports it (on device, no sync).

Gathered outer products: ``H += Σ_t coef_t · A[idx_t] A[idx_t]ᵀ``.

Compiled ops (``csrc/``, registered as ``torch.ops.torch_rankone.*``): ``lowrank_solve``,
``lowrank_solve_update`` (both passes fused: one reduction pass over all tensors for ``G`` and
``b``, the ``k×k`` solve, one update pass) and ``gathered_outer_accumulate``. They are used for
float32/float64 tensors on one CPU or CUDA device, ``1 ≤ k ≤ 8``, when no input needs a gradient
(under grad mode); everything else goes to the references. ``TORCH_RANKONE_DISABLE_EXT=1``
forces the references.

CUDA graphs: the compiled lowrank ops pass a per-call table of tensor pointers from pinned host
memory, which a graph replay would read stale, so they refuse to run under stream capture
(``RuntimeError``; the references, with ``TORCH_RANKONE_DISABLE_EXT=1``, have no such table).
``gathered_outer_accumulate`` passes its pointers as kernel arguments and may be captured.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from itertools import chain

import torch
from torch import Tensor

from ._tensorlist import TensorList, combine, dot, gram

__all__ = [
    "has_extension",
    "lowrank_gram",
    "lowrank_coefficients",
    "lowrank_solve",
    "lowrank_solve_gram",
    "lowrank_solve_update",
    "gathered_outer_accumulate",
]

MAX_RANK = 8  # largest k the compiled lowrank ops take (csrc/common.h: kMaxRank)
_OP_DTYPES = (torch.float32, torch.float64)


def _load_extension():
    """Import ``torch_rankone._C`` (registering the ops), or warn once and return ``None``."""
    if os.environ.get("TORCH_RANKONE_DISABLE_EXT") == "1":
        return None
    try:
        from . import _C
    except ImportError as exc:
        warnings.warn(
            f"torch_rankone: the compiled kernels (torch_rankone._C) could not be loaded ({exc}); "
            "using the slower pure-PyTorch references. Build them against the installed torch "
            "with `pip install --no-build-isolation -e .` (needs a C++ compiler; nvcc for CUDA), "
            "or set TORCH_RANKONE_DISABLE_EXT=1 to use the references without this warning.",
            UserWarning,
            stacklevel=2,
        )
        return None
    return _C


_C = _load_extension()

if _C is not None:
    # Shapes for tracing (torch.compile, FakeTensor): the ops have no other outputs.
    @torch.library.register_fake("torch_rankone::lowrank_solve")
    def _(g, U, C, c):
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in g]

    @torch.library.register_fake("torch_rankone::lowrank_solve_gram")
    def _(g, U, C, c):
        k = C.shape[0]
        y = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in g]
        return y, C.new_empty(k * (k + 1) // 2 + k, dtype=torch.float64, device="cpu")

    @torch.library.register_fake("torch_rankone::lowrank_solve_update")
    def _(params, g, U, C, c, lr):
        device = params[0].device if params else torch.device("cpu")
        return torch.empty((), dtype=torch.bool, device=device)

    @torch.library.register_fake("torch_rankone::gathered_outer_accumulate")
    def _(H, A, idx, coef):
        return None


def has_extension() -> bool:
    """Whether the compiled ``torch_rankone._C`` kernels are in use (else the references)."""
    return _C is not None


def _use_op(tensors: Iterable[Tensor]) -> bool:
    """The compiled ops apply: one float32/float64 dtype, one device they were built for, and no
    input that autograd would track (the ops refuse those, not being differentiable)."""
    if _C is None:
        return False
    keys = {(t.dtype, t.device, t.requires_grad) for t in tensors}
    if not keys or len({key[:2] for key in keys}) != 1:
        return False
    dtype, device, _ = next(iter(keys))
    if torch.is_grad_enabled() and any(key[2] for key in keys):
        return False
    built_for = device.type == "cpu" or (device.type == "cuda" and bool(_C.with_cuda))
    return dtype in _OP_DTYPES and built_for


def _check_not_capturing(device: torch.device, op: str) -> None:
    """Refuse a compiled lowrank op on a CUDA stream that is being captured into a CUDA graph.

    The op copies a table of tensor pointers from pinned host memory on every call; a graph would
    record that copy from a buffer the host allocator reuses, and replay stale pointers. The C++
    op checks too; this raises before any argument is converted.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"torch_rankone.{op}: the compiled CUDA op cannot be captured in a CUDA graph (it "
            "passes a per-call table of tensor pointers from pinned host memory, which a replay "
            "would read stale); call it outside the capture, or set TORCH_RANKONE_DISABLE_EXT=1 "
            "to use the pure-PyTorch references"
        )


def _tensor_on(x, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` (a number, a sequence or a tensor) as a ``dtype`` tensor on ``device``, without a
    blocking copy: ``torch.as_tensor(0.5, device="cuda")`` copies from the host and waits for the
    GPU (a host synchronisation). A number is written by a fill on the device; host data is
    copied with ``non_blocking=True``, which returns once pageable memory is staged (safe), except
    from pinned memory, which the caller could change before the copy ran."""
    if isinstance(x, (bool, int, float)):
        return torch.full((), x, dtype=dtype, device=device)
    x = x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=dtype)
    if x.device.type != "cpu" or torch.device(device).type == "cpu":
        return x.to(device=device, dtype=dtype)
    return x.to(device=device, dtype=dtype, non_blocking=not x.is_pinned())


def _scalar(x: float | Tensor) -> Tensor:
    """``c`` or ``lr`` as the 0-d tensor the ops take. A tensor is passed as it is: on the CPU the
    op reads it on the host, on the device the kernels read it (no host synchronisation)."""
    return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64, device="cpu")


# --------------------------------------------------------------------------------------------
# Low-rank solve
# --------------------------------------------------------------------------------------------


def lowrank_gram(g: Sequence[Tensor], U: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
    """``(G, b) = (UᵀU, Uᵀg)`` accumulated in float64 (pass 1 of the fused kernel).

    The products are formed in the inputs' dtype (the kernel widens them first, for free in
    registers; here that would cost converted copies on the optimizers' fallback path). Their
    rounding only matters where Woodbury itself is unstable, ``N ≤ k``, which
    ``linalg.lowrank_solve`` solves densely instead.
    """
    if not len(g):  # no tensors at all: empty sums (the solve still decides ``applied``)
        k = len(U)
        return torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    G = gram(U, dtype=torch.float64)
    b = torch.stack([dot(u, g, dtype=torch.float64) for u in U])
    return G, b


def lowrank_coefficients(G: Tensor, b: Tensor, C: Tensor, c: float | Tensor) -> Tensor:
    """``a = (c·I + C G)⁻¹ C b`` in float64 (the ``k×k`` step between the two passes).

    NaN everywhere when the system is singular or any input is non-finite; no host sync.
    """
    C64 = _tensor_on(C, torch.float64, G.device)
    c64 = _tensor_on(c, torch.float64, G.device)
    M = c64 * torch.eye(G.shape[0], dtype=torch.float64, device=G.device) + C64 @ G
    rhs = C64 @ b
    a, info = torch.linalg.solve_ex(M, rhs)
    ok = (info == 0) & torch.isfinite(M).all() & torch.isfinite(rhs).all() & torch.isfinite(a).all()
    return torch.where(ok, a, torch.nan)


def _apply(g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], a: Tensor, c) -> TensorList:
    """``y = (g − U a) / c`` (pass 2)."""
    y = torch._foreach_sub(list(g), combine(a, U))
    # dtype given up front: as_tensor(0.7) alone would round c to float32 first
    return torch._foreach_div(y, _tensor_on(c, g[0].dtype, g[0].device))


def lowrank_solve_reference(
    g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], C: Tensor, c: float | Tensor
) -> TensorList:
    """Unfused PyTorch ``y = (c·I + U C Uᵀ)⁻¹ g``: Gram, ``k×k`` solve, combination."""
    G, b = lowrank_gram(g, U)
    return _apply(g, U, lowrank_coefficients(G, b, C, c), c)


def lowrank_solve_update_reference(
    params: Sequence[Tensor],
    g: Sequence[Tensor],
    U: Sequence[Sequence[Tensor]],
    C: Tensor,
    c: float | Tensor,
    lr: float | Tensor,
) -> Tensor:
    """Unfused PyTorch ``p ← p − lr · (c·I + U C Uᵀ)⁻¹ g`` where the solve succeeded.

    Returns ``applied``: a 0-d bool tensor, False (and ``params`` untouched) when the ``k×k``
    system failed or ``lr/c`` is not finite. ``torch.where``, not a multiplication by 0, which
    would let NaN through.
    """
    G, b = lowrank_gram(g, U)
    a = lowrank_coefficients(G, b, C, c)
    device = params[0].device if params else a.device
    scale = _tensor_on(lr, torch.float64, device) / _tensor_on(c, torch.float64, device)
    applied = torch.isfinite(a).all().to(device) & torch.isfinite(scale)
    if params:
        y = _apply(g, U, a, c)
        lr_t = _tensor_on(lr, params[0].dtype, device)
        for p, yp in zip(params, y):
            p.sub_(torch.where(applied, yp * lr_t, 0.0))
    return applied


def _lowrank_op_args(
    g: Sequence[Tensor],
    U: Sequence[Sequence[Tensor]],
    C: Tensor,
    c: float | Tensor,
    params: Sequence[Tensor] = (),
) -> tuple[list[Tensor], list[Tensor], Tensor, float | Tensor] | None:
    """The compiled low-rank ops' ``(g, U flattened rank-major, C in float64, c)``, or ``None``
    when they do not apply to these tensors (and ``params``, for the fused update): extension
    missing, unsupported or mixed dtypes/devices, or a rank outside ``1..MAX_RANK``."""
    if not (_use_op(chain(params, g, *U)) and 1 <= len(U) <= MAX_RANK):
        return None
    # C stays where it is (a default-device context would move it: as_tensor is a factory)
    C = (C if isinstance(C, Tensor) else torch.as_tensor(C, device="cpu")).to(torch.float64)
    return list(g), [t for u in U for t in u], C, _scalar(c)


def lowrank_solve(
    g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], C: Tensor, c: float | Tensor
) -> TensorList:
    """``y = (c·I + U C Uᵀ)⁻¹ g`` without checks or host synchronisation.

    The compiled op when it applies (see the module docstring), else the reference.
    """
    args = _lowrank_op_args(g, U, C, c)
    if args is not None:
        _check_not_capturing(g[0].device, "lowrank_solve")
        return list(torch.ops.torch_rankone.lowrank_solve(*args))
    return lowrank_solve_reference(g, U, C, c)


def lowrank_solve_gram(
    g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], C: Tensor, c: float | Tensor
) -> tuple[TensorList, Tensor, Tensor]:
    """``(y, G, b)``: the solve of :func:`lowrank_solve` and the ``G = UᵀU``, ``b = Uᵀg`` (float64)
    it was computed from — one pass over the data with the compiled CPU op (its pass 1 sums), so a
    caller can inspect the ``k×k`` system after solving; the reference computes them apart."""
    args = _lowrank_op_args(g, U, C, c)
    if args is not None and g[0].device.type == "cpu":
        y, sums = torch.ops.torch_rankone.lowrank_solve_gram(*args)
        rows, cols = torch.tril_indices(len(U), len(U))
        G = sums.new_zeros(len(U), len(U))
        G[rows, cols] = sums[: rows.numel()]
        G[cols, rows] = sums[: rows.numel()]
        return list(y), G, sums[rows.numel() :]
    G, b = lowrank_gram(g, U)
    return lowrank_solve(g, U, C, c), G, b


def lowrank_solve_update(
    params: Sequence[Tensor],
    g: Sequence[Tensor],
    U: Sequence[Sequence[Tensor]],
    C: Tensor,
    c: float | Tensor,
    lr: float | Tensor,
) -> Tensor:
    """In place: ``p ← p − lr · (c·I + U C Uᵀ)⁻¹ g``, fused when the compiled op applies.

    The update happens only where it is finite: when the ``k×k`` system is singular, an input is
    non-finite or ``lr/c`` is not finite (pass ``lr = NaN`` to veto a step), ``params`` stay as
    they were. Returns that outcome as a 0-d bool tensor on the parameters' device, no sync.
    """
    args = _lowrank_op_args(g, U, C, c, params)
    if args is not None:
        _check_not_capturing(g[0].device, "lowrank_solve_update")
        return torch.ops.torch_rankone.lowrank_solve_update(list(params), *args, _scalar(lr))
    return lowrank_solve_update_reference(params, g, U, C, c, lr)


# --------------------------------------------------------------------------------------------
# Gathered outer products
# --------------------------------------------------------------------------------------------


def gathered_outer_accumulate_reference(H: Tensor, A: Tensor, idx: Tensor, coef: Tensor) -> Tensor:
    """``H += (A[idx]ᵀ · coef) A[idx]`` with ``index_select`` and ``addmm_``."""
    rows = A.index_select(0, idx)
    return H.addmm_(rows.T * coef, rows)


def _check_index_range(idx: Tensor, rows: int) -> None:
    """``IndexError`` unless every index lies in ``[0, rows)`` (the CPU op's check and message).

    Free for indices on the host; for indices on a GPU it reads two numbers back (a host sync).
    """
    if idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= rows:
        raise IndexError(
            f"torch_rankone.gathered_outer_accumulate: idx must lie in [0, {rows}) (the rows of "
            f"A), got values in [{lo}, {hi}]"
        )


def gathered_outer_accumulate(
    H: Tensor,
    A: Tensor,
    idx: Tensor | Sequence[int],
    coef: Tensor | Sequence[float] | float,
    *,
    check_indices: bool | None = None,
) -> Tensor:
    """In place: ``H += Σ_t coef_t · A[idx_t] A[idx_t]ᵀ``; returns ``H``.

    ``H`` is ``d×d``, ``A`` is ``n×d``, ``idx`` holds row indices into ``A`` (repeats add up; an
    empty ``idx`` changes nothing) and ``coef`` one weight per index, or one for all. The compiled
    op never builds ``A[idx]`` and exploits the update's symmetry; it needs a contiguous ``H``.

    An index outside ``[0, n)`` raises ``IndexError`` before anything runs, on every device, when
    the check is free: ``idx`` given as a sequence or a CPU tensor (checked before it is copied to
    ``H``'s device; pass indices that way on hot paths). Indices already on a GPU are checked only
    with ``check_indices=True``, which costs a host synchronisation; unchecked, an index out of
    range trips a device-side assert in the CUDA kernel (the CUDA context is then unusable).
    ``check_indices=False`` skips the check everywhere (the CPU op still checks).
    """
    idx = torch.as_tensor(idx, dtype=torch.long)  # a tensor stays on its device
    if check_indices or (check_indices is None and idx.device.type == "cpu"):
        _check_index_range(idx, A.shape[0])
    idx = _tensor_on(idx, torch.long, H.device)
    coef = _tensor_on(coef, H.dtype, H.device)
    if coef.dim() == 0:
        coef = coef.expand(idx.shape)
    if _use_op((H, A, coef)) and H.is_contiguous():
        torch.ops.torch_rankone.gathered_outer_accumulate(H, A, idx, coef)
        return H
    return gathered_outer_accumulate_reference(H, A, idx, coef)
