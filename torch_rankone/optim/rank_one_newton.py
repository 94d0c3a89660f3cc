"""RankOneNewton: a Newton-type step from one Hessian-vector product ``h = Hu`` per step.

Default: a diagonal-plus-low-rank preconditioner — the Hutchinson diagonal ``u ⊙ h`` averaged as
AdaHessian does, plus the Nyström approximation ``Y (ΩᵀY)₊⁺ Yᵀ`` of the last sketches — solved by
Woodbury in the diagonally scaled space. ``preconditioner="isotropic"``: the symmetrised
rank-one estimate ``S = (N/2)(h uᵀ + u hᵀ)`` of A. Semenov's "Rank-one approximation of the
Hessian" (2025), ``x ← x − lr·γ (S + cI)⁻¹ ∇f(x)``, a rank-2 Woodbury solve fused with the update
in one kernel (``_ext.lowrank_solve_update``) when all groups share ``lr`` and ``c``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Unpack

from .. import _ext
from .._tensorlist import (
    TensorList,
    dot,
    local,
    norm,
    norm1,
    numel,
    rademacher_like,
    randn_like,
)
from .._validation import check_int, check_number
from ..curvature import power_iteration
from ..linalg import shifted_lowrank_solve
from ._protocol import (
    SecondOrderOptimizer,
    StepOptions,
    all_finite,
    check_update_extras,
    split_groups,
)

__all__ = ["RankOneNewton", "rank_one_newton_direction", "theory_damping"]


def theory_damping(grad_norm: Tensor, n: int, M: float, lam_max: Tensor | float, delta: float):
    """The slides' Lemma: ``α = sqrt(M‖g‖/2) + σ``, ``σ = sqrt(λ_max² N(N−1) + Nδ²)``."""
    lam = torch.as_tensor(lam_max, dtype=grad_norm.dtype, device=grad_norm.device)
    return torch.sqrt(M * grad_norm / 2) + torch.sqrt(lam**2 * n * (n - 1) + n * delta**2)


def _symmetrised_outer_coefficients(n: int, device: torch.device | str = "cpu") -> Tensor:
    """``C`` of ``S = (N/2)(h uᵀ + u hᵀ) = U C Uᵀ`` with ``U = [h, u]`` (made on ``device``: a
    copy from the host would synchronise)."""
    return torch.full((2, 2), n / 2, dtype=torch.float64, device=device).fill_diagonal_(0.0)


def rank_one_newton_direction(
    g: TensorList, h: TensorList, u: TensorList, c: list[Tensor], n: int | None = None
) -> tuple[TensorList, Tensor]:
    """``y = (S + Λ)⁻¹ g`` with ``S = (N/2)(h uᵀ + u hᵀ)`` and ``Λ`` diagonal, constant per tensor
    (``c[t]`` on tensor ``t``): a rank-2 Woodbury solve. ``n``: ``N`` when the vectors are
    shards (default: their size). Returns ``(y, coefficients_finite)``."""
    n = numel(g) if n is None else n
    C = _symmetrised_outer_coefficients(n, g[0].device)
    return shifted_lowrank_solve(g, [h, u], C, c)


def nystrom_core(omega: list[TensorList], y: list[TensorList], rcond: float = 1e-6) -> Tensor:
    """``C = (ΩᵀY)₊⁺`` for the Nyström approximation ``Y C Yᵀ ≈ H`` from sketches ``Y = HΩ``.

    ``ΩᵀY`` is symmetrised and only its eigenvalues above ``rcond·max|θ|`` are inverted (the
    others, negative curvature included, are dropped), so ``Y C Yᵀ`` is positive semi-definite
    and equals ``H`` on the sketched directions where ``H`` is positive definite (Frangella,
    Tropp & Udell, "Randomized Nyström preconditioning", 2023). ``k×k``, float64, on device.
    """
    k = len(omega)
    if k == 1:  # one sketch: 1/θ for θ = ωᵀy > 0, else 0, without eigh (which syncs on CUDA)
        theta = dot(omega[0], y[0], dtype=torch.float64).reshape(1, 1)
        return torch.where(theta > 0, 1 / torch.where(theta > 0, theta, 1.0), 0.0)
    W = torch.stack(
        [
            torch.stack([dot(omega[i], y[j], dtype=torch.float64) for j in range(k)])
            for i in range(k)
        ]
    )
    theta, Q = torch.linalg.eigh((W + W.T) / 2)  # k ≥ 2: a host sync on CUDA (documented)
    keep = theta > rcond * theta.abs().max()
    inv = torch.where(keep, 1 / torch.where(keep, theta, 1.0), 0.0)
    return (Q * inv) @ Q.T


PRECONDITIONERS = ("diag+lowrank", "isotropic")
_DEFAULT_DAMPING = {"diag+lowrank": 1e-8, "isotropic": 4.0}  # relative mode


class RankOneNewton(SecondOrderOptimizer):
    r"""Newton-type optimizer from one Hessian-vector product per step.

    Two preconditioners share the HVP ``h = H u`` of a random probe ``u``:

    **Diagonal plus low rank** (``preconditioner="diag+lowrank"``, the default). ``u`` has random
    signs, so ``u ⊙ h`` is a Hutchinson sample of ``diag(H)`` (Bekas, Kokiopoulou & Saad, 2007);
    its bias-corrected exponential average of squares gives the positive diagonal
    ``Λ = sqrt(v_t/(1 − β₂^t))``, ``v_t = β₂ v_{t−1} + (1 − β₂)(u ⊙ h)²`` (as AdaHessian, Yao et
    al., 2021). The last ``rank`` sketches ``Ω = [u_1..u_k]``, ``Y = [h_1..h_k]`` add the Nyström
    approximation ``Y (ΩᵀY)₊⁺ Yᵀ`` of ``H`` (positive semi-definite, exact on the sketched
    directions; Frangella, Rathore, Zhao & Udell, "SketchySGD", 2024):

    .. math::
        x \leftarrow x - \mathrm{lr}\,\bigl(\Lambda + \delta I
            + Y (\Omega^\top Y)_+^{+} Y^\top\bigr)^{-1} \hat m

    with ``m̂`` the bias-corrected exponential average of the gradients (``β = momentum``,
    default 0.9; ``m̂ = g`` for ``momentum=0``), solved by Woodbury in the ``(Λ + δI)^{-1/2}``-scaled
    space. ``lr`` is the fraction of this Newton-type step (as AdaHessian's, default 0.1) and
    ``δ = damping · mean(Λ)`` (``damping_mode="relative"``, default ``1e-8``: only a floor — larger
    values slow the low-curvature coordinates a transformer needs to move) or ``δ = damping``
    (``"fixed"``). At the first call ``init_probes`` samples are averaged, so that no coordinate
    starts from a near-zero estimate.

    **Isotropic** (``preconditioner="isotropic"``): the rank-one method of A. Semenov, "Rank-one
    approximation of the Hessian" (2025). ``u ~ Unif(S^{N−1})`` and

    .. math::
        S = \tfrac{N}{2}(h u^\top + u h^\top),\qquad
        x \leftarrow x - \mathrm{lr}\,\gamma\,(S + c I)^{-1} \nabla f(x),\quad c = \delta + \alpha

    by a rank-2 Woodbury solve (fused with the update when all groups share ``lr`` and ``c``).
    ``E[N H u uᵀ] = H``; ``S``'s eigenvalues ``(N/2)(h·u ± ‖h‖)`` grow like ``N‖h‖/2``, so a fixed
    ``α`` is swamped on real networks. ``damping_mode="relative"`` (default) scales it:
    ``α = damping · (N/2)‖h‖`` and ``γ = c``, so the step along every direction ``S`` does not see
    is exactly ``lr · g`` — ``lr`` is an SGD learning rate and the curvature only shortens the
    step along ``u`` and ``h`` (with ``damping ≥ 4``, ``I + S/c`` has eigenvalues in
    ``[1/2, 3/2]`` and the safeguard never fires). ``"fixed"`` (``α = damping``, ``γ = 1``) and
    ``"theory"`` (the slides' Lemma, ``α = sqrt(M‖g‖/2) + sqrt(λ_max² N(N−1) + Nδ²)``) are the
    paper's formulas, exactly.

    Tuning rule: start from the defaults; if the loss is noisy or rises, divide ``lr`` by 3; if
    it falls steadily but slowly, multiply it by 3. ``damping`` is relative (dimensionless) and
    rarely needs changing; raise it to make steps more conservative.

    Args:
        params: parameters or param groups; groups may set ``lr``, ``damping``, ``delta``,
            ``momentum`` and ``weight_decay``.
        lr: step size (see above; default 0.1).
        damping: ``None`` picks the mode's default: relative ``1e-8`` (diag+lowrank), ``4``
            (isotropic); ``1e-3`` for ``damping_mode="fixed"``.
        delta: ``δ`` added to the curvature estimate (``D = S + δI``), absolute.
        damping_mode: ``"relative"`` (default), ``"fixed"`` or ``"theory"`` (isotropic only).
        hessian_lipschitz: ``M`` (required for ``"theory"``).
        lambda_max: ``λ_max`` bound for ``"theory"``; ``None`` estimates ``|λ_max(H)|`` by power
            iteration at the first step and every ``lambda_max_refresh`` steps (host syncs).
        safeguard: isotropic mode: ``S`` has exactly one negative eigenvalue
            ``μ₋ = (N/2)(h·u − ‖h‖)``; the safeguard raises ``c`` to ``max(c, |μ₋| + c/2)`` so the
            smallest eigenvalue is at least ``c/2``, continuously in ``μ₋`` (counted in
            ``state["safeguard_hits"]``). Beyond the slides; ``False`` follows the formula.
        hvp: curvature source, ``"auto" | "exact" | "fd"`` (see :mod:`torch_rankone.optim`).
        generator: random source for ``u`` (default: owned, saved in ``state_dict``).
        preconditioner: ``"diag+lowrank"`` (default) or ``"isotropic"``.
        rank: diag+lowrank: number of sketches in the Nyström part (``0``: diagonal only; each
            sketch beyond the current one keeps two parameter-sized vectors).
        beta2: diag+lowrank: ``β₂`` of the diagonal's average.
        init_probes: diag+lowrank: Hutchinson samples averaged at the first call (HVPs that
            call only); one sample would leave some coordinates near zero and their first step
            huge.
        momentum: ``β`` of the bias-corrected average of the gradient the step is applied to
            (``None``: 0.9 for diag+lowrank, 0 for isotropic).
        weight_decay: decoupled weight decay, ``x ← x(1 − lr·wd)`` (AdamW).
        process_group: the ranks whose batches form the union batch (default: the world group
            whenever ``torch.distributed`` is initialised); FSDP2-sharded parameters use their
            mesh's group.
        lambda_max_refresh: steps between power-iteration estimates of ``λ_max`` (theory mode).
        module: the model, for finite-difference HVPs: its buffers (BatchNorm statistics) then
            advance once per step. A ``DistributedDataParallel`` module also means
            ``grads_synced=True``.
        grads_synced: the closure's ``backward()`` already averages gradients over the ranks
            (DDP does): the gradient and finite-difference HVPs of a backward closure are then
            not all-reduced again (``None``: True iff ``module`` is a DDP module). See
            ``docs/scaling.md`` for DDP, FSDP2 and distributed checkpoints.

    State (:attr:`global_state`, read the counters with :meth:`counters`): ``"step"``,
    ``"skipped_steps"`` (non-finite steps, masked on device), ``"safeguard_hits"``, ``"damping"``
    (the last shift ``c`` or ``δ``), ``"lambda_max"``; per parameter ``"hessian_sq_avg"`` (``v``),
    ``"momentum_buffer"``, ``"sketch_u0"``, ``"sketch_h0"``, … (``rank > 1``).
    Skipped steps and a safeguard firing on most steps are reported by a ``RuntimeWarning`` at
    the sync points of :meth:`SecondOrderOptimizer._check_health` (calls 1, 2, 4, …, then every
    100); other steps never synchronise with the host.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_rankone import RankOneNewton
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> opt = RankOneNewton(model.parameters())
        >>> first = torch.nn.functional.mse_loss(model(x), y).item()
        >>> for _ in range(50):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward(create_graph=True)  # the HVP comes from this graph
        ...     opt.step()
        >>> torch.nn.functional.mse_loss(model(x), y).item() < first
        True
    """

    _per_group = ("lr", "damping", "delta", "momentum", "weight_decay")
    _global_floats = ("damping", "lambda_max")
    _health_counters = {
        **SecondOrderOptimizer._health_counters,
        "safeguard_hits": (
            "the safeguard raised c (the rank-one estimate was indefinite or nearly singular)",
            "raise damping, or use damping_mode='relative' (damping >= 4 never needs it)",
        ),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.1,
        damping: float | None = None,
        delta: float = 0.0,
        damping_mode: str = "relative",
        hessian_lipschitz: float | None = None,
        lambda_max: float | None = None,
        safeguard: bool = True,
        hvp: str = "auto",
        *,
        preconditioner: str = "diag+lowrank",
        rank: int = 1,
        beta2: float = 0.999,
        init_probes: int = 10,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        lambda_max_refresh: int = 100,
        **options: Unpack[StepOptions],
    ) -> None:
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}"
            )
        if damping_mode not in ("relative", "fixed", "theory"):
            raise ValueError(
                f"damping_mode must be 'relative', 'fixed' or 'theory', got {damping_mode!r}"
            )
        if damping_mode == "theory" and preconditioner != "isotropic":
            raise ValueError(
                "damping_mode='theory' is the isotropic method's (preconditioner='isotropic')"
            )
        if damping is None:
            damping = _DEFAULT_DAMPING[preconditioner] if damping_mode == "relative" else 1e-3
        if momentum is None:
            momentum = 0.9 if preconditioner == "diag+lowrank" else 0.0
        check_number("lr", lr)
        check_number("damping", damping)
        check_number("delta", delta)
        check_update_extras(weight_decay, momentum)
        check_number("beta2", beta2)
        if beta2 >= 1:
            raise ValueError(f"beta2 must be < 1, got {beta2}")
        check_int("init_probes", init_probes)
        if not isinstance(rank, int) or not 0 <= rank <= _ext.MAX_RANK:
            raise ValueError(f"rank must be an int in [0, {_ext.MAX_RANK}], got {rank!r}")
        if damping_mode == "theory":
            if hessian_lipschitz is None:
                raise ValueError("damping_mode='theory' needs hessian_lipschitz (M)")
            check_number("hessian_lipschitz", hessian_lipschitz, strict=True)
        if lambda_max is not None:
            check_number("lambda_max", lambda_max, strict=True)
        check_int("lambda_max_refresh", lambda_max_refresh)
        defaults = dict(
            lr=lr,
            damping=damping,
            delta=delta,
            damping_mode=damping_mode,
            hessian_lipschitz=hessian_lipschitz,
            lambda_max=lambda_max,
            safeguard=safeguard,
            preconditioner=preconditioner,
            rank=rank,
            beta2=beta2,
            init_probes=init_probes,
            hvp=hvp,
            lambda_max_refresh=lambda_max_refresh,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults, **options)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        for key in ("damping", "delta"):
            check_number(f"param group {key}", group[key])
        if (
            group["safeguard"]
            and group["preconditioner"] == "isotropic"
            and group["damping_mode"] != "theory"
            and group["delta"] + group["damping"] <= 0
        ):
            raise ValueError(
                "safeguard=True needs delta + damping > 0 (the raised c keeps that value "
                "as the smallest eigenvalue); set a positive damping or safeguard=False"
            )
        if group["damping_mode"] == "theory" and group["delta"] != self.param_groups[0]["delta"]:
            raise ValueError("damping_mode='theory' needs the same delta in every group")

    def _param_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = super()._param_state_keys(group)
        if group["preconditioner"] == "diag+lowrank":
            keys += ("hessian_sq_avg",)
            keys += tuple(f"sketch_{w}{j}" for j in range(group["rank"] - 1) for w in "uh")
        return keys

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # version 0.1 kept the older sketches of a parameter as one tensor (2, kept, *shape)
        rank = self.param_groups[0]["rank"]
        for state in self.state.values():
            old = state.pop("sketches", None)
            for j in range(0 if old is None else old.shape[1]):
                slot = rank - 1 - old.shape[1] + j
                state[f"sketch_u{slot}"].copy_(old[0, j])
                state[f"sketch_h{slot}"].copy_(old[1, j])

    def _step(self, closure: Callable[[], Any] | None) -> Tensor | None:
        """One RankOneNewton step; returns the loss (``None`` for graph gradients)."""
        inputs = self._evaluate_step(closure)
        if inputs is None:
            return None
        groups, params, self._call, ev, g, loss, m, hvp = inputs
        if self.param_groups[0]["preconditioner"] == "isotropic":
            self._isotropic_step(groups, params, m, loss, hvp)
        else:
            self._diag_lowrank_step(groups, params, m, loss, hvp)
        self._detach_grads(params, g)
        return loss

    def _diag_lowrank_step(self, groups, params, g, loss, hvp) -> None:
        opts = self.param_groups[0]
        u = rademacher_like(params, self.generator)
        h = hvp(u)
        sample = torch._foreach_mul(u, h)
        sq = torch._foreach_mul(sample, sample)
        # One Hutchinson sample is a noisy diagonal: at the first call, average the squares of
        # init_probes of them, so that no coordinate starts from a near-zero estimate.
        for _ in range(opts["init_probes"] - 1 if self._call == 0 else 0):
            w = rademacher_like(params, self.generator)
            extra = torch._foreach_mul(w, hvp(w))
            torch._foreach_addcmul_(sq, extra, extra)
        if self._call == 0:
            torch._foreach_div_(sq, float(opts["init_probes"]))
        beta2 = opts["beta2"]
        # v_t = β₂ v + (1 − β₂)(u ⊙ h)², committed below only if the step is applied
        v_old = [self._zeros_state(p, "hessian_sq_avg") for p in params]
        v = torch._foreach_lerp(v_old, sq, 1 - beta2)
        t = self._counter("step").to(torch.float64) + 1
        diag = torch._foreach_div(v, (1 - beta2**t).to(g[0].dtype))
        torch._foreach_sqrt_(diag)
        mean_diag = norm1(diag) / numel(params)
        tiny = torch.finfo(g[0].dtype).tiny  # Λ = 0 (no curvature seen yet) still solves
        scale = mean_diag if opts["damping_mode"] == "relative" else torch.ones_like(mean_diag)
        shift = []  # Λ + δ, in place: Λ itself is not needed any more
        for group, ps, d in zip(self.param_groups, groups, split_groups(diag, groups)):
            if ps:
                torch._foreach_add_(d, (group["damping"] * scale + group["delta"]).clamp_min(tiny))
                shift += d
        omega, sketches = self._sketches(params, u, h, opts["rank"])
        if sketches:
            C = nystrom_core(omega, sketches)
            y, solved = shifted_lowrank_solve(g, sketches, C, shift)
        else:
            y, solved = torch._foreach_div(g, shift), all_finite(mean_diag)
        ok = self._apply_masked(
            groups, split_groups(y, groups), solved & all_finite(loss, mean_diag)
        )
        for vo, vn in zip(v_old, v):
            vo.copy_(torch.where(ok, vn, vo))
        # δ of the first group: damping·mean(Λ) (relative) or damping (fixed)
        self.global_state["damping"] = (scale * opts["damping"]).detach().to(g[0].dtype)
        if opts["rank"] > 1:
            self._push_sketch(params, u, h, opts["rank"])

    def _sketches(self, params, u, h, rank: int) -> tuple[list[TensorList], list[TensorList]]:
        """The last ``rank`` sketch pairs ``(u_j, h_j)``, this step's last; the ``rank − 1``
        older pairs are kept per parameter, oldest first (``state[p]["sketch_u0"]``,
        ``["sketch_h0"]``, …; the first calls use the ones filled so far)."""
        if rank == 0:
            return [], []
        kept = min(self._call, rank - 1)
        older = [
            [[self._zeros_state(p, f"sketch_{w}{j}") for p in params] for j in range(rank - 1)]
            for w in "uh"
        ]
        return older[0][rank - 1 - kept :] + [u], older[1][rank - 1 - kept :] + [h]

    def _push_sketch(self, params, u, h, rank: int) -> None:
        """This step's pair replaces the oldest kept one, which becomes the newest slot (the
        names rotate: no copies but this one)."""
        for p, ui, hi in zip(params, u, h):
            st = self.state[p]
            for w, new in (("u", ui), ("h", hi)):
                names = [f"sketch_{w}{j}" for j in range(rank - 1)]
                oldest = st[names[0]]
                local(oldest).copy_(new)
                for a, b in zip(names, names[1:]):
                    st[a] = st[b]
                st[names[-1]] = oldest

    def _isotropic_step(self, groups, params, g, loss, hvp) -> None:
        z = randn_like(params, self.generator)
        u = torch._foreach_div(z, norm(z))
        h = hvp(u)
        n = numel(params)
        defaults = self.param_groups[0]
        c_groups = self._shifts(g, h, n, hvp, params, defaults)

        # Safeguard: S's only negative eigenvalue is μ₋ = (N/2)(h·u − ‖h‖‖u‖), ‖u‖ = 1. Raise
        # every c by the same shift so that the smallest c becomes max(c, |μ₋| + c/2): the
        # smallest eigenvalue of D + αI is then at least c/2 — continuous in μ₋, unlike a jump
        # at c = |μ₋|, which leaves c − |μ₋| ≈ 0 just above it.
        mu_minus = (n / 2) * (dot(h, u) - norm(h))
        if defaults["safeguard"]:
            c_min = torch.stack(c_groups).min()
            shift = (-mu_minus - c_min / 2).clamp_min(0.0)
            shifted = {id(c): c + shift for c in c_groups}  # keeps shared values shared
            c_groups = [shifted[id(c)] for c in c_groups]
            self._counter("safeguard_hits").add_((shift > 0).to(torch.int64))
        finite = all_finite(loss, torch.stack(c_groups))
        relative = defaults["damping_mode"] == "relative"
        lr = self._shared_lr(groups)
        if (
            lr is not None
            and all(c is c_groups[0] for c in c_groups)
            and not self._uses_weight_decay(groups)
            and not self._sharded  # the fused kernel's Gram would be this rank's piece only
            and not self._no_grad  # it updates every parameter
            # the kernel checks lr/c and its coefficients, not lr·y: keep lr where that cannot
            # overflow unless the gradient itself is near the dtype's limit
            and (isinstance(lr, Tensor) or abs(lr) < torch.finfo(g[0].dtype).max ** 0.5)
        ):
            # One c and one lr: the fused solve-and-update (one reduction pass, one update pass).
            # lr = NaN vetoes the step on device when the loss or c is not finite.
            lr = (
                lr.to(g[0].device, torch.float64)
                if isinstance(lr, Tensor)
                else torch.full((), lr, dtype=torch.float64, device=g[0].device)
            )
            if relative:
                lr = lr * c_groups[0].to(torch.float64)
            lr = torch.where(finite, lr, torch.nan)
            C = _symmetrised_outer_coefficients(n, g[0].device)
            ok = _ext.lowrank_solve_update(params, g, [h, u], C, c_groups[0], lr)
            self._count_step(ok)
        else:
            c_tensors = [c for c, ps in zip(c_groups, groups) for _ in ps]
            y, solved = rank_one_newton_direction(g, h, u, c_tensors, n)
            if relative:  # γ = c: the step along directions S does not see is lr·g
                y = torch._foreach_mul(y, c_tensors)
            self._apply_masked(groups, split_groups(y, groups), solved & finite)
        self.global_state["damping"] = c_groups[0].detach()

    def _shifts(self, g, h, n: int, hvp, params, defaults: dict) -> list[Tensor]:
        """``c = δ + α`` per group, as 0-d tensors on the parameters' device (no host sync)."""
        device, dtype = g[0].device, g[0].dtype
        mode = defaults["damping_mode"]
        if mode in ("fixed", "relative"):
            # relative: α scales with (N/2)‖h‖, a device tensor; fixed: made on the device
            scale = (n / 2) * norm(h).to(torch.float64) if mode == "relative" else None
            cache = {}
            return [
                cache.setdefault(
                    (group["delta"], group["damping"]),
                    (group["delta"] + group["damping"] * scale).to(device, dtype)
                    if scale is not None
                    else torch.full(
                        (), group["delta"] + group["damping"], dtype=dtype, device=device
                    ),
                )
                for group in self.param_groups
            ]
        lam = defaults["lambda_max"]
        if lam is None:
            lam = self._estimated_lambda_max(hvp, params)
        alpha = theory_damping(norm(g), n, defaults["hessian_lipschitz"], lam, defaults["delta"])
        c = alpha + defaults["delta"]
        return [c] * len(self.param_groups)

    def _estimated_lambda_max(self, hvp, params) -> Tensor:
        """``|λ_max(H)|`` by 20 power iterations, at the first call and every
        ``lambda_max_refresh`` calls (those steps synchronise with the host)."""
        state = self.global_state
        refresh = self._call % self.param_groups[0]["lambda_max_refresh"] == 0
        if refresh or getattr(self, "_estimate_again", False):
            res = power_iteration(
                hvp,
                params,
                max_iters=20,
                tol=1e-3,
                generator=self.generator,
                warn=False,
                raise_nonfinite=False,
            )
            estimate = res.eigenvalue.abs().to(state["lambda_max"])
            # non-finite curvature (a NaN loss): this step is skipped, and estimated again next
            self._estimate_again = not math.isfinite(float(estimate))  # a sync step anyway
            if self._estimate_again:
                return estimate
            state["lambda_max"] = estimate
        return state["lambda_max"]
