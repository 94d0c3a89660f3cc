"""One conformance suite for every optimizer of the package and every curvature source it takes
(as torch's own ``OptimizerInfo`` suite does for ``torch.optim``): resume, masking of non-finite
steps, distributed checkpoints, schedulers, param groups, dtypes, frozen and empty parameters,
``repr``. The per-optimizer files keep only what is specific to each method (its formula
against a dense reference)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _optim_problems import PaperFisherNewton, PaperNeumannIHVP, PaperRankOneNewton
from torch import nn

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., torch.optim.Optimizer]
    source: str  # "graph" | "loss_closure" | "backward_closure" | "per_sample"


CASES = (
    [
        Case("RankOneNewton", RankOneNewton, source)
        for source in ("graph", "loss_closure", "backward_closure")
    ]
    + [
        Case(
            "RankOneNewton-isotropic",
            lambda p, **k: RankOneNewton(p, preconditioner="isotropic", **k),
            "graph",
        ),
        Case("NeumannIHVP", lambda p, **k: NeumannIHVP(p, num_terms=3, **k), "graph"),
        Case("NeumannIHVP", lambda p, **k: NeumannIHVP(p, num_terms=3, **k), "loss_closure"),
        Case("NeumannIHVP", lambda p, **k: NeumannIHVP(p, num_terms=3, **k), "backward_closure"),
        Case("FisherNewton", FisherNewton, "per_sample"),
    ]
    + [  # the papers' exact formulas: fixed damping, the slides' isotropic rank-one step
        Case(
            "RankOneNewton-paper",
            lambda p, **k: PaperRankOneNewton(p, damping=0.5, **k),
            "loss_closure",
        ),
        Case("NeumannIHVP-paper", lambda p, **k: PaperNeumannIHVP(p, num_terms=4, **k), "graph"),
        Case(
            "FisherNewton-paper",
            lambda p, **k: PaperFisherNewton(p, damping=0.1, **k),
            "per_sample",
        ),
    ]
)
IDS = [f"{c.name}-{c.source}" for c in CASES]


class Setup:
    """A small tanh MLP with cross-entropy on fixed data, and a ``step`` in ``case.source``."""

    def __init__(self, case: Case, *, dtype=torch.float64, seed: int = 0, **opt_kwargs) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
        gen = torch.Generator().manual_seed(1)  # the same data whatever the initialisation
        self.X = torch.randn(32, 4, generator=gen, dtype=dtype)
        self.Y = torch.randint(0, 3, (32,), generator=gen)
        self.case = case
        self.opt = case.make(self.model.parameters(), **opt_kwargs)
        self.scale = 1.0  # multiplies the loss: NaN makes a non-finite step

    def losses(self) -> torch.Tensor:
        out = nn.functional.cross_entropy(self.model(self.X), self.Y, reduction="none")
        return out * self.scale

    def step(self):
        source, opt = self.case.source, self.opt
        if source == "per_sample":
            return opt.step(self.losses)
        if source == "loss_closure":
            return opt.step(lambda: self.losses().mean())
        if source == "backward_closure":

            def closure():
                opt.zero_grad()
                loss = self.losses().mean()
                loss.backward()
                return loss

            return opt.step(closure)
        opt.zero_grad()
        self.losses().mean().backward(create_graph=True)
        return opt.step()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_resume_is_bit_for_bit(case):
    run = Setup(case)
    for _ in range(2):
        run.step()
    saved_model = copy.deepcopy(run.model.state_dict())
    saved_opt = copy.deepcopy(run.opt.state_dict())
    for _ in range(3):
        run.step()
    resumed = Setup(case, seed=5)  # another initialisation and generator, all overwritten
    resumed.model.load_state_dict(saved_model)
    resumed.opt.load_state_dict(saved_opt)
    for _ in range(3):
        resumed.step()
    assert torch.equal(resumed.flat(), run.flat())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_distributed_checkpoint_resume_is_bit_for_bit(case, tmp_path):
    """``torch.distributed.checkpoint`` in one process: a fresh optimizer (another initialisation
    and seed) is a complete template, loads the checkpoint and continues exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    run = Setup(case)
    for _ in range(2):
        run.step()
    dcp.save(
        {
            "model": get_model_state_dict(run.model),
            "optim": get_optimizer_state_dict(run.model, run.opt),
        },
        checkpoint_id=str(tmp_path),
    )
    for _ in range(2):
        run.step()
    resumed = Setup(case, seed=5)
    sd = {
        "model": get_model_state_dict(resumed.model),
        "optim": get_optimizer_state_dict(resumed.model, resumed.opt),
    }
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_model_state_dict(resumed.model, sd["model"])
    set_optimizer_state_dict(resumed.model, resumed.opt, sd["optim"])
    for _ in range(2):
        resumed.step()
    assert torch.equal(resumed.flat(), run.flat())
    assert resumed.opt.counters() == run.opt.counters()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_finite_loss_is_masked_and_counted(case):
    run = Setup(case)
    run.step()
    x, state = run.flat().clone(), copy.deepcopy(run.opt.state_dict())
    run.scale = float("nan")
    run.step()
    assert torch.equal(run.flat(), x)
    after = run.opt.state_dict()
    counters = run.opt.counters()
    assert counters["skipped_steps"] == 1 and counters["step"] == 1
    optimizer_global = {
        "step_calls",
        "generator_state",
        "damping",
        "scale",
        "lambda_max",
        *counters,
    }
    for index, entry in after["state"].items():  # per-parameter buffers and averages untouched
        for key, value in entry.items():
            if key not in optimizer_global:
                assert _tensors_equal(value, state["state"][index][key]), (index, key)
    run.scale = 1.0
    with pytest.warns(RuntimeWarning, match="skipped_steps"):
        run.step()  # call 2 is a sync point: the skipped call is reported
    assert not torch.equal(run.flat(), x)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lr_scheduler_and_zero_lr(case):
    run = Setup(case)
    sched = torch.optim.lr_scheduler.StepLR(run.opt, step_size=1, gamma=0.0)
    run.step()
    sched.step()
    assert run.opt.param_groups[0]["lr"] == 0.0
    x = run.flat().clone()
    run.step()
    assert torch.equal(run.flat(), x)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_param_groups_and_add_param_group(case):
    """A group with lr = 0 does not move; a group added later trains from then on."""
    torch.manual_seed(0)
    run = Setup(case)
    first, second = run.model[0], run.model[2]
    run.opt = case.make([{"params": first.parameters(), "lr": 0.0}])
    frozen_first = [p.detach().clone() for p in first.parameters()]
    before = [p.detach().clone() for p in second.parameters()]
    run.step()
    assert all(torch.equal(p, b) for p, b in zip(second.parameters(), before))
    run.opt.add_param_group({"params": list(second.parameters())})
    run.step()
    assert not all(torch.equal(p, b) for p, b in zip(second.parameters(), before))
    assert all(torch.equal(p, b) for p, b in zip(first.parameters(), frozen_first))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dtypes_lower_the_loss(case, dtype):
    run = Setup(case, dtype=dtype)
    with torch.no_grad():
        first = run.losses().mean().item()
    for _ in range(10):
        run.step()
    with torch.no_grad():
        assert run.losses().mean().item() < first
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_frozen_and_zero_size_parameters(case):
    """``requires_grad=False`` parameters are left alone; a zero-size parameter is accepted."""
    run = Setup(case)
    frozen = run.model[0].bias
    frozen.requires_grad_(False)
    empty = nn.Parameter(torch.zeros(0, dtype=torch.float64))
    run.opt = case.make([*run.model.parameters(), empty])
    before = frozen.detach().clone()
    run.step()
    assert torch.equal(frozen, before)
    assert empty.shape == (0,)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_repr_names_the_class_and_options(case):
    run = Setup(case)
    text = repr(run.opt)
    assert type(run.opt).__name__ in text and "lr" in text
