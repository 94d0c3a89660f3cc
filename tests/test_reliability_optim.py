"""Regression tests for defects found by trying bad inputs, faults and misuse on the HVP-based
optimizers: each test is named after what it checks and failed before its fix."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton
from torch_rankone.optim import CurvatureError

F64 = torch.float64
X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
Y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _same(m: nn.Module, saved: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, s) for p, s in zip(m.parameters(), saved))


# ---- a non-finite loss on a power-iteration step ---------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: NeumannIHVP(m.parameters()),  # scale estimated at the first call
        lambda m: RankOneNewton(
            m.parameters(),
            preconditioner="isotropic",
            damping_mode="theory",
            hessian_lipschitz=1.0,
        ),
        lambda m: FisherNewton(m.parameters(), module=m, fisher="true"),
    ],
    ids=["NeumannIHVP", "RankOneNewton-theory", "FisherNewton-true"],
)
def test_nonfinite_loss_on_a_power_iteration_step_is_masked_and_counted(make):
    m = _net()
    opt = make(m)
    before = _params(m)
    fisher = isinstance(opt, FisherNewton)
    if fisher:
        opt.step(lambda: (m(X) * float("nan"), Y))
    else:
        opt.step(lambda: F.cross_entropy(m(X), Y) * float("nan"))
    assert _same(m, before)
    assert opt.counters()["skipped_steps"] == 1 and opt.counters()["step"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped call is reported
        opt.step((lambda: (m(X), Y)) if fisher else (lambda: F.cross_entropy(m(X), Y)))
    assert opt.counters()["step"] == 1 and not _same(m, before)


# ---- FisherNewton's module= ------------------------------------------------------------------


def test_fisher_module_with_batchnorm_in_training_mode_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = FisherNewton(net.parameters(), module=net)
    before = _params(net)
    with pytest.raises(CurvatureError, match="BatchNorm1d.*training mode.*eval"):
        opt.step(lambda: F.cross_entropy(net(X), Y, reduction="none"))
    assert _same(net, before) and opt.global_state["step_calls"] == 1
    net[1].eval()  # with fixed statistics the samples do not interact: allowed
    opt.step(lambda: F.cross_entropy(net(X), Y, reduction="none"))
    assert opt.counters()["step"] == 1


class _Tokens(nn.Module):
    """A Linear applied to the flattened tokens of every sample (B·L rows, not B)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 5), nn.Linear(5 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.head(torch.tanh(self.lin(x.reshape(b * 4, 3))).reshape(b, 20))


def test_fisher_module_with_a_linear_on_flattened_tokens_equals_the_rows_run():
    tokens = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    labels = Y[:6]
    runs = []
    for module in (True, False):
        torch.manual_seed(0)
        net = _Tokens().double()
        opt = FisherNewton(net.parameters(), module=net if module else None)
        for _ in range(2):
            opt.step(lambda net=net: F.cross_entropy(net(tokens), labels, reduction="none"))
        runs.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert torch.allclose(runs[0], runs[1], rtol=1e-10, atol=1e-12)


# ---- parameters without a gradient -----------------------------------------------------------


@pytest.mark.parametrize("source", ["backward", "loss", "graph"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: RankOneNewton(ps, weight_decay=0.1),
        lambda ps: RankOneNewton(ps, preconditioner="isotropic", momentum=0.5, weight_decay=0.1),
        lambda ps: NeumannIHVP(ps, momentum=0.5, weight_decay=0.1),
    ],
    ids=["RankOneNewton", "RankOneNewton-isotropic", "NeumannIHVP"],
)
def test_parameters_without_gradient_are_left_alone(make, source):
    """As torch.optim: an unused head is not moved, not decayed, keeps ``.grad = None`` and its
    momentum buffer (directions are still drawn for it, so the random stream is unchanged)."""
    body, unused = _net(), nn.Linear(3, 2).double()
    opt = make(list(body.parameters()) + list(unused.parameters()))
    before = _params(unused)
    buffers = [copy.deepcopy(opt.state[p]) for p in unused.parameters()]
    for _ in range(3):
        if source == "backward":

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(body(X), Y)
                loss.backward()
                return loss

            opt.step(closure)
        elif source == "loss":
            opt.step(lambda: F.cross_entropy(body(X), Y))
        else:
            opt.zero_grad()
            F.cross_entropy(body(X), Y).backward(create_graph=True)
            opt.step()
    assert _same(unused, before) and all(p.grad is None for p in unused.parameters())
    for p, saved in zip(unused.parameters(), buffers):
        if "momentum_buffer" in saved:
            assert torch.equal(opt.state[p]["momentum_buffer"], saved["momentum_buffer"])
    assert opt.counters()["step"] == 3 and not _same(body, _params(_net()))


# ---- checkpoints of another optimizer --------------------------------------------------------


def _stepped(opt, m):
    opt.step(lambda: F.cross_entropy(m(X), Y, reduction="none").mean())
    return opt


@pytest.mark.parametrize("cls", [RankOneNewton, NeumannIHVP])
def test_load_state_dict_refuses_another_optimizers_state_and_changes_nothing(cls):
    m = _net()
    opt = _stepped(cls(m.parameters()), m)
    saved = copy.deepcopy(opt.state_dict())
    adam = torch.optim.Adam(m.parameters())
    F.cross_entropy(m(X), Y).backward()
    adam.step()
    other_cls = NeumannIHVP if cls is RankOneNewton else RankOneNewton
    others = {
        "Adam": adam.state_dict(),
        other_cls.__name__: _stepped(other_cls(m.parameters()), m).state_dict(),
        "FisherNewton": FisherNewton(m.parameters()).state_dict(),
    }
    wrong_shape = copy.deepcopy(saved)
    key = "momentum_buffer" if "momentum_buffer" in wrong_shape["state"][1] else None
    if key:
        wrong_shape["state"][1][key] = torch.zeros(7, dtype=F64)
        others["wrong shape"] = wrong_shape
    for what, state_dict in others.items():
        with pytest.raises(ValueError, match=f"{cls.__name__}.load_state_dict"):
            opt.load_state_dict(state_dict)
        now = opt.state_dict()
        assert now["param_groups"] == saved["param_groups"], what
        assert now["state"].keys() == saved["state"].keys(), what
    opt.step(lambda: F.cross_entropy(m(X), Y))  # still steps
    assert opt.counters()["step"] == 2


# ---- clear errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RankOneNewton, NeumannIHVP, FisherNewton])
def test_complex_parameters_are_refused(cls):
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="complex parameters"):
        cls([z])


def test_sparse_gradients_under_fd_are_refused():
    emb = nn.Embedding(10, 3, sparse=True).double()
    opt = RankOneNewton(emb.parameters(), hvp="fd")
    before = _params(emb)

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2, 3])).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(CurvatureError, match="sparse gradients.*sparse=False"):
        opt.step(closure)
    assert _same(emb, before)


def test_fisher_empty_batch_is_refused():
    m = _net()
    with pytest.raises(CurvatureError, match="empty"):
        FisherNewton(m.parameters(), module=m).step(
            lambda: F.cross_entropy(m(X[:0]), Y[:0], reduction="none")
        )


def test_fisher_closure_calling_backward_is_refused():
    m = _net()
    opt = FisherNewton(m.parameters(), module=m)

    def closure():
        losses = F.cross_entropy(m(X), Y, reduction="none")
        losses.mean().backward()
        return losses

    with pytest.raises(CurvatureError, match="called backward"):
        opt.step(closure)


def test_fisher_mixed_dtypes_are_refused():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(TypeError, match="one dtype.*float32.*float64"):
        FisherNewton(m.parameters())


def test_add_param_group_applies_the_constructors_checks():
    a, b = nn.Linear(3, 2).double(), nn.Linear(2, 2).double()
    opt = NeumannIHVP(a.parameters(), damping=1.0)
    for group, match in [
        ({"params": b.parameters(), "damping": 0.5}, "'damping' must be the same"),
        ({"params": b.parameters(), "lr": -1.0}, "lr"),
        ({"params": b.parameters(), "momentum": 1.0}, "momentum"),
    ]:
        with pytest.raises(ValueError, match=match):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": b.parameters(), "lr": 0.5})  # lr may differ
    assert len(opt.param_groups) == 2
    assert all(p in opt.state for p in b.parameters())
