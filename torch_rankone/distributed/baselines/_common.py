"""What every baseline shares: the GLM split over simulated nodes, and the optimizer shell.

The problem is NewtonLearn's (Islamov et al. 2021, eq. (1)): ``n`` nodes with ``m`` rows each,

    P(x) = (1/n) Σ_i P_i(x),   P_i(x) = f_i(x) + (λ/2)‖x‖²,   f_i(x) = (1/m) Σ_j φ(a_ijᵀx, b_ij).

The baselines' theory (DCGD, DIANA, ADIANA, DINGO) is stated for ``min (1/n) Σ_i P_i``, so node
``i`` owns the regulariser too: its gradient message is ``∇P_i(x) = ∇f_i(x) + λx`` and its local
Hessian ``∇²P_i(x) = (1/m) Σ_j φ''(a_ijᵀx) a_ij a_ijᵀ + λI``. ``φ``, ``φ'``, ``φ''`` and the sparse
products are :mod:`torch_rankone.glm`'s (:func:`~torch_rankone.glm.glm_loss`,
:class:`~torch_rankone.glm.GLMShard`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import torch
from torch import Tensor

from ..._validation import check_number
from ...glm import GLMShard, glm_loss
from .. import accounting as acc
from ..compressors import Compressor

__all__ = [
    "GLMNodes",
    "GLMBaseline",
    "GLMOptions",
    "global_smoothness",
    "paper_message_bits",
    "smoothness",
]


class GLMNodes:
    """``features``/``targets`` split into ``n`` equal shards of ``m`` consecutive rows, with the
    per-node quantities every baseline needs, vectorised over nodes (no loop over nodes).

    Per-node gradient sums are one sparse product over the nonzeros of ``A``, ``O(nnz)`` like
    NewtonLearn's sparse products; per-node Hessians are one batched ``(n, m, d)`` product.
    """

    def __init__(self, features: Tensor, targets: Tensor, num_nodes: int, loss: Any) -> None:
        rows, d = features.shape
        self.n, self.m, self.d = num_nodes, rows // num_nodes, d
        self.A, self.b = features.contiguous(), targets
        self.loss = glm_loss(loss)
        self.shard = GLMShard(self.A)
        # the block matrix S with S[i·d + k, (i, j)] = a_ijk, so that every node's gradient sum
        # Σ_j w_ij a_ij is one sparse product S w (O(nnz), no loop over nodes)
        coo = self.A.to_sparse_coo().coalesce()
        row, col = coo.indices()
        key = torch.div(row, self.m, rounding_mode="floor") * d + col
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self._blocks = torch.sparse_coo_tensor(
                torch.stack([key, row]), coo.values(), (self.n * d, rows)
            ).to_sparse_csr()

    def node_rows(self) -> Tensor:
        """The features as ``(n, m, d)``: node ``i``'s rows ``a_ij`` in ``[i]``."""
        return self.A.view(self.n, self.m, self.d)

    def margins(self, x: Tensor) -> Tensor:
        """``t_ij = a_ijᵀx`` for all rows, shape ``(n·m,)``."""
        return self.shard.mv(x)

    def value(self, x: Tensor, t: Tensor | None = None, lam: float = 0.0) -> Tensor:
        """``P(x) = mean_ij φ(t_ij, b_ij) + (λ/2)‖x‖²`` (0-d)."""
        t = self.margins(x) if t is None else t
        return self.loss.value(t, self.b).mean() + lam / 2 * x.dot(x)

    def gradients(self, x: Tensor, lam: float, t: Tensor | None = None) -> Tensor:
        """``∇P_i(x) = (1/m) Σ_j φ'(t_ij, b_ij) a_ij + λx`` for every node, shape ``(n, d)``."""
        t = self.margins(x) if t is None else t
        sums = self._blocks @ self.loss.d1(t, self.b)
        return sums.view(self.n, self.d) / self.m + lam * x

    def curvatures(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """``h_ij(x) = φ''(t_ij, b_ij)``, shape ``(n·m,)``."""
        t = self.margins(x) if t is None else t
        return self.loss.d2(t, self.b)

    def hessian(self, x: Tensor, lam: float, t: Tensor | None = None) -> Tensor:
        """``∇²P(x) = (1/(nm)) Σ_ij h_ij(x) a_ij a_ijᵀ + λI`` (sparse product, ``d×d``)."""
        H = self.shard.weighted_gram(self.curvatures(x, t)) / (self.n * self.m)
        H.diagonal().add_(lam)
        return H

    def local_hessians(self, x: Tensor, lam: float, t: Tensor | None = None) -> Tensor:
        """``∇²P_i(x)`` for every node, shape ``(n, d, d)``."""
        rows = self.node_rows()
        h = self.curvatures(x, t).view(self.n, self.m, 1)
        H = torch.bmm(rows.transpose(1, 2), rows * h) / self.m
        H.diagonal(dim1=1, dim2=2).add_(lam)
        return H


def smoothness(nodes: GLMNodes, lam: float) -> tuple[float, float]:
    """``(L, μ)`` of the local functions: ``L = max_i L_i``, ``L_i = γ λ_max(A_iᵀA_i/m) + λ``
    with ``γ = sup|φ''|`` (1/4 for logistic), and ``μ = λ`` (the strong convexity the
    regulariser guarantees). The first-order methods' theory assumes every ``P_i`` is
    ``L``-smooth, hence the maximum over nodes."""
    gamma = nodes.loss.gamma
    if gamma is None:
        raise ValueError("theoretical stepsizes need sup|phi''|: use a built-in loss or pass them")
    rows = nodes.node_rows()
    gram = torch.bmm(rows.transpose(1, 2), rows) / nodes.m
    top = float(torch.linalg.eigvalsh(gram)[:, -1].max())
    return gamma * top + lam, lam


def global_smoothness(nodes: GLMNodes) -> float:
    """``L`` of the authors' experiment code: the smoothness constant of the *global* data term
    ``f = (1/n) Σ f_i``, ``γ λ_max(AᵀA/(nm))`` (``γ = sup|φ''|``), without ``λ`` — smaller than
    :func:`smoothness`'s ``max_i L_i`` (on w8a about 0.66 against 3.22)."""
    gamma = nodes.loss.gamma
    if gamma is None:
        raise ValueError("the authors' stepsizes need sup|phi''|: use a built-in loss")
    gram = nodes.shard.weighted_gram(torch.ones_like(nodes.b)) / (nodes.n * nodes.m)
    return gamma * float(torch.linalg.eigvalsh(gram)[-1])


def paper_message_bits(compressor: Compressor, dim: int) -> float:
    """One compressed ``dim``-vector at the paper's per-message cost
    (:func:`~torch_rankone.distributed.accounting.published_message_bits`)."""
    return acc.published_message_bits(compressor, dim)


class GLMOptions(TypedDict, total=False):
    """The keyword options every baseline takes, with NewtonLearn's meaning and defaults.

    ``loss``: ``"logistic"`` (default), ``"squared"`` or a function ``φ(t, b)``; ``lam``: ``λ ≥ 0``
    (default ``1e-3``); ``num_nodes``: ``n`` (default 1); ``accounting``: ``"theory"`` (default),
    ``"authors-code"`` or ``"authors-text"`` (:mod:`torch_rankone.distributed.accounting`);
    ``generator``: the source of randomness (default: seeded from ``torch.initial_seed()``).
    """

    loss: str | Callable[[Tensor, Tensor], Tensor]
    lam: float
    num_nodes: int | None
    accounting: str
    generator: torch.Generator | None


class GLMBaseline(torch.optim.Optimizer):
    """Shell shared by the baselines: input checks, the node split, the bit count and the
    history, in NewtonLearn's format.

    ``step()`` takes no closure and returns ``P(x^k)`` at the point it started from (0-d).
    ``state[param]["bits_sent"]``: cumulative bits the nodes sent, initialisation included, in
    the chosen ``accounting``; ``history``: per iteration ``{"loss": P(x^k), "bits":
    cumulative bits after it, "time": cumulative step seconds}`` as NewtonLearn's, plus
    ``"bits_theory"``, ``"bits_authors-code"`` and ``"bits_authors-text"`` (every convention's
    bill of *this* run). The constants and stepsizes follow the convention's family
    (:func:`~torch_rankone.distributed.accounting.convention_family`): where they differ
    (DCGD, DIANA, ADIANA, DINGO) the iterates depend on it, and a run is meaningful only in the
    conventions of its family — ``"theory"``, or both ``"authors-*"``. Evaluating ``P(x^k)``
    for the history is monitoring, not communication, as in NewtonLearn.

    Subclasses implement ``_initial_bits()`` and ``_iterate(state, x)``, which returns
    ``(x^{k+1}, P(x^k), bits)``; bills map every convention to bits (see ``_bill``).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        *,
        defaults: dict[str, Any],
        loss: str | Callable[[Tensor, Tensor], Tensor] = "logistic",
        lam: float = 1e-3,
        num_nodes: int | None = None,
        accounting: str = "theory",
        generator: torch.Generator | None = None,
    ) -> None:
        lam = check_number("lam", lam)
        accounting = acc.canonical(accounting)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        super().__init__(params, dict(lam=lam, **defaults))
        plist = [p for g in self.param_groups for p in g["params"]]
        if len(plist) != 1:
            raise ValueError(f"params must hold exactly one tensor (x), got {len(plist)}")
        d = plist[0].numel()
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != d:
            raise ValueError(
                f"features must be a (rows, d={d}) tensor matching the parameter's {d} elements, "
                f"got {getattr(features, 'shape', type(features).__name__)}"
            )
        if not features.is_floating_point() or features.dtype != plist[0].dtype:
            raise TypeError(
                f"features must have the parameter's dtype {plist[0].dtype}, got {features.dtype}"
            )
        if not isinstance(targets, Tensor) or targets.shape != features.shape[:1]:
            raise ValueError(
                f"targets must be a tensor of shape ({features.shape[0]},), "
                f"got {getattr(targets, 'shape', type(targets).__name__)}"
            )
        nodes = 1 if num_nodes is None else num_nodes
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        rows = features.shape[0]
        if rows == 0 or rows % nodes:
            raise ValueError(
                f"features has {rows} rows, not divisible into num_nodes={nodes} equal shards; "
                f"drop the remainder (e.g. features[:{nodes * (rows // nodes)}]) as the paper does"
            )
        self.accounting = accounting
        self.family = acc.convention_family(accounting)
        self.nodes = GLMNodes(features, targets.to(features.dtype), nodes, loss)
        self.generator = generator or torch.Generator().manual_seed(torch.initial_seed())
        self.history: list[dict[str, float]] = []
        self._bits = self._initial_bits()
        state = self.state[plist[0]]
        state["step"] = 0
        state["bits_sent"] = torch.tensor(self._bits[accounting], dtype=torch.float64)

    @property
    def _param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    @property
    def global_state(self) -> dict[str, Any]:
        """The optimizer's state (``x`` is its only parameter): ``"step"``, ``"bits_sent"``, and
        the method's vectors."""
        return self.state[self._param]

    def counters(self) -> dict[str, int]:
        """``{"step": iterations}`` as a host int (NewtonLearn's accessor, for the baselines)."""
        return {"step": int(self.global_state["step"])}

    @property
    def _lam(self) -> float:
        return self.param_groups[0]["lam"]

    def _bill(
        self, one_node: float, code: float | None = None, text: float | None = None
    ) -> dict[str, float]:
        """A message every node sends, costing ``one_node`` bits: ``n`` times it summed over the
        nodes (theory); one node's (authors-code: ``code`` where the authors count otherwise);
        ``n`` times the authors' per-node count (authors-text: ``text`` where it differs)."""
        code = one_node if code is None else code
        return {
            "theory": self.nodes.n * one_node,
            "authors-code": code,
            "authors-text": self.nodes.n * code if text is None else text,
        }

    def _initial_bits(self) -> dict[str, float]:
        raise NotImplementedError

    def _iterate(self, state: dict, x: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: None = None) -> Tensor:
        """One iteration; returns ``P(x^k)`` at the starting point (0-d tensor)."""
        if closure is not None:
            raise TypeError(
                f"{type(self).__name__}.step() takes no closure: the optimizer owns the data "
                "(features/targets) and evaluates P itself"
            )
        start = time.perf_counter()
        p = self._param
        state = self.state[p]
        x_new, loss, bits = self._iterate(state, p.detach().reshape(-1))
        p.copy_(x_new.view_as(p))
        state["step"] += 1
        self._bits = {key: self._bits[key] + bits[key] for key in acc.CONVENTIONS}
        state["bits_sent"].fill_(self._bits[self.accounting])
        elapsed = time.perf_counter() - start + (self.history[-1]["time"] if self.history else 0.0)
        self.history.append(
            {
                "loss": float(loss),
                "bits": self._bits[self.accounting],
                "time": elapsed,
                **{f"bits_{key}": value for key, value in self._bits.items()},
            }
        )
        return loss
