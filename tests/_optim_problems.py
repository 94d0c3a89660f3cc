"""Small problems with dense float64 references for the optimizer tests."""

from __future__ import annotations

import functools

import torch
from torch.autograd.functional import hessian
from torch.func import functional_call

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton
from torch_rankone._tensorlist import flatten, unflatten

F64 = torch.float64

#: The papers' formulas as written — the isotropic rank-one step with ``α = damping`` and the
#: Neumann series with an absolute ``λ`` — which the dense references of these tests implement.
#: The package's defaults (diagonal plus low rank, relative damping) are tested separately.
PaperRankOneNewton = functools.partial(
    RankOneNewton, preconditioner="isotropic", damping_mode="fixed"
)
PaperNeumannIHVP = functools.partial(NeumannIHVP, damping_mode="fixed")
PaperFisherNewton = functools.partial(FisherNewton, lr=1.0, damping_mode="fixed")


class MLPProblem:
    """Tanh MLP 4-5-2 (37 parameters) with cross-entropy on 16 fixed samples."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = F64, batch: int = 16) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
        ).to(dtype)
        gen = torch.Generator().manual_seed(seed + 100)
        self.X = torch.randn(batch, 4, generator=gen, dtype=dtype)
        self.Y = torch.randint(0, 2, (batch,), generator=gen)
        self.params = list(self.model.parameters())
        self.names = [n for n, _ in self.model.named_parameters()]
        self.x0 = self.flat().clone()

    def flat(self) -> torch.Tensor:
        return flatten([p.detach() for p in self.params])

    def set(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, unflatten(x, self.params)):
                p.copy_(v)

    def per_sample_losses(self) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.model(self.X), self.Y, reduction="none")

    def loss(self) -> torch.Tensor:
        return self.per_sample_losses().mean()

    # closures of the three conventions
    def loss_closure(self):
        return self.loss

    def backward_closure(self, opt):
        def closure():
            opt.zero_grad()
            loss = self.loss()
            loss.backward()
            return loss

        return closure

    # dense references, functions of the flat parameter vector
    def f(self, z: torch.Tensor, rows=None) -> torch.Tensor:
        X, Y = (self.X, self.Y) if rows is None else (self.X[rows], self.Y[rows])
        ps = dict(zip(self.names, unflatten(z, self.params)))
        return torch.nn.functional.cross_entropy(functional_call(self.model, ps, (X,)), Y)

    def grad(self, z):
        return torch.func.grad(self.f)(z)

    def hessian(self, z):
        return hessian(self.f, z)

    def per_sample_jacobian(self, z):
        """(B, N): row s is ∇ℓ_s, by an explicit loop (independent of vmap)."""
        return torch.stack(
            [torch.func.grad(lambda w, s=s: self.f(w, rows=[s]))(z) for s in range(len(self.Y))]
        )


def same_direction(params, seed: int) -> torch.Tensor:
    """The unit direction an optimizer with ``generator=Generator().manual_seed(seed)`` draws."""
    gen = torch.Generator().manual_seed(seed)
    z = flatten([torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params])
    return z / z.norm()


def bce_per_sample(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, one value per row (``reduction="none"``)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(
        out.squeeze(-1), t, reduction="none"
    )


def fit_to_optimum(model: torch.nn.Module, mean_loss, wd: float) -> torch.nn.Module:
    """Train ``model`` to the optimum of ``mean_loss() + (wd/2)‖params‖²`` by L-BFGS with a
    strong-Wolfe line search (gradient tolerance 1e-12): influence functions assume it."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = mean_loss() + wd / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model
