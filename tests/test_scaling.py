"""Scaling out (two gloo ranks, float64): FSDP2-sharded and DDP-wrapped models follow the
one-process run on the union batch; DCP checkpoints resume bit for bit, with and without FSDP2;
under DDP the optimizer adds one scalar per step to DDP's own traffic; ranks holding different
parameter lists fail on every rank with a clear error. Also: a ``torch.compile``'d model trains
with finite-difference HVPs.

The workers run ``tests/_scaling_worker.py`` through ``tests/_dist_harness.py``; the references
run here with the same code (``_scaling_worker.run``) on all rows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist_harness import DEADLINE_S, Ranks
from _scaling_worker import OPTIMIZERS, STEPS, flat, model, run
from torch.nn import functional as F

from torch_rankone import RankOneNewton
from torch_rankone.optim import CurvatureError

multi_process = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)

WORKER = Path(__file__).with_name("_scaling_worker.py")
SCENARIOS = (
    "fsdp",
    "ddp",
    "collective_bytes",
    "dcp",
    "fsdp_refusals",
    "mismatched_order",
    "extra_parameter",
)
TIGHT = 1e-10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Ranks:
    # a short collective timeout: a mismatch must be an error well within it, never a hang
    return Ranks(WORKER, tmp_path_factory.mktemp("scaling"), SCENARIOS, collective_timeout_s=20)


@functools.cache
def reference(name: str) -> dict:
    with torch.random.fork_rng():
        return run(name)


def relative_error(result: dict, ref: dict) -> float:
    """Largest per-step ``‖x_k − x_k^ref‖ / ‖x_k^ref − x_0‖``."""
    x0 = flat(model())
    diff = (result["trajectory"] - ref["trajectory"]).norm(dim=1)
    return float((diff / (ref["trajectory"] - x0).norm(dim=1)).max())


@multi_process
@pytest.mark.parametrize("wrap", ["fsdp", "ddp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_and_ddp_models_follow_the_union_batch_run(ranks, wrap, name):
    """Every rank's whole parameters after each step equal the one-process run on the union
    batch to 1e-10 (finite-difference HVPs of gradients that FSDP2/DDP averaged), and the
    returned loss is the union batch's."""
    ref = reference(name)
    for rank, result in enumerate(ranks.results(wrap)):
        got = result[name]
        assert got["skipped_steps"] == 0 and got["step"] == STEPS
        err = relative_error(got, ref)
        assert err < TIGHT, f"rank {rank}: {name} under {wrap} departs by {err:.2e}"
        assert torch.allclose(got["losses"], ref["losses"], rtol=1e-10, atol=0)


@multi_process
def test_the_reference_comparison_can_fail(ranks):
    """Another optimizer's trajectory is far from the reference (the comparison has teeth)."""
    fsdp = ranks.results("fsdp")[0]
    assert relative_error(fsdp["neumann"], reference("rank_one")) > 1e-2


@multi_process
def test_sharded_models_refuse_what_autograd_cannot_reach(ranks):
    for rank, result in enumerate(ranks.results("fsdp_refusals")):
        for source, message in result["messages"].items():
            assert message is not None, f"rank {rank}: {source} was accepted under FSDP2"
            assert "backward" in message, message
        assert result["unchanged"], f"rank {rank}: a refused step changed the parameters"


@multi_process
def test_under_ddp_the_optimizer_adds_one_scalar_per_step(ranks):
    """Bytes per step sent by the optimizer's own collectives (steps 2-4; the first also checks
    the replicas and broadcasts the generator) against DDP's (three backward passes: the point
    and the two finite-difference points). Not trusting DDP (``grads_synced=False``) averages the
    gradient and the HVP again: two gradients more, in buckets."""
    for rank, result in enumerate(ranks.results("collective_bytes")):
        trusted, again = result["default"], result["not_synced"]
        gradient = trusted["gradient_bytes"]
        assert trusted["optimizer_bytes_per_step"] == 8, (rank, trusted)  # the loss, float64
        assert trusted["ddp_bytes_per_step"] == 3 * gradient, (rank, trusted)
        assert again["optimizer_bytes_per_step"] == 2 * gradient + 8, (rank, again)
        # averaged in buckets (40 elements in this run; the largest tensor has 35): no
        # collective carries the whole 66-element gradient
        assert again["largest_collective_numel"] <= 40, (rank, again)


@multi_process
def test_distributed_checkpoints_resume_bit_for_bit(ranks):
    """``get_optimizer_state_dict`` + ``dcp.save``, then a fresh model and optimizer (another
    initialisation and seed) with ``dcp.load`` + ``set_optimizer_state_dict``: the next steps
    equal the uninterrupted run exactly, replicated and FSDP2-sharded."""
    for rank, result in enumerate(ranks.results("dcp")):
        assert len(result) == 6
        for case, got in result.items():
            assert torch.equal(got["resumed"], got["uninterrupted"]), (rank, case)
            assert got["step"] == 4 and got["skipped_steps"] == 0, (rank, case)


@multi_process
@pytest.mark.parametrize("scenario", ["mismatched_order", "extra_parameter"])
def test_mismatched_parameter_lists_raise_on_every_rank(ranks, scenario):
    launch = ranks.launch(scenario)
    assert not launch.timed_out and launch.seconds < DEADLINE_S
    for rank, result in enumerate(ranks.results(scenario)):
        message = result["raised"]
        assert message is not None, f"rank {rank} stepped with a mismatched parameter list"
        assert "different parameter lists" in message and "rank 1" in message, message


def test_compiled_model_trains_with_finite_differences():
    """``torch.compile`` (``aot_eager``): finite-difference HVPs through the compiled model equal
    those of the eager model, and the exact modes refuse with a clear error."""
    torch._dynamo.reset()
    X = torch.randn(32, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))

    def train(compiled: bool) -> torch.Tensor:
        net = model()
        fwd = torch.compile(net, backend="aot_eager") if compiled else net
        opt = RankOneNewton(net.parameters(), generator=torch.Generator().manual_seed(2))

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(fwd(X), Y)
            loss.backward()
            return loss

        losses = [float(opt.step(closure)) for _ in range(5)]
        assert losses[-1] < losses[0]
        return flat(net)

    assert torch.allclose(train(True), train(False), rtol=1e-9, atol=1e-12)
    # refused after a compiled backward ran (at gradient time) and on a fresh compilation (at
    # the first HVP, where torch raises its own RuntimeError)
    for fresh in (False, True):
        if fresh:
            torch._dynamo.reset()
        net = model()
        fwd = torch.compile(net, backend="aot_eager")
        opt = RankOneNewton(net.parameters(), hvp="exact")
        with pytest.raises(CurvatureError, match="^the model's backward was compiled"):
            opt.step(lambda f=fwd: F.cross_entropy(f(X), Y))
        assert torch.equal(flat(net), flat(model()))
        assert opt.counters()["step"] == 0
