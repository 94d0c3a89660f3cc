"""Checkpoints: the optimizer-global state convention (the first parameter's state), checkpoints
of version 0.1 (``tests/data/checkpoints_v0_1_0.pt``, written by that version: global state under
string keys of ``state``, NewtonLearn's history next to it) still load and continue exactly as
that version did, ``torch.distributed.checkpoint`` round trips NewtonLearn in one process (the
other optimizers, replicated and FSDP2-sharded: ``tests/test_scaling.py``), and state loaded
from the CPU moves to the parameters' device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from torch_rankone import FisherNewton, NeumannIHVP, NewtonLearn, RankOneNewton

LEGACY = Path(__file__).parent / "data" / "checkpoints_v0_1_0.pt"


def _mlp(out_dim: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out_dim)).double()


# how the 0.1.0 checkpoints were made: optimizer, output width, loss (per-sample for Fisher)
LEGACY_CASES = {
    "RankOneNewton": (lambda m: RankOneNewton(m.parameters(), rank=2, init_probes=2), 1),
    "NeumannIHVP": (lambda m: NeumannIHVP(m.parameters(), num_terms=3, momentum=0.5), 1),
    "FisherNewton": (lambda m: FisherNewton(m.parameters(), module=m, momentum=0.9), 3),
}


@pytest.fixture(scope="module")
def legacy() -> dict:
    return torch.load(LEGACY, weights_only=False)


@pytest.mark.parametrize("name", list(LEGACY_CASES))
def test_version_0_1_checkpoints_load_and_continue_exactly(legacy, name):
    saved, data = legacy[name], legacy["data"]
    make, out_dim = LEGACY_CASES[name]
    model = _mlp(out_dim)
    opt = make(model)
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved["params"]):
            p.copy_(v)
    assert any(isinstance(k, str) for k in saved["state_dict"]["state"])  # the old format
    opt.load_state_dict(saved["state_dict"])
    assert opt.global_state["step_calls"] == 3 and opt.counters()["step"] == 3

    def closure():
        if name == "FisherNewton":
            return nn.functional.cross_entropy(model(data["x"]), data["ycls"], reduction="none")
        return nn.functional.mse_loss(model(data["x"]), data["yreg"])

    opt.step(closure)
    for p, want in zip(model.parameters(), saved["next_params"]):
        assert torch.equal(p.detach(), want)
    # saved again, it is in the new format: no string keys outside the parameters' entries
    assert all(isinstance(k, int) for k in opt.state_dict()["state"])


def test_version_0_1_newton_learn_checkpoint_loads_with_its_history(legacy):
    saved, data = legacy["NewtonLearn"], legacy["data"]
    w = saved["params"][0].clone().requires_grad_(True)
    opt = NewtonLearn([w], data["A"], data["b"], num_nodes=4, lam=1e-3)
    opt.load_state_dict(saved["state_dict"])
    assert len(opt.history) == 3 and opt.counters()["step"] == 3
    opt.step()
    assert torch.equal(w.detach(), saved["next_params"][0])


def test_global_state_lives_in_the_first_parameters_entry():
    model = _mlp(1)
    opt = RankOneNewton(model.parameters())
    first = next(model.parameters())
    assert opt.global_state is opt.state[first]
    # a fresh optimizer already holds every entry a step creates (checkpoint templates need it)
    keys = {p: set(opt.state[p]) for p in model.parameters()}
    x = torch.randn(8, 4, dtype=torch.float64)
    opt.step(lambda: model(x).pow(2).mean())
    assert keys == {p: set(opt.state[p]) - {"generator_state"} for p in model.parameters()}
    assert opt.counters() == {"step": 1, "skipped_steps": 0, "safeguard_hits": 0}
    with pytest.raises(KeyError, match="global_state"):
        opt.state["skipped_steps"]  # the 0.1 location says where the entry went
    assert all(not isinstance(k, str) for k in opt.state)


def test_newton_learn_round_trips_through_distributed_checkpoint(tmp_path):
    """One process: ``get_optimizer_state_dict``/``dcp.save``, a fresh optimizer loads it and the
    next iterations (and the history) equal the uninterrupted run exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    b = torch.where(torch.rand(40, generator=gen) < 0.5, -1.0, 1.0).double()

    def build():
        holder = nn.Module()
        holder.x = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        return holder, NewtonLearn(
            [holder.x], A, b, num_nodes=4, lam=1e-3, solver="cholesky_update"
        )

    holder, opt = build()
    for _ in range(3):
        opt.step()
    dcp.save({"optim": get_optimizer_state_dict(holder, opt)}, checkpoint_id=str(tmp_path))
    x_saved = holder.x.detach().clone()
    for _ in range(2):
        opt.step()

    holder2, opt2 = build()
    with torch.no_grad():
        holder2.x.copy_(x_saved)
    template = {"optim": get_optimizer_state_dict(holder2, opt2)}
    dcp.load(template, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(holder2, opt2, template["optim"])
    assert len(opt2.history) == 3
    for _ in range(2):
        opt2.step()
    assert torch.equal(holder2.x, holder.x)
    assert [h["loss"] for h in opt2.history] == [h["loss"] for h in opt.history]
    assert torch.equal(opt2.global_state["chol"], opt.global_state["chol"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [RankOneNewton, NeumannIHVP])
def test_a_cpu_checkpoint_loads_onto_cuda_parameters(cls):
    """torch copies string-keyed and 'step' state unchanged; the counters must still move to
    the parameters' device, or the next step would mix devices."""
    model = _mlp(1)
    opt = cls(model.parameters())
    x = torch.randn(8, 4, dtype=torch.float64)
    opt.step(lambda: model(x).pow(2).mean())
    saved = opt.state_dict()
    model.cuda()
    opt2 = cls(model.parameters())
    opt2.load_state_dict(saved)
    assert all(
        v.device.type == "cuda"
        for st in opt2.state.values()
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and k != "generator_state"
    )
    opt2.step(lambda: model(x.cuda()).pow(2).mean())
    assert opt2.counters()["step"] == 2


def test_newton_learn_options_are_in_the_param_group_and_checked_on_load(legacy):
    data = legacy["data"]
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    nl1 = NewtonLearn([x], data["A"], data["b"], num_nodes=4, lam=1e-3)
    assert "variant: nl1" in repr(nl1) and nl1.param_groups[0]["eta"] == nl1.eta
    nl1.step()
    saved = nl1.state_dict()
    y = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    nl2 = NewtonLearn([y], data["A"], data["b"], num_nodes=4, lam=1e-3, variant="nl2")
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in nl2.global_state.items()}
    with pytest.raises(ValueError, match="variant='nl1'.*nothing was changed"):
        nl2.load_state_dict(saved)
    assert nl2.global_state.keys() == before.keys() and nl2.variant == "nl2"
    assert all(
        torch.equal(v, before[k]) if torch.is_tensor(v) else v == before[k]
        for k, v in nl2.global_state.items()
    )
