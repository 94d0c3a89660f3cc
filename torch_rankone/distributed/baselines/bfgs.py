"""Server-side BFGS: the nodes send gradients, the server keeps the quasi-Newton matrix."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from typing_extensions import Unpack

from ..._validation import check_number
from .. import accounting as acc
from ._common import GLMBaseline, GLMOptions

__all__ = ["BFGS", "bfgs_inverse_update"]


def bfgs_inverse_update(Hinv: Tensor, s: Tensor, y: Tensor) -> Tensor:
    r"""The BFGS update of an inverse-Hessian approximation (Nocedal & Wright, eq. (6.17)):

    .. math::
        H_{k+1}^{-1} = (I - \rho s y^\top) H_k^{-1} (I - \rho y s^\top) + \rho s s^\top,
        \qquad \rho = 1/(y^\top s),

    for ``s = x^{k+1} − x^k``, ``y = ∇P(x^{k+1}) − ∇P(x^k)``, ``yᵀs > 0``. Expanded so that it
    costs two matrix-vector products and rank-one updates, ``O(d²)``.
    """
    rho = 1.0 / y.dot(s)
    Hy = Hinv @ y
    out = Hinv - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
    return out + (rho * rho * y.dot(Hy) + rho) * torch.outer(s, s)


class BFGS(GLMBaseline):
    r"""BFGS on the server with unit steps (Islamov et al. 2021, §4: "as the initial
    approximation of the Hessian in BFGS we use H⁰ = ∇²P(x⁰), and the stepsize is 1"):

    .. math::
        x^{k+1} = x^k - B_k^{-1} \nabla P(x^k),\qquad B_0 = \nabla^2 P(x^0),

    ``B_k^{-1}`` updated by :func:`bfgs_inverse_update` with ``s = x^k − x^{k−1}``,
    ``y = ∇P(x^k) − ∇P(x^{k−1})``. The update is skipped (and counted in
    ``state["skipped_updates"]``) when the curvature condition fails numerically,
    ``yᵀs ≤ curvature_eps·‖y‖‖s‖`` — near the optimum ``s`` and ``y`` are rounding noise.

    Communication: at initialisation every node sends its local Hessian ``∇²P_i(x⁰)``
    (``32·d(d+1)/2``, as NewtonLearn's initialisation), then its gradient, ``32d`` per
    iteration.

    References: C. G. Broyden (1967), R. Fletcher (1970), D. Goldfarb (1970), D. F. Shanno
    (1970); Nocedal & Wright, *Numerical Optimization*, §6.1.

    Args:
        params, features, targets, loss, lam, num_nodes, accounting: As
            :class:`~torch_rankone.distributed.baselines.DistributedNewton`.
        curvature_eps: Relative threshold of the curvature safeguard.
        generator: Unused (deterministic); accepted for a uniform interface.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        *,
        curvature_eps: float = 1e-10,
        **options: Unpack[GLMOptions],
    ) -> None:
        self.curvature_eps = check_number("curvature_eps", curvature_eps)
        super().__init__(params, features, targets, defaults={}, **options)
        x = self._param.detach().reshape(-1)
        state = self.state[self._param]
        state["inverse"] = torch.linalg.inv(self.nodes.hessian(x, self._lam))
        state["skipped_updates"] = 0

    def _initial_bits(self) -> dict[str, float]:
        return self._bill(acc.symmetric_matrix_bits(self.nodes.d))

    def _iterate(self, state: dict, x: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        t = self.nodes.margins(x)
        grad = self.nodes.gradients(x, self._lam, t).mean(0)
        if "grad" in state:
            s, y = x - state["x"], grad - state["grad"]
            if y.dot(s) > self.curvature_eps * y.norm() * s.norm():
                state["inverse"] = bfgs_inverse_update(state["inverse"], s, y)
            else:
                state["skipped_updates"] += 1
        state["x"], state["grad"] = x.clone(), grad
        step = state["inverse"] @ grad
        return (
            x - step,
            self.nodes.value(x, t, self._lam),
            self._bill(acc.FLOAT_BITS * x.numel()),
        )
