"""NewtonLearn: distributed Newton with learned, compressed Hessian coefficients.

Generalised linear model over ``n`` nodes with ``m`` rows ``(a_ij, b_ij)`` each,

    P(x) = (1/n) Σ_i f_i(x) + (λ/2)‖x‖²,   f_i(x) = (1/m) Σ_j φ(a_ijᵀx, b_ij),
    H(x) = (1/(nm)) Σ_ij h_ij(x) a_ij a_ijᵀ,   h_ij(x) = φ''(a_ijᵀx, b_ij).

Node ``i`` learns the vector ``h_i^k ≈ h_i(x*)`` from compressed messages
``C(h_i(x^k) − h_i^k)`` (DIANA's trick applied to the Hessian's coefficients), so the server's
Hessian estimate changes by a few rank-one terms per iteration and the uplink costs about as much
as gradient descent's. Variants (``η`` the learning rate, ``C`` a fresh compressor draw per node
and iteration):

* NL1 (Algorithm 1; ``λ > 0``, convex ``φ``)::

      h_i^{k+1} = [h_i^k + η C(h_i(x^k) − h_i^k)]_+
      x^{k+1}   = x^k − (H^k + λI)⁻¹ ∇P(x^k)
      H^{k+1}   = H^k + (1/(nm)) Σ_ij (h_ij^{k+1} − h_ij^k) a_ij a_ijᵀ

* NL2 (Algorithm 2; ``P`` strongly convex, ``|h| ≤ γ``, ``λ ≥ 0``)::

      h_i^{k+1} = h_i^k + η C(h_i(x^k) − h_i^k)
      β^k = max_ij (h_ij(x^k) + 2γ) / (h_ij^k + 2γ)
      H^k = β^k A^k − 2γ B,   B = (1/(nm)) Σ_ij a_ij a_ijᵀ
      x^{k+1} = x^k − (H^k + λI)⁻¹ ∇P(x^k)
      A^{k+1} = A^k + (1/(nm)) Σ_ij (h_ij^{k+1} − h_ij^k) a_ij a_ijᵀ,
      A^0 = (1/(nm)) Σ_ij (h_ij^0 + 2γ) a_ij a_ijᵀ

  ``H^k ⪰ ∇²f(x^k)``, so ``H^k + λI`` is positive definite.

* CNL (cubic NEWTON-LEARN, as reconstructed from the authors' code): NL2's learning and
  Hessian model, and the cubic-regularised step

      x^{k+1} = x^k + argmin_s ⟨∇P(x^k), s⟩ + ½⟨(H^k + λI)s, s⟩ + (M/6)‖s‖³,

  solved exactly by :func:`cubic_step`; ``M = ν R³`` (``ν = sup|φ'''|``, ``R = max‖a_ij‖``)
  makes the model an upper bound of ``P`` and the method globally convergent.

Solves are in float64 (``d ≤ 4096``): a Cholesky factorisation of ``H^k + λI`` per iteration, or
(NL1, ``solver="cholesky_update"``) the factor updated by one rank-one update/downdate per learned
change (:func:`cholesky_rank_one_update`), which wins when ``d`` is large and few coefficients
change. Hessian accumulation goes through ``_ext.gathered_outer_accumulate`` (the compiled
``csrc`` kernel when built).

Reference: R. Islamov, X. Qian, P. Richtárik, "Distributed second order methods with fast rates
and compressed communication", ICML 2021, Algorithms 1 and 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _ext
from .._random import owned_generator
from .._validation import check_int, check_number
from .._warnings import warn_at_caller
from ..distributed import accounting as acc
from ..distributed.compressors import Compressor, Identity, RandK
from ..distributed.transports import CollectiveTransport, ProtocolError, SimulatedTransport
from ..glm import GLMShard, data_error, glm_loss, glm_node_terms
from ..linalg import (
    cholesky_rank_one_update,
    cubic_step,
    newton_direction,
    shifted,
    solve_with_factor,
)

__all__ = ["NewtonLearn", "learn_coefficients"]

VARIANTS = ("nl1", "nl2", "cnl")
SOLVERS = ("cholesky", "cholesky_update")
MAX_FLOAT64_SOLVE = 4096  # d up to which the d×d algebra defaults to float64


def learn_coefficients(
    variant: str, h: Tensor, hx: Tensor, message: Tensor, eta: float, gamma: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One learning step for all local nodes (rows of ``h``, shape ``(nodes, m)``).

    ``message = C(h(x^k) − h^k)``. Returns ``(h^{k+1}, h^{k+1} − h^k, β)``: NL1 projects,
    ``h^{k+1} = [h^k + η·message]_+``, and has no β; NL2/CNL take ``h^k + η·message`` and
    ``β = max_ij (h_ij(x^k) + 2γ)/(h_ij^k + 2γ)`` over the local nodes (0-d).
    """
    if variant == "nl1":
        h_new = (h + eta * message).clamp_min_(0.0)
        return h_new, h_new - h, None
    change = eta * message
    beta = ((hx + 2 * gamma) / (h + 2 * gamma)).amax()
    return h + change, change, beta


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


class NewtonLearn(torch.optim.Optimizer):
    r"""NEWTON-LEARN (NL1, NL2) and CUBIC-NEWTON-LEARN for GLMs.

    Update formulas (``C`` a fresh compressor draw per node and iteration):

    - ``"nl1"``: :math:`h_i^{k+1} = [h_i^k + \eta C(h_i(x^k) - h_i^k)]_+`,
      :math:`x^{k+1} = x^k - (H^k + \lambda I)^{-1}\nabla P(x^k)`,
      :math:`H^{k+1} = H^k + \frac{1}{nm}\sum_{ij}(h^{k+1}_{ij} - h^k_{ij}) a_{ij}a_{ij}^\top`.
    - ``"nl2"``: :math:`h_i^{k+1} = h_i^k + \eta C(h_i(x^k) - h_i^k)`,
      :math:`\beta^k = \max_{ij} \frac{h_{ij}(x^k) + 2\gamma}{h^k_{ij} + 2\gamma}`,
      :math:`H^k = \beta^k A^k - 2\gamma B`, :math:`B = \frac{1}{nm}\sum_{ij} a_{ij}a_{ij}^\top`,
      :math:`x^{k+1} = x^k - (H^k + \lambda I)^{-1}\nabla P(x^k)`,
      :math:`A^{k+1} = A^k + \frac{1}{nm}\sum_{ij}(h^{k+1}_{ij} - h^k_{ij}) a_{ij}a_{ij}^\top`.
    - ``"cnl"``: NL2's learning and :math:`H^k`, and
      :math:`x^{k+1} = x^k + \arg\min_s \langle\nabla P(x^k), s\rangle
      + \tfrac12\langle(H^k + \lambda I)s, s\rangle + \tfrac{M}{6}\|s\|^3` (exact, see
      :func:`cubic_step`).

    ``step()`` takes no closure (the optimizer owns the data) and returns :math:`P(x^k)` at the
    point it started from, a 0-d tensor.

    Args:
        params: One parameter with ``d`` elements, the weight vector ``x`` (``(d,)`` or
            ``(1, d)`` as ``nn.Linear(d, 1, bias=False).weight``). Its value is ``x^0``.
        features: ``(rows, d)`` — simulated mode: all ``n·m`` rows, node ``i`` holding rows
            ``[i·m, (i+1)·m)``; ``torch.distributed`` mode: this rank's ``L·m`` rows. Dense,
            sparse CSR (e.g. ``torch_rankone.data.load_libsvm(..., sparse=True)``) or sparse
            COO; finite. Sparse input with under 25 % stored entries stays sparse (CSR copies of
            ``A`` and ``Aᵀ``, about twice its memory; no dense copy); denser sparse input is
            densified once (``rows·d`` values). The iterates equal the dense input's up to
            rounding.
        targets: ``(rows,)`` labels ``b_ij``, finite; exactly ``-1`` or ``+1`` for the built-in
            logistic loss (others are refused: map ``{0, 1}`` labels with ``2*y - 1``).
        loss: ``"logistic"``, ``"squared"`` or a function ``φ(t, b)`` of torch scalars
            (derivatives by ``torch.func``; then ``gamma`` and, for CNL, ``cubic_reg`` are needed).
        lam: ``λ`` (> 0 for NL1).
        variant: ``"nl1"``, ``"nl2"`` or ``"cnl"``.
        compressor: For the learning messages (default ``RandK(1)``; ``Identity()`` for a single
            node, where nothing is communicated and compression would only slow learning).
        eta: Learning rate ``η``; default ``1/(ω + 1)`` with ``ω = compressor.omega(m)``.
        gamma: NL2/CNL's ``γ ≥ sup|φ''|``; default 1/4 (logistic), 1 (squared).
        cubic_reg: CNL's ``M``; default ``ν R³``, ``ν = sup|φ'''|``, ``R = max‖a_ij‖``.
        option: 1 — the nodes send the ``a_ij`` of the changed coefficients (server without
            data, counted in the bits); 2 — the server is assumed to hold them.
        num_nodes: Simulated mode: ``n`` (rows must be divisible by it; e.g. drop a9a's
            remainder row). ``torch.distributed`` mode: nodes on this rank (default 1).
        process_group: Run the protocol over ``torch.distributed`` on this group (default: the
            default group when ``torch.distributed`` is initialised, else simulated nodes).
        server_rank: Group rank of the server (it also holds a shard).
        generator: Source of the compressors' randomness (drawn for all nodes, in node order,
            on every rank; the server's state is broadcast at construction). Default: one
            derived from ``torch.initial_seed()``.
        accounting: ``"theory"`` (all nodes' uplink, Option-aware, index bits), ``"authors-code"``
            (one node, as the authors' published experiment code counts it: ``32(d + rd + r)``
            per iteration) or ``"authors-text"`` (all nodes, as the paper's text states it,
            index bits included); former names ``"realistic"`` = ``"theory"``, ``"paper"`` =
            ``"authors-code"``. See :mod:`torch_rankone.distributed.accounting`.
        h0: Initial coefficients ``(n·m,)`` or ``(nodes, m)`` (this rank's); default
            ``h_i(x^0)``.
        solver: ``"cholesky"`` (refactor ``H^k + λI`` every iteration) or, NL1 only,
            ``"cholesky_update"`` (rank-one updates/downdates of the factor).
        solve_dtype: dtype of the server's ``d×d`` algebra; default float64 for ``d ≤ 4096``.

    State (``opt.state[param]``, saved by ``state_dict``): ``h`` (learned coefficients of this
    rank's nodes), ``H`` (NL1) or ``A``, ``B`` (NL2/CNL) on the server, ``chol`` (update
    solver: the factor of ``H + λI``), ``chol_lam`` (the ``λ`` it was made for; a changed
    ``param_groups[0]["lam"]`` makes the next step refactor), ``refactorizations``, ``step``,
    ``skipped_steps`` (non-finite steps not applied), ``bits_sent`` (cumulative, with
    initialisation) and ``generator_state``. ``opt.history``: per iteration
    ``{"loss": P(x^k), "bits": cumulative bits after it, "time": cumulative step seconds}``.

    Non-finite steps: a step whose gradient, loss, some node's ``h(x^k)`` or ``h^{k+1}``, or new
    iterate is not finite is not applied at all — ``x``, ``h``, ``H``/``A`` and the factor stay
    as they were (a NaN learned into ``h`` or ``H`` would make every later step a skipped one)
    and ``skipped_steps`` counts it on every rank (the server's verdict is broadcast with the
    iterate). Its messages were sent: ``step``, ``bits_sent`` and the history count it (its
    ``loss`` may be NaN). A start where ``P``, ``∇P`` or ``h(x⁰)`` (or a given ``h0``) is not
    finite is refused at construction.

    Synchronisation: each step reads the number of changed coefficients on the host (the size
    of the messages), and CNL's 1-D secular solve runs on the host.

    Example (logistic regression over 4 simulated nodes, 1 coordinate per message):
        >>> import torch
        >>> from torch_rankone import NewtonLearn
        >>> from torch_rankone.distributed import RandK
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(40, 5, generator=g, dtype=torch.float64)
        >>> b = torch.where(A[:, 0] > 0, 1.0, -1.0).to(torch.float64)
        >>> x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        >>> opt = NewtonLearn(
        ...     [x], A, b, loss="logistic", lam=0.1, variant="nl1", compressor=RandK(1),
        ...     num_nodes=4, generator=g,
        ... )
        >>> losses = [float(opt.step()) for _ in range(30)]
        >>> losses[-1] < 0.6 * losses[0]
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        features: Tensor,
        targets: Tensor,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "logistic",
        lam: float = 1e-3,
        variant: str = "nl1",
        compressor: Compressor | None = None,
        eta: float | None = None,
        gamma: float | None = None,
        cubic_reg: float | None = None,
        option: int = 1,
        num_nodes: int | None = None,
        process_group: Any = None,
        server_rank: int = 0,
        generator: torch.Generator | None = None,
        accounting: str = "theory",
        h0: Tensor | None = None,
        solver: str = "cholesky",
        solve_dtype: torch.dtype | None = None,
    ) -> None:
        phi = glm_loss(loss)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        lam = check_number("lam", lam, strict=variant == "nl1")
        if compressor is not None and not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, got {type(compressor).__name__}")
        if option not in (1, 2):
            raise ValueError(f"option must be 1 or 2, got {option!r}")
        acc.canonical(accounting)  # "theory", "authors-code", "authors-text" (or an alias)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "cholesky_update" and variant != "nl1":
            raise ValueError(
                "solver='cholesky_update' applies to variant='nl1' only (NL2/CNL rescale the "
                "whole matrix by β every iteration)"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

        super().__init__(params, dict(lam=lam))
        plist = [p for g in self.param_groups for p in g["params"]]
        if len(plist) != 1:
            raise ValueError(f"params must hold exactly one tensor (x), got {len(plist)}")
        (p,) = plist
        d = p.numel()
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != d:
            raise ValueError(
                f"features must be a (rows, d={d}) tensor matching the parameter's {d} elements, "
                f"got {getattr(features, 'shape', type(features).__name__)}"
            )
        if features.layout not in (torch.strided, torch.sparse_csr, torch.sparse_coo):
            raise ValueError(
                f"features must be a dense, sparse CSR or sparse COO tensor, got {features.layout}"
            )
        if not features.is_floating_point() or features.dtype != p.dtype:
            raise TypeError(
                f"features must have the parameter's dtype {p.dtype}, got {features.dtype}"
            )
        if features.device != p.device:
            raise ValueError(f"features are on {features.device}, the parameter on {p.device}")
        if not isinstance(targets, Tensor) or targets.shape != features.shape[:1]:
            raise ValueError(
                f"targets must be a tensor of shape ({features.shape[0]},), "
                f"got {getattr(targets, 'shape', type(targets).__name__)}"
            )

        distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        self.transport = (
            CollectiveTransport(process_group, server_rank) if distributed else SimulatedTransport()
        )
        nodes = 1 if num_nodes is None else num_nodes
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        rows = features.shape[0]
        if rows % nodes or rows == 0:
            raise ValueError(
                f"features has {rows} rows, not divisible into num_nodes={nodes} equal shards; "
                f"drop the remainder (e.g. features[:{nodes * (rows // nodes)}]) as the paper does"
            )
        m = rows // nodes
        self.local_nodes, self.m, self.d = nodes, m, d
        self.num_nodes = nodes * self.transport.world_size
        if compressor is None:  # compression only pays where there is communication
            compressor = Identity() if self.num_nodes == 1 else RandK(1)
        self.compressor, self.loss = compressor, phi
        if acc.canonical(accounting) != "theory":  # refuses what the authors' count does not cover
            acc.paper_r(compressor, m, accounting)
        if variant != "nl1" and gamma is None and phi.gamma is None:
            raise ValueError("gamma (>= sup|phi''|) is needed for a custom loss with nl2/cnl")
        # the options live in the param group (repr, state_dict and checkpoints see them)
        options = dict(
            variant=variant,
            option=option,
            accounting=accounting,
            solver=solver,
            eta=1.0 / (compressor.omega(m) + 1.0)
            if eta is None
            else check_number("eta", eta, strict=True),
            gamma=None
            if variant == "nl1"
            else check_number("gamma", phi.gamma if gamma is None else gamma, strict=True),
            cubic_reg=None,
        )
        self.defaults.update(options)
        self.param_groups[0].update(options)
        self.solve_dtype = solve_dtype or (
            torch.float64 if d <= MAX_FLOAT64_SOLVE else features.dtype
        )
        self._shard, self._targets = GLMShard(features), targets
        self._loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss))
        refusal = data_error(self._shard, targets, loss)
        try:  # every rank learns whether some rank's data was refused: none goes on alone
            self.transport.check_agreement(
                dict(
                    nodes_per_rank=nodes,
                    rows_per_node=m,
                    features=d,
                    dtype=[torch.float16, torch.bfloat16, torch.float32, torch.float64].index(
                        features.dtype
                    ),
                    variant=VARIANTS.index(variant),
                    option=option,
                    solver=SOLVERS.index(solver),
                    finite_features_and_valid_targets=int(refusal is None),
                )
            )
        except ProtocolError:
            if refusal is not None:
                raise ValueError(refusal) from None
            raise
        if refusal is not None:
            raise ValueError(refusal)

        self.generator = generator
        if generator is None:
            self.generator = owned_generator()
        self.transport.broadcast_generator(self.generator)
        with torch.no_grad():
            p.copy_(self.transport.broadcast_from_server(p.detach()))
        if variant == "cnl":
            if cubic_reg is None:
                if phi.nu is None:
                    raise ValueError("cubic_reg (M) is needed for a custom loss with cnl")
                R = self.transport.max_everywhere(self._shard.max_row_norm().to(torch.float64))
                cubic_reg = phi.nu * float(R) ** 3
            cubic_reg = check_number("cubic_reg", cubic_reg, strict=False)
            self.defaults["cubic_reg"] = self.param_groups[0]["cubic_reg"] = cubic_reg
        self._initialise(p, h0)

    # ---- initialisation --------------------------------------------------------------------

    def _initialise(self, p: Tensor, h0: Tensor | None) -> None:
        """``h^0`` on the nodes; the server's ``H^0`` (NL1) or ``A^0, B`` (NL2/CNL) from the
        nodes' local matrices (the initialisation message)."""
        shape = (self.local_nodes, self.m)
        with torch.no_grad():
            x0 = p.detach().reshape(-1)
            value, grad, hx0 = glm_node_terms(self._shard, self._targets, x0, self.loss)
            if h0 is None:
                h0 = hx0
            elif not isinstance(h0, Tensor) or h0.numel() != self.local_nodes * self.m:
                raise ValueError(f"h0 must be a tensor with {shape[0]}·{shape[1]} elements")
            h = h0.detach().to(device=p.device, dtype=p.dtype).reshape(shape).clone()
            # the regulariser too, as the server evaluates P (‖x⁰‖² may overflow alone)
            xs = x0.to(self.solve_dtype)
            self._check_start(x0, value + self._lam / 2 * xs.dot(xs), grad, hx0, h)
            nm = self.num_nodes * self.m
            local = [self._shard.weighted_gram(h.reshape(-1))]
            if self.variant != "nl1":
                local.append(self._shard.weighted_gram(torch.ones_like(h.reshape(-1))))
            mats = self.transport.sum_to_server(torch.stack(local).to(self.solve_dtype)) / nm
        state = self.state[p]
        state["history"] = []
        state["h"] = h
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["skipped_steps"] = torch.zeros((), dtype=torch.int64)
        bits = acc.init_bits(
            self.accounting, self.variant, self.option, self.num_nodes, self.m, self.d
        )
        state["bits_sent"] = torch.tensor(bits, dtype=torch.float64)
        if not self.transport.is_server:
            return
        if self.variant == "nl1":
            state["H"] = mats[0].contiguous()
            if self.solver == "cholesky_update":
                state["chol"] = torch.linalg.cholesky(shifted(state["H"], self._lam))
                state["chol_lam"] = float(self._lam)  # λ of the factor: refactor when it changes
                state["refactorizations"] = 0
        else:
            state["A"] = (mats[0] + 2 * self.gamma * mats[1]).contiguous()
            state["B"] = mats[1].contiguous()

    def _check_start(self, x0: Tensor, value: Tensor, grad: Tensor, hx0: Tensor, h: Tensor) -> None:
        """Refuse a start where ``P`` (``value``: the nodes' ``Σφ`` plus ``λ‖x⁰‖²/2``), ``∇P`` or
        ``h(x⁰)`` is not finite (``x`` would never move: every step skipped), a non-finite ``h⁰``
        (a NaN ``H⁰``) or, NL1, a negative one; on every rank when one rank's start is refused,
        before anything is built."""
        bad_x0 = int((~torch.isfinite(hx0)).sum()) + int(not bool(torch.isfinite(x0).all()))
        bad_x0 += int(not bool(torch.isfinite(value) & torch.isfinite(grad).all()))
        bad_h, negative = int((~torch.isfinite(h)).sum()), bool((h < 0).any())
        negative = negative and self.variant == "nl1"
        local = [bad_x0 > 0, bad_h > 0, negative]
        every = self.transport.max_everywhere(torch.tensor(local, dtype=torch.float64))
        if bad_x0:
            where = (
                "x⁰ (the parameter) has non-finite entries"
                if not bool(torch.isfinite(x0).all())
                else "φ, φ', φ'' = h(x⁰) or λ‖x⁰‖²/2 overflows there"
            )
            raise ValueError(
                f"loss={self._loss_name!r} is not finite at x⁰ ({where}): every step would be "
                "skipped. Start from another x⁰, or write φ in an overflow-safe form (e.g. "
                "softplus(-b*t) rather than log(1 + exp(-b*t)))"
            )
        if bad_h:
            raise ValueError(f"h0 is not finite: {bad_h} entries are NaN or ±inf")
        if negative:
            raise ValueError("h0 must be >= 0 for nl1 (H^0 must be positive semidefinite)")
        if bool(every.any()):
            raise ValueError(
                "NewtonLearn: another rank refused its start (its loss or h0 is not finite at "
                "x⁰, or h0 < 0 for nl1); see that rank's error"
            )

    @property
    def _lam(self) -> float:
        return self.param_groups[0]["lam"]

    variant = property(lambda self: self.param_groups[0]["variant"], doc="``nl1 | nl2 | cnl``")
    option = property(lambda self: self.param_groups[0]["option"], doc="Option 1 or 2")
    accounting = property(lambda self: self.param_groups[0]["accounting"], doc="bit count")
    solver = property(lambda self: self.param_groups[0]["solver"], doc="the server's solve")
    eta = property(lambda self: self.param_groups[0]["eta"], doc="learning rate of ``h``")
    gamma = property(lambda self: self.param_groups[0]["gamma"], doc="``γ`` (NL2, CNL)")
    cubic_reg = property(lambda self: self.param_groups[0]["cubic_reg"], doc="``M`` (CNL)")

    #: options a checkpoint must share with the optimizer it is loaded into (the state's layout)
    _STRUCTURAL = ("variant", "option", "solver")

    @property
    def _param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    @property
    def global_state(self) -> dict[str, Any]:
        """All of the optimizer's state (``x`` is its only parameter): ``"h"``, ``"step"``,
        ``"skipped_steps"``, ``"bits_sent"``, ``"history"``, the server's ``"H"``/``"A"``, ``"B"``,
        ``"chol"``, ``"chol_lam"``, ``"refactorizations"``."""
        return self.state[self._param]

    def counters(self) -> dict[str, int]:
        """``{"step": iterations, "skipped_steps": non-finite steps not applied}`` (host ints)."""
        return {key: int(self.global_state[key]) for key in ("step", "skipped_steps")}

    @property
    def history(self) -> list[dict[str, float]]:
        """Per iteration ``{"loss": P(x^k), "bits": cumulative bits, "time": seconds}``; kept in
        the state, so checkpoints (``state_dict``, ``torch.distributed.checkpoint``) carry it."""
        return self.global_state["history"]

    @history.setter
    def history(self, value: list[dict[str, float]]) -> None:
        self.global_state["history"] = value

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state of this process. Distributed, every rank holds its own nodes' ``h`` (and
        the server the matrices): save and load each rank's ``state_dict`` with ``torch.save``
        (``torch.distributed.checkpoint`` needs one process, where the state is global)."""
        self.global_state["generator_state"] = self.generator.get_state()
        out = super().state_dict()
        # a tuple: distributed checkpoints store it whole (a list of dicts would be flattened
        # into entries that a fresh optimizer's empty history has no place for)
        ((index, entry),) = out["state"].items()
        out["state"][index] = {**entry, "history": tuple(dict(h) for h in self.history)}
        return out

    #: entries of the state that are tensors of a fixed shape and dtype (``h``; the server's
    #: matrices), and counters (a number or a one-element tensor)
    _MATRICES = ("h", "H", "A", "B", "chol")
    _COUNTERS = ("step", "skipped_steps", "bits_sent", "refactorizations")

    def _checked_entry(self, state_dict: Any) -> dict[str, Any]:
        """The checkpoint's state entry, after checking that it fits this optimizer: one group
        with one parameter, the same structural options, every entry of this optimizer's
        state present, the matrices with this optimizer's shapes and dtypes. Raises
        ``ValueError`` naming the first difference."""

        def refuse(what: str) -> ValueError:
            return ValueError(f"NewtonLearn.load_state_dict: {what} (nothing was changed)")

        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise refuse("expected a dict with 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if (
            not isinstance(groups, (list, tuple))
            or len(groups) != 1
            or not isinstance(groups[0], dict)
            or len(groups[0].get("params", ())) != 1
        ):
            raise refuse(
                "the checkpoint is not of one parameter group holding one parameter, as "
                "NewtonLearn's (x)"
            )
        for key in self._STRUCTURAL:
            if key in groups[0] and groups[0][key] != self.param_groups[0][key]:
                raise refuse(
                    f"the checkpoint has {key}={groups[0][key]!r}, this optimizer "
                    f"{self.param_groups[0][key]!r}; build the optimizer with the checkpoint's "
                    "options"
                )
        entries = state_dict["state"]
        if not isinstance(entries, dict) or len(entries) != 1:
            raise refuse("the checkpoint's state must have one entry (the parameter x)")
        (saved,) = entries.values()
        if not isinstance(saved, dict):
            raise refuse(f"the checkpoint's state entry is a {type(saved).__name__}, not a dict")
        mine = self.global_state
        needed = {k for k in mine if k not in ("history", "chol_lam")} | {"generator_state"}
        missing = sorted(needed - saved.keys())
        if missing:
            raise refuse(
                f"the checkpoint's state is missing {missing} (a checkpoint of another optimizer, "
                f"or of NewtonLearn with other options than variant={self.variant!r}, "
                f"solver={self.solver!r}?)"
            )
        for key in self._MATRICES:
            if key not in mine:
                continue
            got, want = saved[key], mine[key]
            if not isinstance(got, Tensor):
                raise refuse(f"state entry {key!r} is a {type(got).__name__}, not a tensor")
            if got.shape != want.shape or got.dtype != want.dtype:
                raise refuse(
                    f"state entry {key!r} has shape {tuple(got.shape)} and dtype {got.dtype}, "
                    f"this optimizer's {tuple(want.shape)} and {want.dtype} (another number of "
                    "nodes, rows per node or features, or another dtype)"
                )
        for key in (k for k in self._COUNTERS if k in saved):
            value = saved[key]
            if isinstance(value, Tensor) and value.numel() == 1 or isinstance(value, (int, float)):
                continue
            raise refuse(f"state entry {key!r} must be a number, got {value!r}")
        gen, want = saved["generator_state"], self.generator.get_state()
        if not isinstance(gen, Tensor) or gen.numel() != want.numel():
            raise refuse(
                f"state entry 'generator_state' must be a tensor of {want.numel()} bytes (a "
                f"{self.generator.device.type} torch.Generator's state)"
            )
        if "chol_lam" in saved and not isinstance(saved["chol_lam"], (int, float)):
            raise refuse(f"state entry 'chol_lam' must be a number, got {saved['chol_lam']!r}")
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of a NewtonLearn with the same options and problem size; anything
        else raises ``ValueError`` before anything changes."""
        saved = self._checked_entry(state_dict)
        # everything that can fail is computed before the first change
        history = [dict(h) for h in saved.get("history", state_dict.get("history", []))]
        mine, device = self.global_state, self._param.device
        loaded = {
            k: v.to(device, copy=True) if isinstance(v, Tensor) else v for k, v in saved.items()
        }
        for key in self._COUNTERS:  # as a fresh optimizer keeps them
            if key in loaded and isinstance(mine.get(key), Tensor):
                want = mine[key]
                loaded[key] = torch.as_tensor(saved[key]).reshape(()).to(want.device, want.dtype)
        if "chol" in loaded and "chol_lam" not in loaded:  # the factor was made for the group's λ
            loaded["chol_lam"] = float(state_dict["param_groups"][0].get("lam", self._lam))
        generator_state = saved["generator_state"].to("cpu", torch.uint8)

        current = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        # the base class installs a new state and new groups: the old ones are the backup
        old_state, old_groups = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            for key, value in current.items():  # version 0.1 saved only lam
                self.param_groups[0].setdefault(key, value)
            # the base class casts floating state to the parameter's dtype; the d×d matrices
            # are float64 on purpose and must come back exactly (on the parameter's device)
            state = self.global_state
            state.clear()
            state.update(loaded)
            self.generator.set_state(generator_state)
        except BaseException:
            self.state, self.param_groups = old_state, old_groups
            raise
        self.history = history  # version 0.1 kept the history next to the state

    # ---- one iteration ---------------------------------------------------------------------

    def _compress(self, delta: Tensor) -> Tensor:
        """``C(delta)`` per local node, the randomness drawn for all ``n`` nodes in node order
        (so every rank, and the simulated run, consume the generator identically)."""
        if self.transport.world_size == 1:
            return self.compressor(delta, self.generator)
        full = delta.new_zeros(self.num_nodes, self.m)
        start = self.transport.rank * self.local_nodes
        full[start : start + self.local_nodes] = delta
        return self.compressor(full, self.generator)[start : start + self.local_nodes]

    def _exchange(self, idx: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The learning messages' rows on the server: ``(rows, index, coef)`` such that the
        Hessian update is ``Σ_t coef_t rows[index_t] rows[index_t]ᵀ``. Simulated: the
        feature matrix itself. Distributed: ``[coef, a_ij]`` rows gathered (zero-padded to the
        longest message; padding has ``coef = 0`` and is dropped)."""
        if self.transport.world_size == 1:
            if self._shard.A is not None:
                return self._shard.A, idx, coef
            return self._shard.rows(idx), torch.arange(idx.numel()), coef
        width = int(self.transport.max_everywhere(torch.tensor([idx.numel()]))[0])
        msg = torch.cat([coef[:, None], self._shard.rows(idx)], 1)
        msg = torch.nn.functional.pad(msg.to(self.solve_dtype), (0, 0, 0, width - idx.numel()))
        got = self.transport.gather_to_server(msg)
        got = got[got[:, 0] != 0]
        return got[:, 1:], torch.arange(got.shape[0], device=got.device), got[:, 0]

    @torch.no_grad()
    def step(self, closure: None = None) -> Tensor:
        """One iteration; returns ``P(x^k)`` at the starting point (0-d tensor). A non-finite
        iteration changes nothing but the counters, bits and history (see the class)."""
        if closure is not None:
            raise TypeError(
                "NewtonLearn.step() takes no closure: the optimizer owns the data "
                "(features/targets) and evaluates P itself"
            )
        start = time.perf_counter()
        p, lam, d, nm = self._param, self._lam, self.d, self.num_nodes * self.m
        state = self.state[p]
        x = p.detach().reshape(-1)

        # nodes: gradient sums, coefficients h(x^k), compressed learning messages
        loss_sum, grad_sum, hx = glm_node_terms(self._shard, self._targets, x, self.loss)
        h = state["h"]
        hx = hx.reshape(h.shape)
        message = self._compress(hx - h)
        h_new, change, beta = learn_coefficients(self.variant, h, hx, message, self.eta, self.gamma)
        # non-finite coefficients here must not reach the server's model: the server counts
        # the nodes that report them and skips the whole step
        local_bad = ~(torch.isfinite(hx).all() & torch.isfinite(h_new).all())
        idx = change.reshape(-1).nonzero().squeeze(1)  # the a_ij to send (host sync: the count)
        coef = change.reshape(-1).index_select(0, idx) / nm
        local_bits = acc.realistic_iteration_bits(
            self.variant,
            self.option,
            self.local_nodes,
            d,
            float(self.compressor.message_bits(message).sum()),
            idx.numel(),
        )
        sums = self.transport.sum_to_server(
            torch.cat(
                [
                    grad_sum,
                    loss_sum[None],
                    grad_sum.new_tensor([local_bits]),
                    local_bad[None].to(grad_sum.dtype),
                ]
            ).to(self.solve_dtype)
        )
        if beta is not None:
            beta = self.transport.max_everywhere(beta.to(self.solve_dtype))
        weights = rows = None
        if (
            self.transport.world_size == 1
            and self.solver != "cholesky_update"
            and 2 * idx.numel() >= self._shard.num_rows
        ):
            # most coefficients changed (Identity on one node: all): one weighted Gram product
            # of the whole shard (BLAS or sparse × sparse) beats that many gathered outer
            # products
            weights = coef.new_zeros(self._shard.num_rows).index_put_((idx,), coef, True)
            ridx, rcoef = idx, coef  # (the rows themselves are not needed)
        else:
            rows, ridx, rcoef = self._exchange(idx, coef)

        # server: the Newton-type step and, when it is applied, the Hessian model's update. A
        # step is applied only when the gradient, the loss, every node's h(x^k) and h^{k+1} and
        # the new iterate are finite; otherwise x, h, H/A and the factor all stay as they were
        # (one NaN in h or H would make every later step a skipped one). The verdict travels
        # with the iterate, so every rank decides the same.
        payload = torch.empty(d + 4, dtype=self.solve_dtype, device=x.device)
        if self.transport.is_server:
            xs = x.to(self.solve_dtype)
            grad = sums[:d] / nm + lam * xs
            payload[d] = sums[d] / nm + lam / 2 * xs.dot(xs)
            payload[d + 1] = sums[d + 1]
            chol, refactored = self._current_factor(state, lam)
            direction = self._server_direction(state, grad, beta, chol)
            x_new = xs - direction
            # ½ ∇Pᵀ(H^k + λI)⁻¹∇P: the model's decrease, an estimate of P(x^k) − P*
            payload[d + 3] = 0.5 * grad.dot(direction)
            ok = torch.isfinite(x_new).all() & torch.isfinite(payload[d]) & (sums[d + 2] == 0)
            payload[:d] = torch.where(ok, x_new, xs)
            payload[d + 2] = ok
            if bool(ok):
                self._server_accumulate(state, rows, ridx, rcoef, chol, refactored, weights)
        payload = self.transport.broadcast_from_server(payload)

        p.copy_(payload[:d].to(p.dtype).view_as(p))
        if bool(payload[d + 2]):
            state["h"] = h_new
        else:
            state["skipped_steps"] += 1
        state["step"] += 1
        if acc.canonical(self.accounting) != "theory":
            it_bits = acc.nl_authors_iteration_bits(
                self.accounting, self.variant, self.compressor, self.m, d, self.num_nodes
            )
        else:
            it_bits = float(payload[d + 1])
        state["bits_sent"] += it_bits
        elapsed = time.perf_counter() - start + (self.history[-1]["time"] if self.history else 0.0)
        loss = payload[d].to(p.dtype)
        self.history.append(
            {
                "loss": float(loss),
                "bits": float(state["bits_sent"]),
                "time": elapsed,
                "gap_estimate": float(payload[d + 3]),
            }
        )
        return loss

    def fit(self, tol: float = 1e-10, max_iter: int = 100) -> list[dict[str, float]]:
        """Iterate until the estimate ``½ ∇P(x^k)ᵀ(H^k + λI)⁻¹∇P(x^k)`` of ``P(x^k) − P*`` is at
        most ``tol`` (the step from that ``x^k`` is taken too), or ``max_iter`` iterations.
        Returns the history of this call (``loss``, ``bits``, ``time``, ``gap_estimate`` per
        iteration); a ``RuntimeWarning`` says when ``max_iter`` stopped it.

        With ``H^k`` the learned Hessian model, the estimate is Newton's decrement of the model:
        once ``H^k`` has learned ``∇²f`` near ``x*`` (one node with ``Identity()``: after one
        iteration) it is within a factor close to 1 of the true gap.

        Example:
            >>> import torch
            >>> from torch_rankone import NewtonLearn
            >>> gen = torch.Generator().manual_seed(0)
            >>> A = torch.randn(200, 5, generator=gen, dtype=torch.float64)
            >>> b = torch.where(A[:, 0] > 0, 1.0, -1.0).double()
            >>> x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
            >>> history = NewtonLearn([x], A, b, lam=1e-3).fit(tol=1e-12)
            >>> history[-1]["gap_estimate"] <= 1e-12 and len(history) < 20
            True
        """
        check_number("tol", tol, strict=True)
        check_int("max_iter", max_iter)
        first = len(self.history)
        for _ in range(max_iter):
            self.step()
            if 0 <= self.history[-1]["gap_estimate"] <= tol:
                return self.history[first:]
        warn_at_caller(
            f"NewtonLearn.fit: max_iter={max_iter} iterations ended with the gap estimate "
            f"{self.history[-1]['gap_estimate']:.3g} > tol={tol:g}; raise max_iter"
        )
        return self.history[first:]

    def _current_factor(self, state: dict, lam: float) -> tuple[Tensor | None, int]:
        """The update solver's factor of ``H^k + λI`` for the group's current ``λ``:
        ``(factor, 0)`` as kept, or ``(fresh factor, 1)`` when ``lam`` changed since it was made
        (NaN when ``H^k + λI`` is not positive definite: the step is skipped). Committed to the
        state only with an applied step. ``(None, 0)`` for the other solvers."""
        if self.solver != "cholesky_update":
            return None, 0
        if state["chol_lam"] == lam:
            return state["chol"], 0
        chol, info = torch.linalg.cholesky_ex(shifted(state["H"], lam))
        return torch.where(info == 0, chol, torch.nan), 1

    def _server_direction(
        self, state: dict, grad: Tensor, beta: Tensor | None, chol: Tensor | None
    ) -> Tensor:
        """``(H^k + λI)⁻¹ ∇P`` (NL1/NL2; ``chol`` the update solver's factor) or minus the
        cubic step (CNL)."""
        lam = self._lam
        if self.variant == "nl1":
            if chol is not None:
                return solve_with_factor(chol, grad)
            return newton_direction(shifted(state["H"], lam), grad)
        Hk = beta * state["A"] - 2 * self.gamma * state["B"]
        if self.variant == "nl2":
            return newton_direction(shifted(Hk, lam), grad)
        return -cubic_step(shifted(Hk, lam), grad, self.cubic_reg)

    def _server_accumulate(
        self,
        state: dict,
        rows: Tensor,
        idx: Tensor,
        coef: Tensor,
        chol: Tensor | None = None,
        refactored: int = 0,
        weights: Tensor | None = None,
    ) -> None:
        """``H`` (or ``A``) ``+= Σ_t coef_t a_t a_tᵀ``; the update solver also moves the factor
        ``chol`` (of ``H + λI`` for the current ``λ``, see :meth:`_current_factor`) one rank-one
        term at a time (refactoring if a downdate fails) and keeps it."""
        M = state["H" if self.variant == "nl1" else "A"]
        coef = coef.to(M.dtype)
        if weights is not None:  # most rows changed: one weighted Gram product of the shard
            M += self._shard.weighted_gram(weights).to(M.dtype)
            return
        if rows.dtype != M.dtype:  # e.g. float32 features, float64 algebra
            rows, idx = rows.index_select(0, idx).to(M.dtype), torch.arange(idx.numel())
        _ext.gathered_outer_accumulate(M, rows, idx, coef)  # checks a host idx for free
        if chol is None:
            return
        for t in range(idx.numel()):
            chol, ok = cholesky_rank_one_update(chol, rows[idx[t]].to(M.dtype), coef[t])
            if not ok:
                chol = torch.linalg.cholesky(shifted(M, self._lam))
                refactored += 1
                break
        state["chol"], state["chol_lam"] = chol, float(self._lam)
        state["refactorizations"] += refactored
