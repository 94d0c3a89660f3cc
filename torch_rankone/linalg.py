"""Solves with curvature operators that are never formed as ``N×N`` matrices.

* :func:`lowrank_solve` — ``(c·I + U C Uᵀ)⁻¹ g`` by Woodbury (Sherman–Morrison for ``k = 1``).
* :func:`neumann_series` / :func:`neumann_ihvp` — ``(H + λI)⁻¹ v`` by a truncated Neumann series,
  with divergence detection.
* :func:`lissa_ihvp` — the stochastic variant of Agarwal, Bullins & Hazan (LiSSA, 2017).
* :func:`cg_ihvp` — conjugate gradients on ``(H + λI) y = v``.
* :func:`ihvp_inverse_gradient` — exact ``H⁻¹ v`` as the derivative of the gradient's functional
  inverse (H. Lee, "Inverse Hessian-vector multiplication via the functional inverse of the
  gradient", 2019).
* :class:`IncrementalInverse` — dense ``(λI + Σ v vᵀ)⁻¹`` kept by Sherman–Morrison.

Vectors are lists of parameter-shaped tensors (a single tensor is accepted too); an HVP function
maps that structure to itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _ext
from ._tensorlist import (
    TensorList,
    as_tensor_list,
    check_like,
    dot,
    flatten,
    norm,
    numel,
    unflatten,
)
from ._warnings import warn_at_caller
from .curvature import power_iteration

__all__ = [
    "LinAlgError",
    "SingularSystemError",
    "NotPositiveDefiniteError",
    "NeumannDivergenceError",
    "lowrank_solve",
    "lowrank_spectrum",
    "shifted_lowrank_solve",
    "NeumannResult",
    "neumann_series",
    "neumann_ritz_values",
    "neumann_ihvp",
    "lissa_ihvp",
    "cg_ihvp",
    "ihvp_inverse_gradient",
    "IncrementalInverse",
    "shifted",
    "newton_direction",
    "solve_with_factor",
    "cholesky_rank_one_update",
    "cubic_step",
]

Vector = Tensor | Sequence[Tensor]


class LinAlgError(torch.linalg.LinAlgError):
    """Base class of this module's errors (a ``torch.linalg.LinAlgError``)."""


class SingularSystemError(LinAlgError):
    """The operator is singular, or too ill-conditioned for the dtype to give a useful answer."""


class NotPositiveDefiniteError(LinAlgError):
    """A positive-definite operator was required and the one given is not."""


class NeumannDivergenceError(LinAlgError):
    """The Neumann series does not converge: ``H + λI`` is not PD, or ``scale ≤ λ_max(H + λI)``."""


def _vector_and_fn(v: Vector, hvp_fn: Callable) -> tuple[TensorList, Callable, Callable]:
    """Normalise a tensor-or-list vector; return (list, list-hvp, back-to-caller's-structure)."""
    vs, single = as_tensor_list(v)
    if not vs:
        raise ValueError("the vector is empty (no tensors)")
    if single:
        return vs, (lambda x: [hvp_fn(x[0])]), (lambda x: x[0])
    return vs, (lambda x: list(hvp_fn(x))), list


# --------------------------------------------------------------------------------------------
# Woodbury
# --------------------------------------------------------------------------------------------


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def lowrank_spectrum(G: Tensor, C: Tensor, c: float) -> Tensor:
    """Eigenvalues that govern ``(c·I + U C Uᵀ)⁻¹`` by Woodbury, from ``G = UᵀU`` (float64).

    The nonzero eigenvalues of ``U C Uᵀ`` are those of ``S = G^{1/2} C G^{1/2}`` (``k×k``,
    symmetric), so the operator's spectrum is ``{c + μ_i(S)}`` together with ``c`` (for
    ``N > k``). ``c`` is always included: Woodbury divides by it, so its rounding error grows
    like ``max|λ| / |c|`` even when ``N ≤ k`` and ``c`` is no eigenvalue.
    """
    w, Q = torch.linalg.eigh(G)
    R = (Q * w.clamp_min(0).sqrt()) @ Q.T
    spec = c + torch.linalg.eigvalsh(R @ C @ R)
    return torch.cat([spec, spec.new_tensor([c])])


def _check_lowrank_inputs(U, C, g) -> tuple[TensorList, list[TensorList], Tensor]:
    gs, _ = as_tensor_list(g)
    if not gs:
        raise ValueError("lowrank_solve: g is empty")
    if isinstance(U, Tensor):
        raise TypeError("lowrank_solve: U must be a sequence of k vectors (columns), not a tensor")
    Us = [as_tensor_list(u)[0] for u in U]
    k = len(Us)
    if k < 1:
        raise ValueError("lowrank_solve: U must have at least one column")
    for j, u in enumerate(Us):
        check_like(f"lowrank_solve: U[{j}]", u, gs)
    dtypes = {t.dtype for t in gs} | {t.dtype for u in Us for t in u}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise TypeError(f"lowrank_solve: g and U must share one floating dtype, got {dtypes}")
    C = torch.as_tensor(C, dtype=torch.float64)
    if C.shape != (k, k):
        raise ValueError(f"lowrank_solve: C has shape {tuple(C.shape)}, expected ({k}, {k})")
    if not torch.isfinite(C).all():
        raise ValueError("lowrank_solve: C has non-finite entries")
    if not torch.allclose(C, C.T, rtol=1e-12, atol=1e-12 * float(C.abs().max().clamp_min(1))):
        raise ValueError("lowrank_solve: C must be symmetric (the operator is a symmetric matrix)")
    return gs, Us, C


def lowrank_solve(
    c: float | Tensor,
    U: Sequence[Vector],
    C: Tensor | Sequence[Sequence[float]],
    g: Vector,
    *,
    check: bool = True,
    require_pd: bool = False,
    rcond: float | None = None,
) -> Any:
    """Solve ``(c·I + U C Uᵀ) y = g`` by the Woodbury identity, in ``O(k²N + k³)``.

    ``y = (g − U (C⁻¹ + UᵀU/c)⁻¹ Uᵀg / c) / c``, computed as ``y = (g − U a)/c`` with
    ``a = (c·I + C UᵀU)⁻¹ C Uᵀg`` so that a singular ``C`` is allowed. ``k = 1`` is
    Sherman–Morrison. With ``check=True`` and ``N ≤ k`` the (at most 8×8) operator is
    formed and solved directly: Woodbury is unstable when U's columns are dependent.

    Args:
        c: the scalar shift (damping), a float or 0-d tensor.
        U: ``k`` columns, each a vector with the structure of ``g`` (a list of tensors shaped
            like the parameters — no flattening copy is made).
        C: symmetric ``k×k`` matrix.
        g: right-hand side, a tensor or a list of tensors.
        check: analyse the operator's spectrum (a few ``k×k`` eigen-decompositions and one host
            synchronisation) and raise on a singular or ill-conditioned system. With
            ``check=False`` nothing is synchronised: a singular system yields non-finite values,
            which the optimizers mask on device.
        require_pd: raise :class:`NotPositiveDefiniteError` unless the operator is positive
            definite (needs ``check=True``).
        rcond: reciprocal condition number below which the system counts as singular. Default
            ``100·eps(dtype)``, i.e. an expected relative error above about 1 %. The condition
            number used is ``max|λ| / min(|λ|, |c|)`` over the operator's eigenvalues ``λ``: the
            rounding error of Woodbury's ``(g − U a)/c`` grows like ``max|λ| / |c|``.

    Returns:
        ``y`` with the structure of ``g``.

    Raises:
        SingularSystemError, NotPositiveDefiniteError, ValueError/TypeError for malformed input.
    """
    gs, Us, C64 = _check_lowrank_inputs(U, C, g)
    single = isinstance(g, Tensor)
    if require_pd and not check:
        raise ValueError("lowrank_solve: require_pd=True needs check=True")
    if not check:
        y = _ext.lowrank_solve(gs, Us, C64, c)
        return y[0] if single else y
    c_val = float(c)
    if not math.isfinite(c_val):
        raise ValueError(f"lowrank_solve: c must be finite, got {c_val}")
    n, k = numel(gs), len(Us)
    # N > k: solve first, in one pass that also yields G and b (the compiled op's pass-1 sums),
    # then inspect the k×k system; a refused system discards y. N ≤ k is solved densely below.
    y = None
    if n > k:
        y, G, b = _ext.lowrank_solve_gram(gs, Us, C64, c_val)
    else:
        G, b = _ext.lowrank_gram(gs, Us)
    if not (torch.isfinite(G).all() and torch.isfinite(b).all()):
        raise ValueError("lowrank_solve: U or g contains non-finite values")
    spec = lowrank_spectrum(G, C64.to(G.device), c_val)
    rcond = 100 * _eps(gs[0].dtype) if rcond is None else rcond
    smallest, largest = float(spec.abs().min()), float(spec.abs().max())
    if largest == 0 or smallest <= rcond * largest:
        raise SingularSystemError(
            f"lowrank_solve: the operator c·I + U C Uᵀ (N={n}, k={k}, c={c_val:.3g}) is singular "
            f"or too ill-conditioned for {gs[0].dtype}: eigenvalues (with c) range over "
            f"[{float(spec.min()):.3g}, {float(spec.max()):.3g}], |λ|min/|λ|max = "
            f"{smallest / largest if largest else 0.0:.2e} <= rcond = {rcond:.1e}. "
            "Increase the damping c, use float64, or pass a smaller rcond."
        )
    dense = None
    if n <= k:
        # The operator is at most 8×8: form it. Woodbury would be unstable here — U's k columns
        # in N ≤ k dimensions are dependent, so a = (cI + C G)⁻¹ C b can be large and cancel in
        # g − U a — and c need not be an eigenvalue.
        Ud = torch.stack([flatten(u).double() for u in Us], dim=1)
        eye = torch.eye(n, dtype=torch.float64, device=Ud.device)
        dense = c_val * eye + Ud @ C64.to(Ud.device) @ Ud.T
        if require_pd:
            spec = torch.linalg.eigvalsh(dense)
    if require_pd:
        if float(spec.min()) <= 0:
            raise NotPositiveDefiniteError(
                f"lowrank_solve: c·I + U C Uᵀ is not positive definite: its smallest eigenvalue "
                f"is {float(spec.min()):.6g} (c = {c_val:.6g}). Raise c by more than "
                f"{-float(spec.min()):.6g} to make it positive definite."
            )
    if dense is not None:
        y64 = torch.linalg.solve(dense, flatten(gs).double())
        y = unflatten(y64.to(gs[0].dtype), gs)
    return y[0] if single else y


def shifted_lowrank_solve(
    g: Sequence[Tensor], U: Sequence[Sequence[Tensor]], C: Tensor, shift: Sequence[Tensor]
) -> tuple[TensorList, Tensor]:
    """``y = (Λ + U C Uᵀ)⁻¹ g`` for a positive diagonal ``Λ``, without checks or host syncs.

    ``shift[t]`` gives ``Λ`` on tensor ``t``: a 0-d tensor (constant there) or a tensor shaped
    like ``g[t]`` (its diagonal). One shared 0-d shift ``c`` is the plain Woodbury solve
    ``(cI + U C Uᵀ)⁻¹ g`` (the compiled op where it applies); otherwise the system is rescaled,
    ``(I + Λ^{-1/2} U C Uᵀ Λ^{-1/2}) z = Λ^{-1/2} g``, ``y = Λ^{-1/2} z``, which is again a
    shift of 1 plus rank ``k``. Returns ``(y, finite)``: ``finite`` is a 0-d bool tensor, False
    when the ``k×k`` system or its inputs were not finite (``y`` is then non-finite too).
    """
    g = list(g)
    if all(s is shift[0] for s in shift) and shift[0].dim() == 0:
        w, c = None, shift[0]
    else:
        w = torch._foreach_rsqrt(list(shift))
        g, U, c = torch._foreach_mul(g, w), [torch._foreach_mul(list(u), w) for u in U], 1.0
    G, b = _ext.lowrank_gram(g, U)
    a = _ext.lowrank_coefficients(G, b, C, c)
    y = _ext._apply(g, U, a, c)
    finite = torch.isfinite(G).all() & torch.isfinite(b).all() & torch.isfinite(a).all()
    return (y if w is None else torch._foreach_mul(y, w)), finite


# --------------------------------------------------------------------------------------------
# Neumann series, LiSSA, CG
# --------------------------------------------------------------------------------------------


def _on_device(x: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d tensor on ``device``: a number is filled in there (a copy from the host would
    synchronise with a CUDA device)."""
    if isinstance(x, Tensor):
        return x.to(device, dtype)
    return torch.full((), x, dtype=dtype, device=device)


class NeumannResult(NamedTuple):
    """Outcome of :func:`neumann_series`; every field stays on device (no host sync).

    With ``M = I − A`` and ``d_k = M^k v``: ``moments[t] = vᵀ M^t v`` and
    ``a_moments[t] = vᵀ M^t A v`` for ``t = 0..2K−1`` (from ``‖d_k‖²``, ``d_kᵀd_{k+1}``,
    ``d_kᵀA d_k``, ``d_{k+1}ᵀA d_k``). They determine the Rayleigh–Ritz values of ``A`` on the
    Krylov space ``span{d_0..d_{K−1}}`` (see :func:`neumann_ritz_values`).
    """

    solution: Any
    diverged: Tensor  # 0-d bool: a cheap, certain sign of divergence was seen
    moments: Tensor  # (2K,) float64
    a_moments: Tensor  # (2K,) float64

    @property
    def rayleigh_quotients(self) -> Tensor:
        """``d_kᵀA d_k / d_kᵀd_k`` for ``k = 0..K−1`` (0 where an increment vanished)."""
        return _rayleigh_quotients(self.moments, self.a_moments)


def _rayleigh_quotients(moments: Tensor, a_moments: Tensor) -> Tensor:
    return a_moments[0::2] / moments[0::2].clamp_min(torch.finfo(moments.dtype).tiny)


def neumann_series(
    hvp_fn: Callable,
    v: Vector,
    num_terms: int,
    scale: float | Tensor,
    damping: float | Tensor = 0.0,
    *,
    max_quotient: float = 1.0,
) -> NeumannResult:
    """Truncated Neumann series for ``(H + λI)⁻¹ v`` with on-device divergence flags.

    With ``A = (H + λI)/s``: ``p₀ = v``, ``p_k = v + (I − A) p_{k−1}``, ``y = p_K / s``, i.e.
    ``y = (1/s) Σ_{j=0..K} (I − A)^j v`` — exactly ``K = num_terms`` HVPs.

    It is evaluated in the equivalent increment form ``d_k = (I − A) d_{k−1}``,
    ``p_k = p_{k−1} + d_k``, which exposes ``A d`` at every step. The ``d_k`` are power iterates
    of ``I − A``: they concentrate on the directions where the series fails. ``diverged`` is set
    (on device) when a Rayleigh quotient ``dᵀAd/dᵀd`` is ``≤ 0`` (``H + λI`` not positive
    definite) or ``> max_quotient`` (default 1: ``s < λ_max(H + λI)``; the series itself
    converges while every eigenvalue of ``A`` is below 2, so ``max_quotient ≤ 2`` tolerates a
    slightly small ``s``), an increment grows, or a value is non-finite.
    :func:`neumann_ihvp` adds the Ritz-value test, which also sees a too-small ``s`` that the
    iterates alone would miss.
    """
    if num_terms < 0 or int(num_terms) != num_terms:
        raise ValueError(f"neumann_series: num_terms must be an integer >= 0, got {num_terms}")
    vs, hvp, restore = _vector_and_fn(v, hvp_fn)
    dtype, device = vs[0].dtype, vs[0].device
    s, lam = (_on_device(x, dtype, device) for x in (scale, damping))
    f64 = torch.float64
    p = [t.clone() for t in vs]
    d = list(vs)

    def wide(v: list[Tensor]) -> list[Tensor]:
        # The increments shrink geometrically: float32 products of them underflow (below ~1e-19)
        # long before their Rayleigh quotients stop meaning anything, so moments use float64.
        return [t.to(f64) for t in v]

    d64 = wide(d)
    d_sq = dot(d64, d64)
    moments, a_moments = [], []
    for _ in range(int(num_terms)):
        a_d = torch._foreach_div(torch._foreach_add(hvp(d), torch._foreach_mul(d, lam)), s)
        d_next = torch._foreach_sub(d, a_d)
        torch._foreach_add_(p, d_next)
        next64, a64 = wide(d_next), wide(a_d)
        moments += [d_sq, dot(d64, next64)]
        a_moments += [dot(d64, a64), dot(next64, a64)]
        d, d64, d_sq = d_next, next64, dot(next64, next64)
    torch._foreach_div_(p, s)
    empty = torch.zeros(0, dtype=f64, device=device)
    m = torch.stack(moments) if moments else empty
    am = torch.stack(a_moments) if a_moments else empty
    norms_sq = torch.cat([m[0::2], d_sq.reshape(1)])
    tiny = 16 * _eps(dtype)
    rayleigh = _rayleigh_quotients(m, am)
    live = m[0::2] > 0  # an exactly vanished increment means the series terminated: fine
    diverged = (
        (live & ((rayleigh <= 0) | (rayleigh > max_quotient + tiny))).any()
        | (norms_sq[1:] > norms_sq[:-1] * (1 + tiny)).any()
        | ~torch.isfinite(norms_sq).all()
        | ~torch.isfinite(am).all()
        | ~(torch.isfinite(s) & (s > 0))
    )
    return NeumannResult(restore(p), diverged, m, am)


def neumann_ritz_values(res: NeumannResult, *, rel_tol: float = 1e-10, max_dim: int = 64) -> Tensor:
    """Rayleigh–Ritz values of ``A = (H + λI)/s`` on the Krylov space of a Neumann run.

    The Gram matrix of the increments is the Hankel matrix ``G_ij = vᵀM^{i+j}v`` and
    ``(dᵢᵀ A d_j) = vᵀM^{i+j}Av``, so the generalised eigenproblem ``T c = θ G c`` (Lanczos, done
    from moments) needs no stored vectors. Directions of ``G`` below ``rel_tol`` (relative, after
    diagonal scaling) are dropped — Hankel matrices are ill-conditioned. Ritz values lie inside
    ``[λ_min(A), λ_max(A)]`` and converge to both ends quickly; only the first ``max_dim``
    increments are used.
    """
    m, am = res.moments, res.a_moments
    # Extreme Ritz values converge within a few dozen Krylov dimensions, and later increments
    # are deflated anyway (nearly parallel): cap the Hankel size to keep the eigh cheap.
    K = min(m.shape[0] // 2, max_dim)
    if K == 0:
        return m.new_zeros(0)
    idx = torch.arange(K, device=m.device)
    hank = idx[:, None] + idx[None, :]
    G, T = m[hank], am[hank]
    scale = G.diagonal().clamp_min(torch.finfo(m.dtype).tiny).rsqrt()
    G, T = G * scale[:, None] * scale[None, :], T * scale[:, None] * scale[None, :]
    w, Q = torch.linalg.eigh(G)
    keep = w > rel_tol * w.max()
    W = Q[:, keep] * w[keep].rsqrt()
    return torch.linalg.eigvalsh(W.T @ T @ W)


def _divergence_message(res: NeumannResult, ritz: Tensor, scale: float, damping: float) -> str:
    m, am = res.moments, res.a_moments
    live = m[0::2] > 0  # a vanished increment (0/0) has no Rayleigh quotient
    rayleigh = am[0::2][live] / m[0::2][live]
    if scale <= 0 or not math.isfinite(scale):
        return f"scale must be a positive finite number, got {scale}"
    if not (torch.isfinite(m).all() and torch.isfinite(am).all()):
        return "the HVP produced non-finite values"
    if (rayleigh <= 0).any():
        return (
            f"H + λI (λ = {damping:.3g}) is not positive definite: a Krylov vector has Rayleigh "
            f"quotient {float(rayleigh.min()) * scale:.4g} ≤ 0. Increase the damping."
        )
    if ritz.numel() and float(ritz.max()) > 1 or (rayleigh > 1).any():
        top = max(float(ritz.max()) if ritz.numel() else 0.0, float(rayleigh.max()))
        return (
            f"scale {scale:.4g} is below λ_max(H + λI) ≥ {top * scale:.4g}; pass a larger scale "
            "(or scale=None to estimate it by power iteration)."
        )
    return "the series terms grow: scale ≤ λ_max/2 or H + λI is not positive definite."


def _check_neumann(
    res: NeumannResult, scale: float, damping: float, who: str, *, ritz: bool = True
) -> None:
    """Raise :class:`NeumannDivergenceError` on the cheap flags or a Ritz value above 1.

    The Ritz values carry the rounding of the Krylov vectors (dtype of the solution) amplified
    by the Hankel conditioning, hence the tolerance above 1. They need one fixed operator, so
    stochastic (LiSSA) runs pass ``ritz=False`` and rely on the per-step checks.
    """
    eps = _eps(as_tensor_list(res.solution)[0][0].dtype)
    ritz_tol = max(1e-6, 1e3 * eps)
    # A Gram direction of relative size σ carries a Ritz error of about eps/σ: keep only
    # directions whose error stays ten times below ritz_tol.
    usable = ritz and bool(torch.isfinite(res.moments).all())
    ritz = neumann_ritz_values(res, rel_tol=10 * eps / ritz_tol) if usable else res.moments[:0]
    if bool(res.diverged) or (ritz.numel() and float(ritz.max()) > 1 + ritz_tol):
        raise NeumannDivergenceError(
            f"{who}: the Neumann series diverges: " + _divergence_message(res, ritz, scale, damping)
        )


def neumann_ihvp(
    hvp_fn: Callable,
    v: Vector,
    num_terms: int,
    scale: float | Tensor | None = None,
    damping: float | Tensor = 0.0,
    *,
    scale_margin: float = 1.05,
    power_iters: int = 100,
    rtol: float = 1e-3,
    warn: bool = True,
) -> Any:
    """``y ≈ (H + λI)⁻¹ v`` by the truncated Neumann series, raising on divergence.

    ``y = (1/s) Σ_{j=0..K} (I − (H + λI)/s)^j v`` (see :func:`neumann_series`). The
    series converges for ``H + λI`` positive definite and ``s > λ_max(H + λI)``; the error after
    ``K`` terms is ``(1 − λ_min/s)^{K+1}`` relative, so ill-conditioned problems need many terms
    (compare :func:`cg_ihvp`).

    The truncation error is estimated from the last increment ``d = (I − A)^{K−1} v`` and its
    Rayleigh quotient ``q = dᵀAd/dᵀd`` (``A = (H + λI)/s``): the tail ``Σ_{j≥K} (I − A)^j v``
    is about ``‖d‖ (1 − q)/q`` once ``d`` is dominated by the slowest directions (within a small
    factor of the true error in practice). No extra HVP; a zero ``v`` returns zeros.

    Args:
        hvp_fn: ``x ↦ H x`` on the structure of ``v``.
        v: the right-hand side (tensor or list of tensors).
        num_terms: ``K``, the number of HVPs.
        scale: ``s``; ``None`` estimates ``s = scale_margin · |λ_max(H + λI)|`` by power iteration
            (``power_iters`` more HVPs).
        damping: ``λ``.
        rtol: warn (``RuntimeWarning``) when the estimated relative error of ``y`` exceeds it.
        warn: ``False`` silences that warning (e.g. a deliberately short series).

    Raises:
        NeumannDivergenceError: with the reason (not PD, scale too small, growing terms, NaN).
    """
    vs, hvp, restore = _vector_and_fn(v, hvp_fn)
    if float(norm(vs)) == 0:  # the exact answer; power iteration could not even start from v
        return restore([torch.zeros_like(t) for t in vs])
    lam = float(damping)
    if scale is None:
        # No warning at the iteration budget: λ_max is only underestimated then, and a scale
        # below λ_max is caught by the Ritz test of _check_neumann with its own message.
        top = power_iteration(
            lambda x: torch._foreach_add(hvp(x), torch._foreach_mul(x, lam)),
            vs,
            max_iters=power_iters,
            tol=1e-4,
            init=vs,
            warn=False,
        )
        scale = scale_margin * abs(float(top.eigenvalue))
    res = neumann_series(hvp, vs, num_terms, scale, damping)
    _check_neumann(res, float(scale), lam, "neumann_ihvp")
    if warn and num_terms > 0:
        _warn_if_truncated(res, float(scale), rtol, int(num_terms))
    return restore(res.solution)


def _warn_if_truncated(res: NeumannResult, scale: float, rtol: float, num_terms: int) -> None:
    last_sq = float(res.moments[-2])  # ‖d_{K−1}‖²
    q = float(res.rayleigh_quotients[-1])
    if last_sq == 0 or q >= 1:  # the series terminated exactly
        return
    estimate = math.sqrt(last_sq) * (1 - q) / q / (float(norm(res.solution)) * scale)
    if not estimate > rtol:
        return
    more = math.ceil(math.log(rtol / estimate) / math.log1p(-q))
    warn_at_caller(
        f"neumann_ihvp: the series has not converged after num_terms={num_terms}: estimated "
        f"relative error ≈ {estimate:.2g} > rtol {rtol:.1e}. The error shrinks by a factor "
        f"1 − λ_min/s ≈ {1 - q:.4g} per term, so about {more} more terms are needed: raise "
        f"num_terms, bring scale (s = {scale:.4g}) down towards λ_max(H + λI) (scale=None "
        "estimates it), add damping, or use cg_ihvp."
    )


def lissa_ihvp(
    hvp_fn: Callable,
    v: Vector,
    *,
    depth: int,
    scale: float,
    damping: float = 0.0,
    repeats: int = 1,
) -> Any:
    """LiSSA: ``(H + λI)⁻¹ v`` from stochastic HVPs (Agarwal, Bullins & Hazan, JMLR 2017).

    Each repeat runs the Neumann recursion of :func:`neumann_series` to ``depth`` terms with
    ``hvp_fn`` drawing a fresh mini-batch Hessian ``H_j`` at every call; the repeats are averaged.
    With independent mini-batches the product ``(I − A_j)···(I − A_1)`` is an unbiased estimate of
    ``(I − A)^j``, so each repeat estimates the truncated series without bias (the products are
    accumulated in the increment order, equal in expectation to the paper's recursion). As in
    influence-function practice (Koh & Liang, 2017), ``scale`` must bound the mini-batch
    Hessians' eigenvalues, and damping makes non-convex mini-batches tractable.

    Raises:
        NeumannDivergenceError: when any repeat diverges (mini-batch ``H_j + λI`` not PD along the
            iterates, ``scale`` below a Rayleigh quotient, or growing terms). The Ritz-value test
            of :func:`neumann_ihvp` needs a fixed operator and is not applied here.
    """
    if depth < 1 or repeats < 1:
        raise ValueError(f"lissa_ihvp: depth and repeats must be >= 1, got {depth}, {repeats}")
    vs, hvp, restore = _vector_and_fn(v, hvp_fn)
    total = None
    for r in range(repeats):
        res = neumann_series(hvp, vs, depth, scale, damping)
        _check_neumann(res, float(scale), float(damping), f"lissa_ihvp (repeat {r})", ritz=False)
        if total is None:
            total = res.solution
        else:
            torch._foreach_add_(total, res.solution)
    torch._foreach_div_(total, float(repeats))
    return restore(total)


def cg_ihvp(
    hvp_fn: Callable,
    v: Vector,
    damping: float = 0.0,
    *,
    max_iters: int | None = None,
    rtol: float = 1e-10,
    warn: bool = True,
) -> Any:
    """Conjugate gradients for ``(H + λI) y = v`` (Hestenes & Stiefel, 1952).

    One HVP per iteration; stops when ``‖v − (H + λI) y‖ ≤ rtol·‖v‖``. Each iteration
    synchronises with the host (a solver, not an optimizer hot path).

    Args:
        max_iters: default ``min(N, 1000)`` (CG is exact after ``N`` steps in exact arithmetic).

    Raises:
        NotPositiveDefiniteError: a search direction with ``pᵀ(H + λI)p ≤ 0`` was met.
        FloatingPointError: the HVP returned non-finite values.
    """
    vs, hvp, restore = _vector_and_fn(v, hvp_fn)
    n = numel(vs)
    max_iters = min(n, 1000) if max_iters is None else max_iters
    if max_iters < 1:
        raise ValueError(f"cg_ihvp: max_iters must be >= 1, got {max_iters}")
    lam = float(damping)
    y = [torch.zeros_like(t) for t in vs]
    r = [t.clone() for t in vs]
    p = [t.clone() for t in vs]
    rr = dot(r, r)
    v_norm = float(norm(vs))
    target = rtol * v_norm
    if not math.isfinite(target):
        raise ValueError("cg_ihvp: v contains non-finite values")
    for it in range(max_iters):
        if math.sqrt(float(rr)) <= target:
            return restore(y)
        ap = torch._foreach_add(hvp(p), torch._foreach_mul(p, lam))
        pap = dot(p, ap)
        if not math.isfinite(float(pap)):
            raise FloatingPointError(
                f"cg_ihvp: the HVP returned non-finite values (at iteration {it})"
            )
        if not float(pap) > 0:
            raise NotPositiveDefiniteError(
                f"cg_ihvp: H + λI (λ = {lam:.3g}) is not positive definite: at iteration {it} a "
                f"direction has curvature pᵀ(H + λI)p / pᵀp = {float(pap / dot(p, p)):.4g} ≤ 0. "
                "Increase the damping."
            )
        alpha = rr / pap
        torch._foreach_add_(y, torch._foreach_mul(p, alpha))
        torch._foreach_sub_(r, torch._foreach_mul(ap, alpha))
        rr_new = dot(r, r)
        p = torch._foreach_add(r, torch._foreach_mul(p, rr_new / rr))
        rr = rr_new
    if math.sqrt(float(rr)) > target and warn:
        warn_at_caller(
            f"cg_ihvp: not converged after {max_iters} iterations (relative residual "
            f"{math.sqrt(float(rr)) / v_norm:.2e} > rtol {rtol:.1e}): raise max_iters, "
            f"loosen rtol, or add damping (λ = {lam:.3g}); CG needs many iterations when "
            "H + λI is ill-conditioned or singular."
        )
    return restore(y)


# --------------------------------------------------------------------------------------------
# Exact inverse from the gradient's inverse (Lee, 2019); Sherman–Morrison inverse
# --------------------------------------------------------------------------------------------


def ihvp_inverse_gradient(grad_inverse: Callable, z: Any, v: Any) -> Any:
    """Exact ``H(x)⁻¹ v`` from the functional inverse of the gradient map (H. Lee, 2019).

    If ``grad_inverse(∇f(x)) = x`` near ``x``, the inverse function theorem gives
    ``J_{grad_inverse}(z) = H(x)⁻¹`` at ``z = ∇f(x)``, so ``H⁻¹ v = J_{grad_inverse}(z) v``: one
    forward-mode ``torch.func.jvp``, cost linear in the size of ``grad_inverse``'s computation.
    Choosing the right branch of the inverse (e.g. the signs of square roots) is the caller's job.

    Args:
        grad_inverse: maps a gradient value (tensor or pytree) back to the point ``x``.
        z: ``∇f(x)``.
        v: the direction, with the structure of ``z``.
    """
    _, out = torch.func.jvp(grad_inverse, (z,), (v,))
    return out


class IncrementalInverse:
    """Dense inverse of ``M = λI + Σ_t w_t v_t v_tᵀ`` kept by Sherman–Morrison.

    Each :meth:`update` costs ``O(dim²)``:
    ``(M + w v vᵀ)⁻¹ = M⁻¹ − w (M⁻¹v)(M⁻¹v)ᵀ / (1 + w vᵀM⁻¹v)``. It holds ``dim²`` numbers, so it
    is for small ``dim`` (e.g. a GLM's feature count), not for network parameters.

    Args:
        dim: size of the vectors.
        damping: ``λ > 0`` (the initial matrix ``λI`` must be invertible).
    """

    def __init__(
        self,
        dim: int,
        damping: float,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"IncrementalInverse: dim must be >= 1, got {dim}")
        if not (damping > 0 and math.isfinite(damping)):
            raise ValueError(f"IncrementalInverse: damping must be > 0 and finite, got {damping}")
        self.dim = dim
        self.damping = damping
        self.num_updates = 0
        self._inv = torch.eye(dim, dtype=dtype, device=device) / damping

    @property
    def inverse(self) -> Tensor:
        """The current ``M⁻¹`` (a view: do not modify)."""
        return self._inv

    def update(self, v: Tensor, weight: float = 1.0) -> None:
        """``M ← M + weight · v vᵀ``; a negative weight downdates (must keep ``M`` invertible)."""
        if v.shape != (self.dim,):
            raise ValueError(f"IncrementalInverse.update: v must have shape ({self.dim},)")
        v = v.to(self._inv)
        mv = self._inv @ v
        denom = 1 + weight * torch.dot(v, mv)
        if not float(denom.abs()) > 1e3 * _eps(self._inv.dtype) or not torch.isfinite(denom):
            raise SingularSystemError(
                f"IncrementalInverse.update: 1 + w vᵀM⁻¹v = {float(denom):.3g}; the update makes "
                "M singular"
            )
        self._inv.sub_(torch.outer(mv, mv), alpha=weight / float(denom))
        # Symmetrise: rounding otherwise lets M⁻¹ drift away from symmetry over many updates.
        self._inv.copy_((self._inv + self._inv.T) / 2)
        self.num_updates += 1

    def solve(self, b: Tensor) -> Tensor:
        """``M⁻¹ b`` for a vector or a matrix of column vectors."""
        return self._inv @ b.to(self._inv)


# --------------------------------------------------------------------------------------------
# Dense d×d algebra (NewtonLearn's server, exact Newton)
# --------------------------------------------------------------------------------------------


def shifted(H: Tensor, lam: float) -> Tensor:
    """``H + λI`` as a new matrix."""
    out = H.clone()
    out.diagonal().add_(lam)
    return out


def newton_direction(Hreg: Tensor, g: Tensor) -> Tensor:
    """``Hreg⁻¹ g`` by Cholesky; NaN (never garbage) when ``Hreg`` is not positive definite."""
    L, info = torch.linalg.cholesky_ex(Hreg)
    return solve_with_factor(L, g, info == 0)


def solve_with_factor(L: Tensor, g: Tensor, ok: Tensor | bool = True) -> Tensor:
    """``(L Lᵀ)⁻¹ g`` from a Cholesky factor; NaN where ``ok`` is False."""
    y = torch.cholesky_solve(g[:, None], L).squeeze(1)
    return torch.where(torch.as_tensor(ok, device=y.device), y, torch.nan)


def cholesky_rank_one_update(L: Tensor, z: Tensor, alpha: float | Tensor) -> tuple[Tensor, bool]:
    """The Cholesky factor of ``L Lᵀ + α z zᵀ`` in ``O(d²)`` (update for α > 0, downdate α < 0).

    With ``p = L⁻¹ z``, ``L Lᵀ + α z zᵀ = L (I + α p pᵀ) Lᵀ`` and ``I + α p pᵀ = M D Mᵀ`` with
    ``M`` unit lower triangular, ``M_rj = β_j p_r`` (``r > j``): Gill, Golub, Murray and
    Saunders' method C1 (Math. Comp. 1974) with ``D = I``, whose recurrence
    ``1/α_{j+1} = 1/α_j + p_j²`` is a cumulative sum, ``D_jj = α_j/α_{j+1}``,
    ``β_j = p_j α_{j+1}``. Then ``L' = (L M) D^{1/2}`` and column ``j`` of ``L M`` is
    ``L_j + β_j Σ_{r>j} p_r L_r`` (a reverse cumulative sum): vector operations only.

    Returns ``(L', ok)``; ``ok`` is False when the downdate leaves the positive definite cone
    (or rounding makes it look so) — the caller refactors then.
    """
    p = torch.linalg.solve_triangular(L, z[:, None], upper=False).squeeze(1)
    inv_next = 1.0 / alpha + torch.cumsum(p * p, 0)  # 1/α_{j+1}
    inv = torch.cat([inv_next.new_full((1,), 1.0 / float(alpha)), inv_next[:-1]])  # 1/α_j
    dbar = inv_next / inv
    beta = p / inv_next
    Lp = L * p
    tail = Lp.flip(1).cumsum(1).flip(1) - Lp  # Σ_{r>j} p_r L[:, r]
    out = (L + tail * beta) * dbar.clamp_min(0).sqrt()
    ok = bool((dbar > 0).all()) and bool(torch.isfinite(out).all())
    return out, ok


def cubic_step(
    Hreg: Tensor, g: Tensor, M: float, *, tol: float = 1e-15, max_iter: int = 100
) -> Tensor:
    """The exact minimiser ``s`` of ``⟨g, s⟩ + ½⟨Hreg s, s⟩ + (M/6)‖s‖³`` (Nesterov–Polyak).

    ``s`` is characterised by ``(Hreg + (M r/2) I) s = −g``, ``r = ‖s‖``,
    ``Hreg + (M r/2) I ⪰ 0``. With ``Hreg = Q diag(μ) Qᵀ`` (one eigendecomposition) and
    ``g̃ = Qᵀ g``, ``w(r) = ‖g̃ / (μ + M r/2)‖`` decreases on ``r > r_lo = max(0, −2μ_min/M)``
    and the root of ``w(r) = r`` lies in ``[r_lo, r_hi]``,
    ``r_hi = (−μ_min + sqrt(μ_min² + 2M‖g‖))/M``. It is found by Newton's method on the
    secular equation ``1/w(r) − 1/r = 0`` (nearly linear in ``r``), safeguarded by bisection.
    Hard case (``g`` orthogonal to the bottom eigenvectors and ``w(r_lo) < r_lo``): ``r = r_lo``
    and the missing norm goes along the bottom eigenvector. ``M = 0``: the Newton step
    (``Hreg`` must be positive definite). The 1-D solve runs on the host in float64.
    Non-finite ``Hreg`` or ``g`` (or an eigendecomposition that fails): NaN, as
    :func:`newton_direction` (the caller skips the step).
    """
    if M == 0:
        return -newton_direction(Hreg, g)
    if not bool(torch.isfinite(Hreg).all() & torch.isfinite(g).all()):
        return torch.full_like(g, math.nan)
    try:
        mu, Q = torch.linalg.eigh(Hreg)
    except torch.linalg.LinAlgError:
        return torch.full_like(g, math.nan)
    gt = Q.T @ g
    mu_h, gt_h = mu.double().cpu(), gt.double().cpu()
    mu_min = float(mu_h[0])
    g2 = gt_h * gt_h
    lo = max(0.0, -2.0 * mu_min / M)
    hi = max(lo, (-mu_min + math.sqrt(mu_min**2 + 2 * M * float(g2.sum().sqrt()))) / M)

    shift_lo = mu_h + M * lo / 2
    # eigen-directions whose shifted curvature vanishes at r_lo (only when μ_min ≤ 0)
    keep = shift_lo > 1e-12 * max(1.0, float(mu_h.abs().max()))
    coef = torch.where(keep, -gt_h / torch.where(keep, shift_lo, 1.0), 0.0)
    # gradient along those directions makes w(r) → ∞ as r → r_lo: then the root lies above r_lo
    # (up to the rounding of g̃ in g's dtype: below sqrt(eps)·‖g‖ the hard-case step is as
    # accurate as the iteration, which cannot resolve r − r_lo there)
    flat = float(gt_h[~keep].norm()) <= math.sqrt(_eps(gt.dtype)) * float(gt_h.norm())
    if not bool(keep.all()) and flat and float(coef.norm()) <= lo:
        # hard case: those directions carry no gradient; r = r_lo and the missing norm goes
        # along the bottom eigenvector
        coef[0] = math.sqrt(max(lo * lo - float((coef * coef).sum()), 0.0))
        return Q @ coef.to(Q.dtype).to(Q.device)
    r = hi
    for _ in range(max_iter):
        shift = mu_h + M * r / 2
        wr = float((g2 / shift**2).sum().sqrt())
        if abs(wr - r) <= tol * r or hi - lo <= tol * hi:
            break
        if wr > r:
            lo = r
        else:
            hi = r
        # F(r) = 1/w − 1/r,  F'(r) = (M/2) Σ g̃²/shift³ / w³ + 1/r²
        f = 1.0 / wr - 1.0 / r
        df = (M / 2) * float((g2 / shift**3).sum()) / wr**3 + 1.0 / r**2
        r_new = r - f / df
        r = r_new if lo < r_new < hi else 0.5 * (lo + hi)
    return -(Q @ (gt / (mu + M * r / 2)))
