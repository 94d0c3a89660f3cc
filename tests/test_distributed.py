"""Data parallel (SPEC §4, "Distributed data parallel"): two gloo ranks on loopback, each holding
half of a batch, follow the single-process trajectory on the union batch.

One pair of worker processes (``tests/_dist_worker.py``) runs every scenario, in order, for the
whole module; they rendezvous through a TCPStore this process serves on ``127.0.0.1`` (on a
socket bound to an OS-chosen port before they start, so no other process can take the port) and
save their results to a temporary folder. The single-process references run here, with the same
code on all 16 rows. Ranks are seeded differently (``torch.manual_seed(rank)``) so that only the
optimizer's broadcast of its generator can make the random directions agree. Workers are killed
at a deadline, so nothing hangs; a rank's failure is reported with its traceback.

Regression scenarios: FisherNewton with unequal per-rank batches (10 and 6 rows), a loss that is
non-finite on one rank only, and a ``generator=`` seeded differently on each rank.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist_harness import DEADLINE_S, WORLD, Ranks
from _dist_worker import INF_AT, UNEQUAL, make_problem, run_fisher, run_neumann, run_rank_one

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)

WORKER = Path(__file__).with_name("_dist_worker.py")
TIGHT = 1e-10  # float64 rounding only: union mean vs mean of the ranks' half-batch means
SCENARIOS = (  # run in this order by one pair of workers
    "rank_one_loss_closure",
    "rank_one_graph",
    "rank_one_explicit_generator",
    "rank_one_theory",
    "neumann",
    "ddp_fd",
    "process_group",
    "fisher",
    "fisher_unequal_batches",
    "nonfinite_loss_on_one_rank",
    "rank_one_generator_per_rank",
    "failing_rank",  # last: rank 1 fails on purpose, which ends the process group
)


# ------------------------------------------------------------------------------------------------
# Launching the workers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Ranks:
    """One run of every scenario by a pair of workers, shared by the tests of this module."""
    return Ranks(WORKER, tmp_path_factory.mktemp("dist"), SCENARIOS)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


@functools.cache
def reference(run, *args, rows_of: int | None = None, **kwargs) -> dict:
    """A single-process run here on the union batch (or on rank ``rows_of``'s rows), leaving the
    global RNG as it was; cached, the tests only read it."""
    prob = make_problem() if rows_of is None else make_problem(rows_of, WORLD)
    with torch.random.fork_rng():
        return run(prob, *args, **kwargs)


def trajectory_error(result: dict, ref: dict) -> torch.Tensor:
    """Per step: ``‖x_k − x_k^ref‖ / ‖x_k^ref − x_0‖`` (relative to the displacement)."""
    x0 = make_problem().x0
    diff = (result["trajectory"] - ref["trajectory"]).norm(dim=1)
    return diff / (ref["trajectory"] - x0).norm(dim=1)


def assert_follows(results: list[dict], ref: dict, tol: float, what: str) -> None:
    for r, res in enumerate(results):
        err = trajectory_error(res, ref)
        assert err.max() < tol, (
            f"rank {r}: {what} departs from the single-process reference; relative error per "
            f"step {[f'{e:.2e}' for e in err.tolist()]} (tolerance {tol:.0e})"
        )


def assert_ranks_agree(results: list[dict]) -> None:
    """Bit-for-bit: the ranks apply the same update to the same parameters."""
    for r, res in enumerate(results[1:], start=1):
        assert torch.equal(res["trajectory"], results[0]["trajectory"]), (
            f"rank {r} and rank 0 hold different parameters: max difference "
            f"{(res['trajectory'] - results[0]['trajectory']).abs().max():.3e}"
        )


def assert_grad_is_union_gradient(results: list[dict], ref: dict, tol: float) -> None:
    """After ``step``, ``.grad`` holds the (averaged) gradient of the union batch."""
    for r, res in enumerate(results):
        err = float((res["grad"] - ref["grad"]).norm() / ref["grad"].norm())
        assert err < tol, f"rank {r}: .grad after step is not the union-batch gradient ({err:.2e})"


def assert_seeded_differently(results: list[dict]) -> None:
    seeds = [res["initial_seed"] for res in results]
    assert len(set(seeds)) == len(seeds), f"ranks were meant to be seeded differently: {seeds}"


# ------------------------------------------------------------------------------------------------
# (a) plain model, each rank holds half of the batch
# ------------------------------------------------------------------------------------------------


def test_rank_one_loss_closure_follows_union_batch_run(ranks):
    results = ranks.results("rank_one_loss_closure")
    assert_seeded_differently(results)
    ref = reference(run_rank_one, "loss_closure", seed=0)  # rank 0's seed
    assert_follows(results, ref, TIGHT, "RankOneNewton (loss closure)")
    assert_ranks_agree(results)
    assert_grad_is_union_gradient(results, ref, TIGHT)
    # the test can tell: directions from rank 1's own seed would leave the reference far behind
    own_seed = reference(run_rank_one, "loss_closure", seed=1)
    assert trajectory_error(own_seed, ref).max() > 1e-3


def test_rank_one_graph_gradients_follow_union_batch_run(ranks):
    """``loss.backward(create_graph=True); opt.step()`` on every rank."""
    results = ranks.results("rank_one_graph")
    assert_seeded_differently(results)
    ref = reference(run_rank_one, "graph", seed=0)
    assert_follows(results, ref, TIGHT, "RankOneNewton (graph gradients)")
    assert_ranks_agree(results)
    assert_grad_is_union_gradient(results, ref, TIGHT)


def test_rank_one_explicit_generator_follows_union_batch_run(ranks):
    """``generator=Generator().manual_seed(7)`` on every rank (global seeds still differ)."""
    results = ranks.results("rank_one_explicit_generator")
    assert_seeded_differently(results)
    ref = reference(run_rank_one, "loss_closure", seed=0, gen_seed=7)
    assert_follows(results, ref, TIGHT, "RankOneNewton (explicit generator)")
    assert_ranks_agree(results)
    owned = reference(run_rank_one, "loss_closure", seed=0)
    assert trajectory_error(owned, ref).max() > 1e-3  # the explicit generator is what was used


def test_rank_one_theory_damping_with_estimated_lambda_max(ranks):
    """``damping_mode="theory"`` estimating λ_max by power iteration every 2 steps: its start
    vector is drawn from the (broadcast) generator and its HVPs are averaged too."""
    results = ranks.results("rank_one_theory")
    assert_seeded_differently(results)
    ref = reference(run_rank_one, "loss_closure", seed=0, theory=True)
    assert_follows(results, ref, TIGHT, "RankOneNewton (theory damping)")
    assert_ranks_agree(results)
    for r, res in enumerate(results):
        assert abs(res["lambda_max"] - ref["lambda_max"]) <= 1e-10 * ref["lambda_max"], (
            f"rank {r}: λ_max estimate {res['lambda_max']} vs union batch {ref['lambda_max']}"
        )


def test_neumann_ihvp_follows_union_batch_run(ranks):
    """NeumannIHVP with its scale estimated by power iteration (every 2 steps): the start
    vector comes from the broadcast generator, all HVPs are averaged."""
    results = ranks.results("neumann")
    assert_seeded_differently(results)
    ref = reference(run_neumann, seed=0)
    assert_follows(results, ref, TIGHT, "NeumannIHVP")
    assert_ranks_agree(results)
    assert_grad_is_union_gradient(results, ref, TIGHT)
    for r, res in enumerate(results):
        assert abs(res["scale"] - ref["scale"]) <= 1e-10 * ref["scale"], (
            f"rank {r}: estimated scale {res['scale']} vs union batch {ref['scale']}"
        )


def test_fisher_newton_uses_the_union_batch_fisher(ranks):
    """Per-sample gradients are all-gathered (rank 0's rows, then rank 1's): ``D`` is the Fisher
    of all 16 samples, ``g`` their mean gradient, and ``step`` returns the union mean loss."""
    results = [res["union"] for res in ranks.results("fisher")]
    ref = reference(run_fisher, seed=0)
    assert_follows(results, ref, TIGHT, "FisherNewton")
    assert_ranks_agree(results)
    assert_grad_is_union_gradient(results, ref, TIGHT)
    for r, res in enumerate(results):
        assert torch.allclose(res["losses"], ref["losses"], rtol=1e-12, atol=0), (
            f"rank {r}: step() returned {res['losses'].tolist()}, the union-batch mean losses "
            f"are {ref['losses'].tolist()}"
        )
    # the Fisher of a rank's own 8 rows would give a different trajectory
    local = reference(run_fisher, rows_of=0, seed=0)
    assert trajectory_error(local, ref).max() > 1e-3


def test_fisher_newton_implicit_linear_rows_gather_the_union_batch(ranks):
    """``module=model``: the ``nn.Linear`` layers' inputs and output gradients are what gets
    all-gathered; the step is still the union-batch Fisher step."""
    results = [res["union_module"] for res in ranks.results("fisher")]
    ref = reference(run_fisher, seed=0, module=True)
    assert_follows(results, ref, TIGHT, "FisherNewton(module=...)")
    assert_ranks_agree(results)
    materialised = reference(run_fisher, seed=0)
    assert trajectory_error(materialised, ref).max() < TIGHT  # same step, other representation


# ------------------------------------------------------------------------------------------------
# (b) DDP-wrapped model, backward closure, finite-difference HVPs
# ------------------------------------------------------------------------------------------------


def test_ddp_backward_closure_fd_follows_union_batch_run(ranks):
    """``DistributedDataParallel`` (gloo, CPU) with a zero_grad/backward/return-loss closure and
    ``hvp="fd"``, against the plain model on the union batch."""
    results = ranks.results("ddp_fd")
    assert_seeded_differently(results)
    ref_fd = reference(run_rank_one, "backward", seed=0, hvp="fd")
    ref_exact = reference(run_rank_one, "loss_closure", seed=0)
    # the same difference quotient of the same (averaged) gradients: rounding times 1/(2ε)
    assert_follows(results, ref_fd, 1e-8, "DDP + fd (vs single-process fd)")
    assert_follows(results, ref_exact, 1e-5, "DDP + fd (vs single-process exact HVP)")
    assert_ranks_agree(results)
    assert_grad_is_union_gradient(results, ref_fd, TIGHT)


# ------------------------------------------------------------------------------------------------
# process_group=
# ------------------------------------------------------------------------------------------------


def test_process_group_is_honoured(ranks):
    """With a singleton group nothing is averaged or broadcast: rank ``r`` follows the
    single-process run on its own rows with its own seed. A ``new_group`` of both ranks gives
    the union trajectory back."""
    results = ranks.results("process_group")
    for r, res in enumerate(results):
        own = reference(run_rank_one, "loss_closure", rows_of=r, seed=r)
        assert_follows([res["own"]], own, TIGHT, f"rank {r}: RankOneNewton in its own group")
    union = reference(run_rank_one, "loss_closure", seed=0)
    assert_follows([res["all"] for res in results], union, TIGHT, "new_group([0, 1])")
    assert_ranks_agree([res["all"] for res in results])


def test_fisher_newton_process_group_is_honoured(ranks):
    for r, res in enumerate(ranks.results("fisher")):
        own = reference(run_fisher, rows_of=r, seed=r)
        assert_follows([res["own"]], own, TIGHT, f"rank {r}: FisherNewton in its own group")


# ------------------------------------------------------------------------------------------------
# regressions: unequal batches, a non-finite loss on one rank, a generator seeded per rank
# ------------------------------------------------------------------------------------------------


def test_fisher_newton_unequal_batches_follow_union_batch_run(ranks):
    """Rank 0 holds 10 rows, rank 1 the other 6: the rows are gathered despite their unequal
    shapes (rank 0's, then rank 1's: the 16 rows in order) and each rank's mean gradient and
    loss count by its share of the batch, so every step is the union-batch Fisher step and
    ``step`` returns the union mean loss. Materialised and implicit (``module=``) rows."""
    results = ranks.results("fisher_unequal_batches")
    for key, ref in (
        ("rows", reference(run_fisher, seed=0)),
        ("module", reference(run_fisher, seed=0, module=True)),
    ):
        got = [res[key] for res in results]
        assert_follows(got, ref, TIGHT, f"FisherNewton on {UNEQUAL} rows ({key})")
        assert_ranks_agree(got)
        assert_grad_is_union_gradient(got, ref, TIGHT)
        for r, res in enumerate(got):
            assert torch.allclose(res["losses"], ref["losses"], rtol=1e-12, atol=0), (
                f"rank {r} ({key}): step() returned {res['losses'].tolist()}, the union-batch "
                f"mean losses are {ref['losses'].tolist()}"
            )
    # the test can tell: the plain mean of the ranks' means is not the union mean here
    losses = make_problem().per_sample_losses().detach()
    plain = (losses[: UNEQUAL[0]].mean() + losses[UNEQUAL[0] :].mean()) / 2
    assert abs(plain - losses.mean()) > 1e-6 * losses.mean()


@pytest.mark.parametrize("optimizer", ["rank_one", "neumann"])
def test_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(ranks, optimizer):
    """Rank 1's loss is ``+inf`` at step ``INF_AT`` (its gradient and HVPs are finite), rank 0's
    is not. The loss is averaged with the gradient, so both ranks see ``inf`` and skip that step
    together, and every step returns the global (union-batch) loss on both ranks. Reference: the
    single-process run whose loss is ``+inf`` at that step."""
    results = [res[optimizer] for res in ranks.results("nonfinite_loss_on_one_rank")]
    assert_seeded_differently(results)
    if optimizer == "rank_one":
        ref = reference(run_rank_one, "loss_closure", seed=0, inf_at=INF_AT)
    else:
        ref = reference(run_neumann, seed=0, inf_at=INF_AT)
    assert ref["skipped_steps"] == 1 and torch.isposinf(ref["losses"][INF_AT])  # the reference
    assert_ranks_agree(results)
    assert_follows(results, ref, TIGHT, f"{optimizer} with a non-finite loss on rank 1")
    finite = torch.arange(len(ref["losses"])) != INF_AT
    for r, res in enumerate(results):
        assert res["skipped_steps"] == 1, f"rank {r} skipped {res['skipped_steps']} steps, not 1"
        traj = res["trajectory"]
        assert torch.equal(traj[INF_AT], traj[INF_AT - 1]), f"rank {r} moved at step {INF_AT}"
        assert torch.isposinf(res["losses"][INF_AT]), (
            f"rank {r}: step {INF_AT} returned {res['losses'][INF_AT].item()}, not the global inf"
        )
        assert torch.allclose(res["losses"][finite], ref["losses"][finite], rtol=1e-12, atol=0), (
            f"rank {r}: step() returned {res['losses'].tolist()}, the union-batch losses are "
            f"{ref['losses'].tolist()}"
        )
    # the test can tell: a rank's own (half-batch) loss is not the union loss
    own = [float(make_problem(r, WORLD).loss().detach()) for r in range(WORLD)]
    assert all(abs(o - float(ref["losses"][0])) > 1e-6 for o in own), own


def test_rank_one_generator_seeded_per_rank_is_broadcast_from_rank_0(ranks):
    """``generator=Generator().manual_seed(100 + rank)``: the optimizer broadcasts the given
    generator's state from rank 0 at the first step, so the directions agree and the run is the
    single-process one with ``manual_seed(100)``."""
    results = ranks.results("rank_one_generator_per_rank")
    ref = reference(run_rank_one, "loss_closure", seed=0, gen_seed=100)
    assert_follows(results, ref, TIGHT, "RankOneNewton (generator seeded per rank)")
    assert_ranks_agree(results)
    assert_grad_is_union_gradient(results, ref, TIGHT)
    # the test can tell: rank 1's own generator gives another trajectory
    own = reference(run_rank_one, "loss_closure", seed=0, gen_seed=101)
    assert trajectory_error(own, ref).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# the harness itself
# ------------------------------------------------------------------------------------------------


def test_a_failing_rank_is_reported_and_nothing_hangs(ranks):
    """The last scenario fails on rank 1 on purpose: rank 0 gets an error, not a hang."""
    launch = ranks.launch("failing_rank")
    assert not launch.timed_out and launch.seconds < DEADLINE_S
    with pytest.raises(pytest.fail.Exception) as info:
        ranks.results("failing_rank")
    report = str(info.value)
    assert "rank 1" in report and "deliberate failure on rank 1" in report, report
    assert launch.outcomes[0]["failing_rank"]["ok"] is False, report  # the peer went away
