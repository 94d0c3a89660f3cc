"""Contracts of the distributed NewtonLearn stack, each against an independent reference:
compressors from explicit index math on the generator's draws, the bit conventions by hand,
the transports (simulated, and ``torch.distributed`` on a one-process gloo group), NewtonLearn's
learning step and server model in dense float64 from the paper's formulas (Islamov, Qian &
Richtárik 2021, Algorithms 1–2), its multi-rank protocol on an in-process threaded transport,
checkpoint refusals, and the baselines' building blocks."""

from __future__ import annotations

import functools
import math
import threading

import _glm_reference as glm_reference
import pytest
import torch
import torch.distributed as dist
from torch.nn.functional import softplus

from torch_rankone import NewtonLearn
from torch_rankone.distributed import accounting as acc
from torch_rankone.distributed import baselines as bl
from torch_rankone.distributed import transports as tr
from torch_rankone.distributed.compressors import (
    Bernoulli,
    Compressor,
    Identity,
    NaturalCompression,
    RandK,
    RandomDithering,
    TopK,
    log2_binomial,
)
from torch_rankone.optim import newton_learn as nlm

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniforms(shape, seed: int) -> torch.Tensor:
    """The compressors' draws: float64 ``U[0, 1)`` of ``shape`` from a fresh seeded generator."""
    return torch.rand(shape, generator=gen(seed), dtype=F64)


# ------------------------------------------------------------------------------------------------
# Compressors: explicit references on the same uniform draws
# ------------------------------------------------------------------------------------------------


def test_randk_keeps_the_r_largest_keys_scaled_by_dim_over_r():
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0, -5.0], [0.5, 6.0, -7.0, 8.0, 9.0]], dtype=F64)
    u = uniforms(x.shape, 4)
    want = torch.zeros_like(x)
    for i in range(2):
        order = sorted(range(5), key=lambda j: -float(u[i, j]))  # keys by decreasing value
        for j in order[:2]:
            want[i, j] = x[i, j] * 5 / 2
    assert torch.equal(RandK(2)(x, gen(4)), want)


def test_sparsifiers_act_on_the_last_dimension_of_a_batch():
    """A ``(nodes, rows, dim)`` batch: each last-dimension row is one message."""
    x = torch.arange(1.0, 25.0, dtype=F64).reshape(2, 3, 4) * torch.tensor([1.0, -1, 1, -1])
    out = TopK(1)(x)
    want = torch.zeros_like(x)
    want[..., 3] = x[..., 3]  # the largest magnitude is the last entry of every row
    assert torch.equal(out, want)
    u = uniforms(x.shape, 1)
    keep = u == u.amax(-1, keepdim=True)
    assert torch.equal(RandK(1)(x, gen(1)), torch.where(keep, 4 * x, 0.0))
    bits = RandK(1).message_bits(out)
    assert bits.shape == (2, 3) and bool((bits == 32 + 2.0).all())


def test_default_generator_is_the_global_one():
    x = torch.arange(1.0, 6.0, dtype=F64)[None]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        out = RandK(2)(x)
        torch.manual_seed(3)
        u = torch.rand(x.shape, dtype=F64)
    keep = u >= u.topk(2).values[..., -1:]
    assert torch.equal(out, torch.where(keep, x * 2.5, 0.0))


def test_topk_keeps_largest_magnitudes_per_row():
    x = torch.tensor([[1.0, -9.0, 3.0, 4.0], [-5.0, 0.5, 2.0, -0.1]], dtype=F64)
    want = torch.tensor([[0.0, -9.0, 0.0, 4.0], [-5.0, 0.0, 2.0, 0.0]], dtype=F64)
    assert torch.equal(TopK(2)(x, None), want)
    assert TopK(2).omega(4) == 0.0 and RandK(2).omega(8) == 3.0


def test_random_dithering_rounds_levels_with_the_uniform_draws():
    s = 2
    x = torch.tensor([[3.0, -4.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    u = uniforms(x.shape, 7)
    want = torch.zeros_like(x)
    norm = math.sqrt(26.0)
    for j in range(4):
        level = abs(float(x[0, j])) / norm * s
        low = math.floor(level)
        xi = low + (1 if float(u[0, j]) < level - low else 0)
        want[0, j] = norm * math.copysign(1.0, float(x[0, j])) * xi / s if x[0, j] != 0 else 0.0
    out = RandomDithering(s)(x, gen(7))
    torch.testing.assert_close(out, want, rtol=1e-15, atol=0)
    assert torch.equal(out[1], torch.zeros(4, dtype=F64))  # a zero row stays zero (no 0/0)
    assert RandomDithering(3).omega(4) == min(4 / 9, 2 / 3)
    assert RandomDithering(1).omega(9) == 3.0
    assert RandomDithering(3).bits(4) == 32 + 4 * 3


def test_natural_compression_rounds_to_a_neighbouring_power_of_two():
    x = torch.tensor([[3.0, -0.3, 0.0, 8.0, 5.0]], dtype=F64)
    u = uniforms(x.shape, 2)
    want = torch.zeros_like(x)
    for j in range(5):
        t = float(x[0, j])
        if t == 0:
            continue
        low = 2.0 ** math.floor(math.log2(abs(t)))
        up = float(u[0, j]) < abs(t) / low - 1
        want[0, j] = math.copysign(low * (2 if up else 1), t)
    assert torch.equal(NaturalCompression()(x, gen(2)), want)
    assert NaturalCompression().omega(3) == 0.125 and NaturalCompression().bits(4) == 36.0


def test_bernoulli_coin_first_then_inner_on_every_row():
    p = 0.5
    x = torch.arange(1.0, 13.0, dtype=F64).reshape(4, 3)
    g = gen(5)
    coin = torch.rand((4, 1), generator=g, dtype=F64) < p
    u = torch.rand((4, 3), generator=g, dtype=F64)
    inner = torch.zeros_like(x)
    idx = u.argmax(1)  # RandK(1): the largest key
    inner[torch.arange(4), idx] = x[torch.arange(4), idx] * 3
    want = torch.where(coin, inner / p, 0.0)
    out = Bernoulli(p, RandK(1))(x, gen(5))
    assert torch.equal(out, want) and 0 < int(coin.sum()) < 4
    sent = coin.squeeze(1)
    bits = torch.where(sent, 32 + math.log2(3), 0.0).to(F64)
    torch.testing.assert_close(Bernoulli(p, RandK(1)).message_bits(out), bits, rtol=1e-15, atol=0)
    assert Bernoulli(p, RandK(1)).message_bits(out).dtype == F64
    assert Bernoulli(0.25).bits(3) == 0.25 * 96 and Bernoulli(0.25).omega(3) == 3.0
    assert Bernoulli(1).p == 1.0 and isinstance(Bernoulli(0.5).inner, Identity)
    assert Bernoulli(0.5, TopK(1)).unbiased is False and Bernoulli(0.5).unbiased is True


def test_identity_copies_and_bills_32_bits_per_entry():
    x = torch.ones(2, 3, dtype=F64)
    out = Identity()(x)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    bits = Identity().message_bits(out)
    assert bits.shape == (2,) and bits.dtype == F64 and bits.tolist() == [96.0, 96.0]


def test_compressor_base_class_and_repr():
    class Half(Compressor):  # no bits: cannot be built
        def __call__(self, x, generator=None):
            return x

        def omega(self, dim):
            return 0.0

    with pytest.raises(TypeError, match="abstract"):
        Half()
    assert repr(RandK(3)) == "RandK(r=3)"
    assert repr(Bernoulli(0.5, TopK(2))) == "Bernoulli(p=0.5, inner=TopK(r=2), unbiased=False)"
    assert Compressor.unbiased is True and TopK.unbiased is False


def test_sparsifier_refuses_r_above_dim_with_its_name():
    with pytest.raises(ValueError, match=r"^TopK\(r=4\) needs dim >= r, got dim=3$"):
        TopK(4).bits(3)
    assert RandK(3).bits(3) == 96.0  # r = dim allowed: one subset, no index bits


def test_log2_binomial():
    assert log2_binomial(5, 2) == pytest.approx(math.log2(10), rel=1e-14)
    assert log2_binomial(40, 3) == pytest.approx(math.log2(9880), rel=1e-14)
    assert log2_binomial(4, 4) == pytest.approx(0.0, abs=1e-14)


def test_compressor_argument_messages():
    with pytest.raises(ValueError, match=r"^p must be a probability in \(0, 1\], got True$"):
        Bernoulli(True)
    with pytest.raises(ValueError, match=r"^p must be a probability in \(0, 1\], got '1'$"):
        Bernoulli("1")
    with pytest.raises(TypeError, match=r"^inner must be a Compressor, got str$"):
        Bernoulli(0.5, "randk")


# ------------------------------------------------------------------------------------------------
# Accounting conventions, by hand
# ------------------------------------------------------------------------------------------------


def test_canonical_names_and_refusal():
    assert acc.canonical("realistic") == "theory" and acc.canonical("paper") == "authors-code"
    assert acc.canonical("authors-text") == "authors-text"
    assert acc.convention_family("paper") == "authors"
    assert acc.convention_family("authors-text") == "authors"
    assert acc.convention_family("realistic") == "theory"
    msg = (
        "accounting must be one of ('theory', 'authors-code', 'authors-text') (former names "
        "('realistic', 'paper') map to ('theory', 'authors-code')), got 'x'"
    )
    with pytest.raises(ValueError) as info:
        acc.canonical("x")
    assert str(info.value) == msg


@pytest.mark.parametrize(
    ("accounting", "variant", "option", "want"),
    [
        ("authors-code", "nl2", 2, 32 * 4 * 5 / 2),
        ("paper", "nl1", 1, 32 * 4 * 5 / 2),
        ("authors-text", "nl2", 1, 3 * 32 * 4 * 5 / 2),
        ("theory", "nl1", 2, 3 * 32 * 7),
        ("theory", "nl1", 1, 3 * 32 * 4 * 5 / 2),
        ("theory", "nl2", 1, 2 * 3 * 32 * 4 * 5 / 2),
        ("realistic", "cnl", 1, 2 * 3 * 32 * 4 * 5 / 2),
    ],
)
def test_init_bits(accounting, variant, option, want):
    got = acc.init_bits(accounting, variant, option, num_nodes=3, m=7, d=4)
    assert got == want and isinstance(got, float)


def test_nl_authors_iteration_bits_by_hand():
    m, d, n = 7, 4, 3
    assert acc.nl_authors_iteration_bits("authors-code", "nl1", RandK(2), m, d) == 32 * (4 + 8 + 2)
    assert acc.nl_authors_iteration_bits("paper", "cnl", TopK(1), m, d) == 32 * (4 + 4 + 1) + 32
    # Identity: r = m, no index bits in authors-text
    got = acc.nl_authors_iteration_bits("authors-text", "nl1", Identity(), m, d, n)
    assert got == n * 32 * (d + m * d + m)
    got = acc.nl_authors_iteration_bits("authors-text", "nl2", RandK(2), m, d, n)
    assert got == pytest.approx(n * (32 * (4 + 8 + 2) + math.log2(21) + 32), rel=1e-14)
    comp = Bernoulli(0.25, RandK(2))
    got = acc.nl_authors_iteration_bits("authors-code", "nl1", comp, m, d)
    assert got == 32 * 4 + 0.25 * 32 * (8 + 2)
    got = acc.nl_authors_iteration_bits("authors-text", "nl1", comp, m, d, n)
    assert got == pytest.approx(n * (32 * 4 + 0.25 * (32 * 10 + math.log2(21))), rel=1e-14)
    assert acc.paper_iteration_bits("nl2", RandK(1), m, d) == 32 * (4 + 4 + 1) + 32
    with pytest.raises(ValueError, match=r"^not an authors-\* convention: 'realistic'$"):
        acc.nl_authors_iteration_bits("realistic", "nl1", RandK(1), m, d)


def test_paper_r_and_its_refusal():
    assert acc.paper_r(Bernoulli(0.5, TopK(3)), 9) == 3 and acc.paper_r(Identity(), 9) == 9
    assert acc.paper_r(Bernoulli(0.5), 9) == 9
    msg = (
        "accounting='authors-text' reproduces the authors' count for RandK, TopK, Identity and "
        "Bernoulli of those only, got compressor=NaturalCompression(); use accounting='theory'"
    )
    with pytest.raises(ValueError) as info:
        acc.paper_r(NaturalCompression(), 9, "authors-text")
    assert str(info.value) == msg
    with pytest.raises(ValueError, match=r"^accounting='authors-code' reproduces"):
        acc.paper_r(NaturalCompression(), 9)


def test_message_and_matrix_costs():
    assert acc.newton_bits(3) == 32 * 12 and isinstance(acc.newton_bits(3), float)
    assert acc.symmetric_matrix_bits(3) == 32 * 6
    assert acc.published_message_bits(RandomDithering(3), 10) == 2.8 * 10 + 32
    assert acc.published_message_bits(RandK(2), 5) == pytest.approx(64 + math.log2(10))
    assert acc.published_message_bits(Identity(), 5) == 160.0
    assert bl.paper_message_bits(NaturalCompression(), 4) == 36.0


@pytest.mark.parametrize(
    ("variant", "option", "want"),
    [("nl1", 1, 3 * 32 * 4 + 10 + 32 * 4 * 5), ("nl1", 2, 3 * 32 * 4 + 10),
     ("nl2", 1, 3 * 32 * 4 + 10 + 32 * 4 * 5 + 3 * 32), ("cnl", 2, 3 * 32 * 4 + 10 + 3 * 32)],
)  # fmt: skip
def test_realistic_iteration_bits(variant, option, want):
    got = acc.realistic_iteration_bits(variant, option, 3, 4, 10.0, 5)
    assert got == want and isinstance(got, float)


# ------------------------------------------------------------------------------------------------
# Transports
# ------------------------------------------------------------------------------------------------


def test_simulated_transport_is_the_identity():
    t = tr.SimulatedTransport()
    v = torch.arange(3.0)
    assert (t.rank, t.world_size, t.is_server) == (0, 1, True)
    for f in (t.sum_to_server, t.max_everywhere, t.gather_to_server, t.broadcast_from_server):
        assert f(v) is v
    g = gen(3)
    before = g.get_state()
    assert t.check_agreement({"a": 1}) is None and t.broadcast_generator(g) is None
    assert torch.equal(g.get_state(), before)


def test_collective_transport_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    msg = (
        "process_group was given but torch.distributed is not initialised; call "
        "torch.distributed.init_process_group first (or pass num_nodes=n without a "
        "process_group for simulated nodes)"
    )
    with pytest.raises(tr.ProtocolError) as info:
        tr.CollectiveTransport()
    assert str(info.value) == msg


@pytest.fixture
def gloo_one():
    """A one-process gloo group (torch.distributed in this process), torn down after the test."""
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("gloo unavailable or a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collective_transport_on_one_process(gloo_one):
    t = tr.CollectiveTransport()
    assert (t.rank, t.world_size, t.server_rank, t.is_server) == (0, 1, 0, True)
    assert t.device == torch.device("cpu") and t.group is None and t._server == 0
    v = torch.tensor([1.0, -2.0], dtype=F64)
    for f in (t.sum_to_server, t.max_everywhere, t.broadcast_from_server, t.gather_to_server):
        out = f(v)
        assert torch.equal(out, v) and out.dtype == F64
    g = gen(8)
    t.broadcast_generator(g)
    assert torch.equal(g.get_state(), gen(8).get_state())
    t.check_agreement({"a": 1, "b": 2})  # one rank agrees with itself
    with pytest.raises(ValueError) as info:
        tr.CollectiveTransport(None, 1)
    assert str(info.value) == "server_rank must be a rank of the group (0..0), got 1"
    for bad in (-1, 0.0, 2):
        with pytest.raises(ValueError, match="^server_rank must be a rank"):
            tr.CollectiveTransport(None, bad)


def test_collective_transport_group_and_failure(gloo_one):
    group = dist.new_group([0])
    t = tr.CollectiveTransport(group, 0)
    assert t.group is group and t._server == 0 and t.is_server
    v = torch.tensor([3.0])
    assert torch.equal(t.sum_to_server(v), v)

    def boom(*args, group=None, **kwargs):
        assert group is t.group and kwargs == {"k": 1} and args == (1,)
        raise RuntimeError("peer gone")

    with pytest.raises(tr.ProtocolError) as info:
        t._run("reduce(sum)", boom, 1, k=1)
    assert str(info.value) == (
        "NewtonLearn: the collective 'reduce(sum)' failed on rank 0 of 1 (a peer process died, "
        "or the process group's timeout passed): peer gone"
    )
    assert isinstance(info.value.__cause__, RuntimeError)


# ------------------------------------------------------------------------------------------------
# NewtonLearn: the learning step and the server model from the paper's formulas
# ------------------------------------------------------------------------------------------------

N, M, D, LAM = 3, 4, 3, 0.05


problem = functools.partial(glm_reference.problem, rows=N * M, d=D)
dense = functools.partial(glm_reference.dense, lam=LAM)
gram = glm_reference.gram


def randk(delta, r, g):
    """RandK(r) per row from its definition (the r largest float64 keys, scaled by m/r)."""
    keys = torch.rand(delta.shape, generator=g, dtype=F64)
    out = torch.zeros_like(delta)
    for i in range(delta.shape[0]):
        for j in keys[i].argsort(descending=True)[:r].tolist():
            out[i, j] = delta[i, j] * delta.shape[1] / r
    return out


def x0_param(value=0.2, d=D):
    return torch.full((d,), value, dtype=F64, requires_grad=True)


def test_learn_coefficients_formulas():
    h = torch.tensor([[0.1, 0.2], [0.0, 0.3]], dtype=F64)
    hx = torch.tensor([[0.2, 0.1], [0.05, 0.25]], dtype=F64)
    msg = torch.tensor([[0.4, -1.0], [0.0, 0.2]], dtype=F64)
    h1, change, beta = nlm.learn_coefficients("nl1", h, hx, msg, 0.5, None)
    want = (h + 0.5 * msg).clamp_min(0.0)
    assert torch.equal(h1, want) and torch.equal(change, want - h) and beta is None
    h2, change2, beta2 = nlm.learn_coefficients("nl2", h, hx, msg, 0.5, 0.25)
    assert torch.equal(h2, h + 0.5 * msg) and torch.equal(change2, 0.5 * msg)
    ratios = [(float(hx[i, j]) + 0.5) / (float(h[i, j]) + 0.5) for i in range(2) for j in range(2)]
    assert beta2.dim() == 0 and float(beta2) == pytest.approx(max(ratios), rel=1e-15)


@pytest.mark.parametrize("option", [1, 2])
def test_nl1_randk_iterates_follow_the_dense_formulas(option):
    """NL1 with RandK(1) and η = 1 over 3 nodes from ``h^0 = 1/2``: every first message
    overshoots below zero (``h + m(h(x) − h) < 0`` as ``h(x) ≤ 1/4``), so the projection acts."""
    A, b = problem(1)
    x = x0_param()
    h0 = torch.full((N * M,), 0.5, dtype=F64)
    opt = NewtonLearn([x], A, b, lam=LAM, num_nodes=N, compressor=RandK(1), eta=1.0,
                      option=option, generator=gen(4), h0=h0)  # fmt: skip
    g = gen(4)
    xr = torch.full((D,), 0.2, dtype=F64)
    h = h0.reshape(N, M)
    H = gram(A, h.reshape(-1))
    zeros = 0
    for _ in range(5):
        P, grad, hx = dense(A, b, xr)
        xr = xr - torch.linalg.solve(H + LAM * torch.eye(D, dtype=F64), grad)
        h_new = (h + randk(hx.reshape(N, M) - h, 1, g)).clamp_min(0.0)
        H = H + gram(A, (h_new - h).reshape(-1))
        h = h_new
        zeros += int((h == 0).sum())
        got = opt.step()
        torch.testing.assert_close(got, P, rtol=1e-14, atol=0)
        torch.testing.assert_close(x.detach(), xr, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(opt.global_state["h"], h, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(opt.global_state["H"], H, rtol=1e-11, atol=1e-13)
    assert opt.counters() == {"step": 5, "skipped_steps": 0}
    assert zeros >= N  # the projection acted (at least once per node)


# ------------------------------------------------------------------------------------------------
# The multi-rank protocol, on ranks that are threads of this process
# ------------------------------------------------------------------------------------------------


class ThreadWorld:
    """Ranks as threads: every collective is an all-gather of each rank's tensor (rank order)
    through shared slots, with two barriers so that no slot is overwritten before it is read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=10)

    def all_gather(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadTransport:
    """The transport interface of :class:`~torch_rankone.distributed.transports.
    CollectiveTransport` for ``group = (world, rank)``."""

    def __init__(self, group, server_rank: int = 0) -> None:
        self.world, self.rank = group
        self.world_size, self.server_rank = self.world.size, server_rank
        self.is_server = self.rank == server_rank
        self.calls: list[str] = []

    def check_agreement(self, meta):
        every = self.world.all_gather(self.rank, dict(meta))
        if any(m != every[0] for m in every):
            raise tr.ProtocolError("the ranks disagree")

    def sum_to_server(self, t):
        every = self.world.all_gather(self.rank, t.clone())
        return sum(every[1:], every[0].clone()) if self.is_server else t.clone()

    def max_everywhere(self, t):
        return torch.stack(self.world.all_gather(self.rank, t.clone())).amax(0)

    def gather_to_server(self, rows):
        every = self.world.all_gather(self.rank, rows.clone())
        assert all(e.shape == every[0].shape for e in every)  # padded to one shape
        return torch.cat(every) if self.is_server else rows[:0]

    def broadcast_from_server(self, t):
        return self.world.all_gather(self.rank, t.clone())[self.server_rank].clone()

    def broadcast_generator(self, generator):
        state = self.world.all_gather(self.rank, generator.get_state())[self.server_rank]
        generator.set_state(state.clone())


def run_threads(monkeypatch, world_size, local_nodes, steps, A, b, x0, sizes=None, **kw):
    """Each rank builds NewtonLearn on its ``local_nodes·m`` rows (``sizes``: the rows of each
    rank; its own generator seed: the server's is broadcast) and takes ``steps`` steps;
    returns per rank (iterates, optimizer)."""
    monkeypatch.setattr(nlm, "CollectiveTransport", ThreadTransport)
    world = ThreadWorld(world_size)
    sizes = sizes or [A.shape[0] // world_size] * world_size
    starts = [sum(sizes[:r]) for r in range(world_size)]
    out: list = [None] * world_size
    errors: list = []

    def rank_main(r):
        try:
            x = x0.clone().requires_grad_(True)
            if r != kw.get("server_rank", 0):
                with torch.no_grad():
                    x.add_(1.0)  # the server's x^0 is broadcast
            sl = slice(starts[r], starts[r] + sizes[r])
            mine = dict(kw)
            if isinstance(mine.get("h0"), list):  # one h0 per rank
                mine["h0"] = mine["h0"][r]
            opt = NewtonLearn([x], A[sl], b[sl], lam=LAM, num_nodes=local_nodes,
                              process_group=(world, r), generator=gen(100 + r), **mine)  # fmt: skip
            traj = []
            for _ in range(steps):
                opt.step()
                traj.append(x.detach().clone())
            out[r] = (torch.stack(traj), opt)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(variant="nl1"),
        dict(variant="nl1", option=2, compressor=TopK(2)),
        dict(variant="nl2", server_rank=1),
        dict(variant="cnl", server_rank=1, compressor=RandK(2)),
    ],
    ids=["nl1", "nl1-topk-option2", "nl2-server1", "cnl-server1"],
)
def test_threaded_ranks_follow_the_simulated_run(monkeypatch, kw):
    """Two ranks of two nodes each equal the simulated run of the four nodes with the
    server's generator: iterates, learned ``h`` per rank, the server's model and the bits."""
    A, b = problem(2, rows=4 * M)
    x0 = torch.full((D,), 0.1, dtype=F64)
    server = kw.get("server_rank", 0)
    got = run_threads(monkeypatch, 2, 2, 4, A, b, x0, **kw)
    sim_kw = {k: v for k, v in kw.items() if k != "server_rank"}
    x = x0.clone().requires_grad_(True)
    ref = NewtonLearn([x], A, b, lam=LAM, num_nodes=4, generator=gen(100 + server), **sim_kw)
    traj = []
    for _ in range(4):
        ref.step()
        traj.append(x.detach().clone())
    traj = torch.stack(traj)
    h_ref = ref.global_state["h"]
    for r, (t, opt) in enumerate(got):
        torch.testing.assert_close(t, traj, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.global_state["h"], h_ref[2 * r : 2 * r + 2], rtol=0,
                                   atol=1e-13)  # fmt: skip
        assert opt.num_nodes == 4 and opt.local_nodes == 2 and opt.transport.rank == r
        assert opt.history[-1]["bits"] == pytest.approx(ref.history[-1]["bits"], rel=1e-12)
        assert opt.counters() == {"step": 4, "skipped_steps": 0}
    key = "H" if kw["variant"] == "nl1" else "A"
    server_state = got[server][1].global_state
    torch.testing.assert_close(server_state[key], ref.global_state[key], rtol=0, atol=1e-13)
    assert key not in got[1 - server][1].global_state


def test_threaded_ranks_refuse_a_shape_mismatch(monkeypatch):
    A, b = problem(2, rows=4 * M)
    with pytest.raises(tr.ProtocolError, match="disagree"):
        run_threads(monkeypatch, 2, 2, 1, A, b, torch.zeros(D, dtype=F64), sizes=[2 * M, 2 * M - 2])


def test_one_process_gloo_group_equals_the_simulated_run(gloo_one):
    """``torch.distributed`` initialised: NewtonLearn runs the real collectives (one rank)."""
    A, b = problem(3)
    runs = []
    for group in (None, dist.new_group([0])):
        x = x0_param(0.1)
        opt = NewtonLearn([x], A, b, lam=LAM, num_nodes=N, variant="nl2",
                          process_group=group, generator=gen(6))  # fmt: skip
        assert isinstance(opt.transport, tr.CollectiveTransport)
        for _ in range(3):
            opt.step()
        runs.append((x.detach().clone(), opt.history[-1]["bits"]))
    dist.destroy_process_group()  # simulated from here on
    x = x0_param(0.1)
    ref = NewtonLearn([x], A, b, lam=LAM, num_nodes=N, variant="nl2", generator=gen(6))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert isinstance(ref.transport, tr.SimulatedTransport)
    for _ in range(3):
        ref.step()
    for xk, bits in runs:
        torch.testing.assert_close(xk, x.detach(), rtol=0, atol=1e-14)
        assert bits == ref.history[-1]["bits"]


def test_threaded_ranks_agree_on_the_protocols_metadata(monkeypatch):
    """What the ranks compare before any large collective (the names a disagreement reports)."""
    seen = []
    check = ThreadTransport.check_agreement

    def recording(self, meta):
        seen.append(dict(meta))
        check(self, meta)

    monkeypatch.setattr(ThreadTransport, "check_agreement", recording)
    A, b = problem(2, rows=4 * M)
    run_threads(monkeypatch, 2, 2, 1, A, b, torch.zeros(D, dtype=F64), variant="nl2", option=2)
    want = dict(nodes_per_rank=2, rows_per_node=M, features=D, dtype=3, variant=1, option=2,
                solver=0, finite_features_and_valid_targets=1)  # fmt: skip
    assert seen == [want, want]


def _rank_errors(monkeypatch, A, b, x0=0.0, common=None, **per_rank):
    """Build NewtonLearn on two threaded ranks from ``x⁰ = x0·1`` with options ``common``
    (rank 1 with ``per_rank`` applied to its data or options); the exception each rank
    raised."""
    monkeypatch.setattr(nlm, "CollectiveTransport", ThreadTransport)
    world, errors = ThreadWorld(2), [None, None]

    def rank_main(r):
        sl = slice(r * 2 * M, (r + 1) * 2 * M)
        Ar, br, kw = A[sl].clone(), b[sl].clone(), dict(common or {})
        if r == 1:
            Ar, br = per_rank.get("data", lambda a, c: (a, c))(Ar, br)
            kw.update(per_rank.get("kw", {}))
        try:
            NewtonLearn([torch.full((D,), x0, dtype=F64, requires_grad=True)], Ar, br, lam=LAM,
                        num_nodes=2, process_group=(world, r), **kw)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            errors[r] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_a_rank_with_bad_data_raises_its_reason_and_the_others_a_protocol_error(monkeypatch):
    A, b = problem(2, rows=4 * M)

    def nan_feature(a, c):
        a[0, 0] = math.nan
        return a, c

    errors = _rank_errors(monkeypatch, A, b, data=nan_feature, kw={})
    assert type(errors[1]) is ValueError
    assert str(errors[1]) == "features must be finite; 1 entries are NaN or ±inf"
    assert isinstance(errors[0], tr.ProtocolError)


def test_a_rank_with_a_refused_start_stops_every_rank(monkeypatch):
    A, b = problem(2, rows=4 * M)
    h0 = -torch.ones(2 * M, dtype=F64)
    errors = _rank_errors(monkeypatch, A, b, kw=dict(h0=h0))
    assert str(errors[1]) == "h0 must be >= 0 for nl1 (H^0 must be positive semidefinite)"
    assert type(errors[0]) is ValueError and str(errors[0]) == (
        "NewtonLearn: another rank refused its start (its loss or h0 is not finite at x⁰, or "
        "h0 < 0 for nl1); see that rank's error"
    )


# ------------------------------------------------------------------------------------------------
# NewtonLearn's argument checks: the exact messages
# ------------------------------------------------------------------------------------------------


def _build(**kw):
    A, b = problem(0)
    A, b = kw.pop("A", A), kw.pop("b", b)
    x = kw.pop("x", None)
    x = torch.zeros(D, dtype=F64, requires_grad=True) if x is None else x
    kw.setdefault("num_nodes", N)
    return NewtonLearn([x], A, b, lam=kw.pop("lam", LAM), **kw)


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        (dict(variant="nl3"), ValueError,
         "variant must be one of ('nl1', 'nl2', 'cnl'), got 'nl3'"),
        (dict(compressor=3), TypeError, "compressor must be a Compressor, got int"),
        (dict(option=0), ValueError, "option must be 1 or 2, got 0"),
        (dict(solver="qr"), ValueError,
         "solver must be one of ('cholesky', 'cholesky_update'), got 'qr'"),
        (dict(solver="cholesky_update", variant="cnl"), ValueError,
         "solver='cholesky_update' applies to variant='nl1' only (NL2/CNL rescale the whole "
         "matrix by β every iteration)"),
        (dict(generator=1), TypeError, "generator must be a torch.Generator, got int"),
        (dict(num_nodes=0), ValueError, "num_nodes must be a positive integer, got 0"),
        (dict(num_nodes=True), ValueError, "num_nodes must be a positive integer, got True"),
        (dict(num_nodes=5), ValueError,
         "features has 12 rows, not divisible into num_nodes=5 equal shards; drop the remainder "
         "(e.g. features[:10]) as the paper does"),
        (dict(A=torch.zeros(0, D, dtype=F64), b=torch.zeros(0, dtype=F64), num_nodes=1),
         ValueError, "features has 0 rows, not divisible into num_nodes=1 equal shards; drop "
         "the remainder (e.g. features[:0]) as the paper does"),
        (dict(A=[[1.0]]), ValueError,
         "features must be a (rows, d=3) tensor matching the parameter's 3 elements, got list"),
        (dict(A=torch.zeros(12, 2, dtype=F64)), ValueError,
         "features must be a (rows, d=3) tensor matching the parameter's 3 elements, "
         "got torch.Size([12, 2])"),
        (dict(A=torch.zeros(12, 3)), TypeError,
         "features must have the parameter's dtype torch.float64, got torch.float32"),
        (dict(b=[1.0]), ValueError, "targets must be a tensor of shape (12,), got list"),
        (dict(b=torch.ones(11, dtype=F64)), ValueError,
         "targets must be a tensor of shape (12,), got torch.Size([11])"),
        (dict(x=torch.zeros(2, D, dtype=F64, requires_grad=True)), ValueError,
         "features must be a (rows, d=6) tensor matching the parameter's 6 elements, "
         "got torch.Size([12, 3])"),
        (dict(variant="nl2", gamma=0.0), ValueError, "gamma must be > 0.0, got 0.0"),
        (dict(variant="cnl", cubic_reg=-1.0), ValueError, "cubic_reg must be >= 0.0, got -1.0"),
        (dict(variant="nl2", loss=lambda t, b: t * t), ValueError,
         "gamma (>= sup|phi''|) is needed for a custom loss with nl2/cnl"),
        (dict(variant="cnl", loss=lambda t, b: t * t, gamma=1.0), ValueError,
         "cubic_reg (M) is needed for a custom loss with cnl"),
        (dict(h0=torch.ones(5, dtype=F64)), ValueError, "h0 must be a tensor with 3·4 elements"),
        (dict(h0=torch.full((12,), math.inf, dtype=F64)), ValueError,
         "h0 is not finite: 12 entries are NaN or ±inf"),
        (dict(b=torch.zeros(12, dtype=F64)), ValueError,
         "loss='logistic' needs targets in {-1, +1} (a row labelled 0 would add log 2 whatever "
         "x, i.e. be ignored); got 1 distinct values {0}: map {0, 1} labels with 2*y - 1"),
    ],
)  # fmt: skip
def test_constructor_refusals_say_exactly_what_is_wrong(kw, error, message):
    with pytest.raises(error) as info:
        _build(**kw)
    assert type(info.value) is error and str(info.value) == message


def test_constructor_defaults():
    A, b = problem(0)
    x = torch.zeros(D, dtype=F64, requires_grad=True)
    opt = NewtonLearn([x], A, b)  # one node: Identity, η = 1
    assert (opt.num_nodes, opt.local_nodes, opt.m, opt.d) == (1, 1, 12, 3)
    assert isinstance(opt.compressor, Identity) and opt.eta == 1.0
    assert opt.param_groups[0]["lam"] == 1e-3 and opt.variant == "nl1" and opt.gamma is None
    assert (opt.option, opt.accounting, opt.solver) == (1, "theory", "cholesky")
    assert opt.cubic_reg is None
    assert opt.solve_dtype == F64 and isinstance(opt.transport, tr.SimulatedTransport)
    assert opt.global_state["step"].dtype == torch.int64
    assert opt.global_state["skipped_steps"].dtype == torch.int64
    opt = _build(variant="nl2")  # three nodes: RandK(1), η = 1/(ω + 1) = 1/m
    assert isinstance(opt.compressor, RandK) and opt.compressor.r == 1
    assert opt.eta == 1 / 4 and opt.gamma == 0.25
    assert _build(variant="nl2", loss="squared").gamma == 1.0
    opt = _build(variant="cnl", eta=0.5, gamma=0.5)
    R = float(problem(0)[0].norm(dim=1).max())
    assert opt.eta == 0.5 and opt.gamma == 0.5
    assert opt.cubic_reg == pytest.approx(R**3 / (6 * math.sqrt(3)), rel=1e-14)
    assert _build(variant="cnl", cubic_reg=0).cubic_reg == 0.0
    assert _build(solve_dtype=torch.float32).solve_dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# The update solver's fallback, and checkpoints
# ------------------------------------------------------------------------------------------------


def _failing_downdates(monkeypatch):
    """Every rank-one update of the factor reports failure: the optimizer must refactor."""
    calls = []

    def fail(L, z, alpha):
        calls.append(float(alpha))
        return torch.full_like(L, math.nan), False

    monkeypatch.setattr(nlm, "cholesky_rank_one_update", fail)
    return calls


def test_failed_factor_update_refactors_once_per_step(monkeypatch):
    A, b = problem(4)
    x = x0_param(0.1)
    opt = NewtonLearn([x], A, b, lam=LAM, num_nodes=N, solver="cholesky_update",
                      compressor=TopK(2), generator=gen(1))  # fmt: skip
    state = opt.global_state
    assert state["chol_lam"] == LAM and state["refactorizations"] == 0
    opt.step()  # h^0 = h(x^0): the first messages are zero, nothing to update
    assert state["refactorizations"] == 0
    calls = _failing_downdates(monkeypatch)
    for k in range(2):
        opt.step()
        assert state["refactorizations"] == k + 1 and calls  # one refactoring per step
        eye = torch.eye(D, dtype=F64)
        torch.testing.assert_close(state["chol"], torch.linalg.cholesky(state["H"] + LAM * eye),
                                   rtol=0, atol=0)  # fmt: skip
        calls.clear()
    opt.param_groups[0]["lam"] = 0.5  # refactor for λ and then again after the failed update
    opt.step()
    assert state["refactorizations"] == 4 and state["chol_lam"] == 0.5


def test_factor_updates_keep_the_factor_without_refactoring():
    A, b = problem(4)
    x = x0_param(0.1)
    opt = NewtonLearn([x], A, b, lam=LAM, num_nodes=N, solver="cholesky_update",
                      compressor=TopK(2), generator=gen(1))  # fmt: skip
    for _ in range(3):
        opt.step()
    state = opt.global_state
    assert state["refactorizations"] == 0 and state["chol_lam"] == LAM
    eye = torch.eye(D, dtype=F64)
    torch.testing.assert_close(state["chol"] @ state["chol"].T, state["H"] + LAM * eye,
                               rtol=0, atol=1e-14)  # fmt: skip


def _ckpt_opt(**kw):
    A, b = problem(5)
    x = x0_param(0.1)
    opt = NewtonLearn([x], A, b, lam=LAM, num_nodes=N, generator=gen(2), **kw)
    for _ in range(2):
        opt.step()
    return x, opt


def test_state_dict_holds_a_copy_of_the_history_as_a_tuple():
    x, opt = _ckpt_opt()
    sd = opt.state_dict()
    hist = sd["state"][0]["history"]
    assert isinstance(hist, tuple) and list(hist) == opt.history
    assert hist[0] is not opt.history[0]
    assert torch.equal(sd["state"][0]["generator_state"], opt.generator.get_state())


def test_load_state_dict_copies_and_converts():
    """The loaded tensors are copies (stepping does not write into the checkpoint); counters
    saved as numbers come back as the fresh optimizer's tensors; version 0.1's history next to
    the state and factor without its λ are read."""
    x, opt = _ckpt_opt(solver="cholesky_update")
    sd = opt.state_dict()
    entry = sd["state"][0]
    h_saved, H_saved = entry["h"].clone(), entry["H"].clone()
    entry["step"], entry["skipped_steps"] = 2, 0
    history = list(entry.pop("history"))
    del entry["chol_lam"]
    sd["history"] = history
    sd["param_groups"][0]["lam"] = 0.25
    y = x0_param(0.0)
    A, b = problem(5)
    other = NewtonLearn([y], A, b, lam=LAM, num_nodes=N, solver="cholesky_update")
    other.load_state_dict(sd)
    state = other.global_state
    assert state["chol_lam"] == 0.25 and other.param_groups[0]["lam"] == 0.25
    assert state["step"].dtype == torch.int64 and state["step"].dim() == 0
    assert other.counters() == {"step": 2, "skipped_steps": 0}
    assert other.history == history and other.history[0] is not history[0]
    with torch.no_grad():
        y.copy_(x)
    other.step()
    assert torch.equal(entry["h"], h_saved) and torch.equal(entry["H"], H_saved)
    assert state["refactorizations"] == 0  # the factor was made for λ = 0.25 = the group's


def _refusal(opt, sd):
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    prefix, suffix = "NewtonLearn.load_state_dict: ", " (nothing was changed)"
    text = str(info.value)
    assert text.startswith(prefix) and text.endswith(suffix), text
    return text[len(prefix) : -len(suffix)]


def test_checkpoint_refusals_name_the_difference():
    x, opt = _ckpt_opt()
    sd = opt.state_dict()
    assert _refusal(opt, [sd]) == "expected a dict with 'state' and 'param_groups'"
    assert _refusal(opt, {"state": {}}) == "expected a dict with 'state' and 'param_groups'"
    assert _refusal(opt, {**sd, "param_groups": sd["param_groups"] * 2}) == (
        "the checkpoint is not of one parameter group holding one parameter, as NewtonLearn's (x)"
    )
    group = dict(sd["param_groups"][0], variant="nl2")
    assert _refusal(opt, {**sd, "param_groups": [group]}) == (
        "the checkpoint has variant='nl2', this optimizer 'nl1'; build the optimizer with the "
        "checkpoint's options"
    )
    assert _refusal(opt, {**sd, "state": {}}) == (
        "the checkpoint's state must have one entry (the parameter x)"
    )
    assert _refusal(opt, {**sd, "state": {0: 1}}) == (
        "the checkpoint's state entry is a int, not a dict"
    )
    entry = sd["state"][0]
    missing = {k: v for k, v in entry.items() if k not in ("h", "step")}
    assert _refusal(opt, {**sd, "state": {0: missing}}) == (
        "the checkpoint's state is missing ['h', 'step'] (a checkpoint of another optimizer, or "
        "of NewtonLearn with other options than variant='nl1', solver='cholesky'?)"
    )
    assert _refusal(opt, {**sd, "state": {0: {**entry, "h": [1.0]}}}) == (
        "state entry 'h' is a list, not a tensor"
    )
    assert _refusal(opt, {**sd, "state": {0: {**entry, "H": entry["H"].float()}}}) == (
        "state entry 'H' has shape (3, 3) and dtype torch.float32, this optimizer's (3, 3) and "
        "torch.float64 (another number of nodes, rows per node or features, or another dtype)"
    )
    assert _refusal(opt, {**sd, "state": {0: {**entry, "skipped_steps": "0"}}}) == (
        "state entry 'skipped_steps' must be a number, got '0'"
    )
    assert _refusal(opt, {**sd, "state": {0: {**entry, "bits_sent": torch.zeros(2)}}}) == (
        "state entry 'bits_sent' must be a number, got tensor([0., 0.])"
    )
    n = opt.generator.get_state().numel()
    bad_gen = {**entry, "generator_state": torch.zeros(3, dtype=torch.uint8)}
    assert _refusal(opt, {**sd, "state": {0: bad_gen}}) == (
        f"state entry 'generator_state' must be a tensor of {n} bytes (a cpu torch.Generator's "
        "state)"
    )
    assert _refusal(opt, {**sd, "state": {0: {**entry, "chol_lam": "x"}}}) == (
        "state entry 'chol_lam' must be a number, got 'x'"
    )
    # numbers as plain ints and floats, and one-element tensors, are counters
    fine = {**entry, "step": 2, "skipped_steps": torch.zeros(1), "bits_sent": 1.5}
    opt.load_state_dict({**sd, "state": {0: fine}})
    bits = opt.global_state["bits_sent"]
    assert bits.dtype == F64 and float(bits) == 1.5


def test_nl2_checkpoint_matrices_are_checked():
    x, opt = _ckpt_opt(variant="nl2")
    sd = opt.state_dict()
    entry = sd["state"][0]
    for key in ("A", "B"):
        bad = {**entry, key: entry[key][:2, :2].clone()}
        assert _refusal(opt, {**sd, "state": {0: bad}}) == (
            f"state entry '{key}' has shape (2, 2) and dtype torch.float64, this optimizer's "
            "(3, 3) and torch.float64 (another number of nodes, rows per node or features, or "
            "another dtype)"
        )


# ------------------------------------------------------------------------------------------------
# Baselines: the shared node split and constants, and each method's safeguards
# ------------------------------------------------------------------------------------------------


def _nodes_problem(seed=6, n=N, m=M, d=D):
    A, b = problem(seed, rows=n * m, d=d)
    return A, b, torch.linspace(-0.3, 0.4, d, dtype=F64)


def test_glm_nodes_per_node_quantities():
    A, b, x = _nodes_problem()
    nodes = bl.GLMNodes(A, b, N, "logistic")
    assert (nodes.n, nodes.m, nodes.d) == (N, M, D)
    assert torch.equal(nodes.node_rows()[1], A[M : 2 * M])
    t = A @ x
    torch.testing.assert_close(nodes.margins(x), t, rtol=1e-15, atol=0)
    s = torch.sigmoid(-b * t)
    for i in range(N):
        rows = slice(i * M, (i + 1) * M)
        g_i = A[rows].T @ (-b[rows] * s[rows]) / M + LAM * x
        torch.testing.assert_close(nodes.gradients(x, LAM)[i], g_i, rtol=1e-13, atol=1e-15)
        h = s[rows] * (1 - s[rows])
        H_i = (A[rows].T * h) @ A[rows] / M + LAM * torch.eye(D, dtype=F64)
        torch.testing.assert_close(nodes.local_hessians(x, LAM)[i], H_i, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(nodes.curvatures(x), s * (1 - s), rtol=1e-13, atol=0)
    H = (A.T * (s * (1 - s))) @ A / (N * M) + LAM * torch.eye(D, dtype=F64)
    torch.testing.assert_close(nodes.hessian(x, LAM), H, rtol=1e-13, atol=1e-15)
    P = softplus(-b * t).mean() + LAM / 2 * x.dot(x)
    torch.testing.assert_close(nodes.value(x, lam=LAM), P, rtol=1e-14, atol=0)
    torch.testing.assert_close(nodes.value(x), softplus(-b * t).mean(), rtol=1e-14, atol=0)


def test_smoothness_constants():
    A, b, _ = _nodes_problem()
    nodes = bl.GLMNodes(A, b, N, "logistic")
    tops = [float(torch.linalg.eigvalsh(A[i * M : (i + 1) * M].T @ A[i * M : (i + 1) * M] / M)[-1])
            for i in range(N)]  # fmt: skip
    L, mu = bl.smoothness(nodes, LAM)
    assert L == pytest.approx(max(tops) / 4 + LAM, rel=1e-13) and mu == LAM
    top = float(torch.linalg.eigvalsh(A.T @ A / (N * M))[-1])
    assert bl.global_smoothness(nodes) == pytest.approx(top / 4, rel=1e-13)
    squared = bl.GLMNodes(A, b, N, "squared")
    assert bl.global_smoothness(squared) == pytest.approx(top, rel=1e-13)
    custom = bl.GLMNodes(A, b, N, lambda t, y: (t - y) ** 2)
    with pytest.raises(ValueError) as info:
        bl.smoothness(custom, LAM)
    assert str(info.value) == (
        "theoretical stepsizes need sup|phi''|: use a built-in loss or pass them"
    )
    with pytest.raises(ValueError) as info:
        bl.global_smoothness(custom)
    assert str(info.value) == "the authors' stepsizes need sup|phi''|: use a built-in loss"


def test_stepsize_formulas():
    assert bl.dcgd_stepsize(2.0, 3.0, 4) == 1 / (2 * (1 + 1.5))
    assert bl.diana_parameters(2.0, 3.0, 4) == (0.25, 1 / (2 * (1 + 4.5)))
    assert bl.authors_dcgd_stepsize(4.0) == 0.25
    # γ = min(α/(2λ), 2/((L + λ)(1 + 6ω/n))): each term the minimum once, and λ = 0
    assert bl.authors_diana_parameters(1.0, 0.5, 3.0, 6) == (0.25, 0.25)
    assert bl.authors_diana_parameters(1.0, 0.01, 3.0, 6) == (0.25, 2 / (1.01 * 4))
    assert bl.authors_diana_parameters(1.0, 0.0, 1.0, 2) == (0.5, 2 / 4)


def test_adiana_parameters_branches():
    # ω = 0: p = 1, η = 1/(2L)
    c = bl.adiana_parameters(2.0, 0.01, 0.0, 4)
    theta1 = min(0.25, math.sqrt(0.25 * 0.01))
    assert (c.alpha, c.p, c.eta, c.theta1, c.theta2) == (1.0, 1.0, 0.25, theta1, 0.5)
    assert c.gamma == pytest.approx(0.25 / (2 * (theta1 + 0.25 * 0.01)), rel=1e-15)
    assert c.beta == pytest.approx(1 - c.gamma * 0.01, rel=1e-15)
    # many nodes: the sqrt(n/(32ω)) − 1 branch of p, and θ1 = 1/4 for a large μ
    c = bl.adiana_parameters(1.0, 0.9, 1.0, 3200)
    p = min(1.0, (math.sqrt(3200 / 32) - 1) / 4)
    assert c.p == p == 1.0 and c.theta1 == 0.25
    c = bl.adiana_parameters(1.0, 1e-3, 1.0, 800)
    p = (math.sqrt(800 / 32) - 1) / 4
    eta = min(0.5, 800 / (64 * (2 * p * 2 + 1) ** 2))
    assert c.p == pytest.approx(p, rel=1e-15) and c.eta == pytest.approx(eta, rel=1e-15)


def test_local_solve_falls_back_to_the_pseudo_inverse():
    H = torch.stack([torch.diag(torch.tensor([2.0, 4.0], dtype=F64)),
                     torch.diag(torch.tensor([2.0, 0.0], dtype=F64))])  # fmt: skip
    v = torch.tensor([[2.0, 4.0], [2.0, 4.0]], dtype=F64)
    out = bl.dingo.local_solve(H, v)
    want = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-15)


def test_bfgs_inverse_update_formula_and_secant():
    g = gen(7)
    Q = torch.randn(4, 4, generator=g, dtype=F64)
    Hinv = Q @ Q.T + torch.eye(4, dtype=F64)
    s, y = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    y = y if y.dot(s) > 0 else -y
    rho = 1 / y.dot(s)
    eye = torch.eye(4, dtype=F64)
    want = (eye - rho * torch.outer(s, y)) @ Hinv @ (eye - rho * torch.outer(y, s))
    want = want + rho * torch.outer(s, s)
    got = bl.bfgs_inverse_update(Hinv, s, y)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got @ y, s, rtol=1e-12, atol=1e-12)  # the secant equation


def _baseline(cls, accounting="theory", **kw):
    A, b, x0 = _nodes_problem()
    x = x0.clone()
    return x, cls([x], A, b, lam=LAM, num_nodes=N, accounting=accounting, generator=gen(1), **kw)


def test_bfgs_skips_updates_that_fail_the_curvature_test():
    x, opt = _baseline(bl.BFGS, curvature_eps=1.0)  # yᵀs > ‖y‖‖s‖ never holds
    inverse = opt.global_state["inverse"].clone()
    A, b, x0 = _nodes_problem()
    H0 = bl.GLMNodes(A, b, N, "logistic").hessian(x0, LAM)
    torch.testing.assert_close(inverse @ H0, torch.eye(D, dtype=F64), rtol=0, atol=1e-13)
    for _ in range(3):
        opt.step()
    assert opt.global_state["skipped_updates"] == 2  # the first step has no pair (s, y)
    assert torch.equal(opt.global_state["inverse"], inverse)
    x, opt = _baseline(bl.BFGS)
    for _ in range(3):
        opt.step()
    assert opt.global_state["skipped_updates"] == 0 and opt.curvature_eps == 1e-10
    assert opt.counters() == {"step": 3}


def test_dingo_line_search_failure_and_step_cap():
    x, opt = _baseline(bl.DINGO, rho=0.999, max_backtracks=0, theta=1e-4)
    x0 = x.clone()
    opt.step()
    state = opt.global_state
    assert sum(state["cases"]) == 1
    # one trial only; accepted or counted as a failure, x moved by α = 1 along p either way
    assert state["line_search_failures"] in (0, 1) and not torch.equal(x, x0)
    x, opt = _baseline(bl.DINGO, step_cap=(0.25, 1))
    assert opt.step_cap == (0.25, 1)
    x, opt = _baseline(bl.DINGO, accounting="authors-code")
    assert opt.step_cap == (0.01, 5)
    x, opt = _baseline(bl.DINGO)
    assert opt.step_cap is None and opt.param_groups[0]["max_backtracks"] == 10
    assert (opt.param_groups[0]["theta"], opt.param_groups[0]["phi"]) == (1e-4, 1e-6)
    assert opt.param_groups[0]["rho"] == 1e-4


def test_dingo_capped_steps_are_the_cap_then_powers_of_two():
    """A cap of 0.3 for the first iteration: the first trial is x + 0.3 p (accepted when it
    decreases ‖∇P‖² enough); from the second iteration the trials are 1, 1/2, ...."""
    A, b, x0 = _nodes_problem()
    runs = {}
    for cap in (None, (0.3, 1)):
        x = x0.clone()
        opt = bl.DINGO([x], A, b, lam=LAM, num_nodes=N, step_cap=cap)
        opt.step()
        runs[cap] = (x, opt)
    x_free, (x_cap, capped) = runs[None][0], runs[(0.3, 1)]
    p = x_free - x0  # α = 1 is accepted here
    torch.testing.assert_close(x_cap, x0 + 0.3 * p, rtol=1e-12, atol=1e-14)
    # second iteration: uncapped, and (from its own point) the same step rule as a fresh DINGO
    start = x_cap.clone()
    capped.step()
    y = start.clone()
    fresh = bl.DINGO([y], A, b, lam=LAM, num_nodes=N)
    fresh.step()
    torch.testing.assert_close(x_cap, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: _baseline(bl.DINGO, max_backtracks=1.0), TypeError,
         "max_backtracks must be an int, got float"),
        (lambda: _baseline(bl.DINGO, max_backtracks=True), TypeError,
         "max_backtracks must be an int, got bool"),
        (lambda: _baseline(bl.DINGO, max_backtracks=-1), ValueError,
         "max_backtracks must be >= 0, got -1"),
        (lambda: _baseline(bl.DINGO, rho=1.0), ValueError, "rho must lie in (0, 1), got 1.0"),
        (lambda: _baseline(bl.DINGO, rho=0.0), ValueError, "rho must be > 0.0, got 0.0"),
        (lambda: _baseline(bl.DINGO, theta=0.0), ValueError, "theta must be > 0.0, got 0.0"),
        (lambda: _baseline(bl.DINGO, phi=0.0), ValueError, "phi must be > 0.0, got 0.0"),
        (lambda: _baseline(bl.DINGO, step_cap=(0.0, 2)), ValueError,
         "step_cap[0] must be > 0.0, got 0.0"),
        (lambda: _baseline(bl.BFGS, curvature_eps=-1.0), ValueError,
         "curvature_eps must be >= 0.0, got -1.0"),
        (lambda: _baseline(bl.DistributedNewton, structured=1), TypeError,
         "structured must be a bool, got int"),
        (lambda: _baseline(bl.DCGD, compressor=TopK(1)), ValueError,
         "DCGD needs an unbiased compressor (its theory and stepsizes assume E C(v) = v), got "
         "TopK(r=1)"),
        (lambda: _baseline(bl.ADIANA, compressor=3), TypeError,
         "compressor must be a Compressor, got int"),
        (lambda: _baseline(bl.DIANA, compressor=RandK(1), alpha=0.0), ValueError,
         "alpha must be > 0.0, got 0.0"),
        (lambda: _baseline(bl.DIANA, compressor=RandK(1), lr=-1.0), ValueError,
         "lr must be > 0.0, got -1.0"),
        (lambda: bl.ADIANA([torch.zeros(D, dtype=F64)], *problem(0), compressor=RandK(1),
                           lam=0.0, num_nodes=N), ValueError,
         "ADIANA's theoretical parameters need lam > 0 (strong convexity)"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64), torch.ones(1, dtype=F64)], *problem(0)),
         ValueError,
         "params must hold exactly one tensor (x), got 2"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], [[0.0]], problem(0)[1]), ValueError,
         "features must be a (rows, d=3) tensor matching the parameter's 3 elements, got list"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], problem(0)[0][:, :2], problem(0)[1]),
         ValueError, "features must be a (rows, d=3) tensor matching the parameter's 3 "
         "elements, got torch.Size([12, 2])"),
        (lambda: bl.BFGS([torch.zeros(D)], *problem(0)), TypeError,
         "features must have the parameter's dtype torch.float32, got torch.float64"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], problem(0)[0], [1.0]), ValueError,
         "targets must be a tensor of shape (12,), got list"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], problem(0)[0], problem(0)[1][:3]),
         ValueError, "targets must be a tensor of shape (12,), got torch.Size([3])"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], *problem(0), num_nodes=0), ValueError,
         "num_nodes must be a positive integer, got 0"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], *problem(0), num_nodes=False), ValueError,
         "num_nodes must be a positive integer, got False"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], *problem(0), num_nodes=5), ValueError,
         "features has 12 rows, not divisible into num_nodes=5 equal shards; drop the "
         "remainder (e.g. features[:10]) as the paper does"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], torch.zeros(0, D, dtype=F64),
                         torch.zeros(0, dtype=F64)), ValueError,
         "features has 0 rows, not divisible into num_nodes=1 equal shards; drop the remainder "
         "(e.g. features[:0]) as the paper does"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], *problem(0), generator=1), TypeError,
         "generator must be a torch.Generator, got int"),
        (lambda: bl.BFGS([torch.zeros(D, dtype=F64)], *problem(0), lam=-1.0), ValueError,
         "lam must be >= 0.0, got -1.0"),
    ],
)  # fmt: skip
def test_baseline_refusals_say_exactly_what_is_wrong(make, error, message):
    with pytest.raises(error) as info:
        make()
    assert type(info.value) is error and str(info.value) == message


def test_baseline_defaults_and_closure_refusal():
    A, b, x0 = _nodes_problem()
    x = x0.clone()
    opt = bl.DistributedNewton([x], A, b)
    assert opt.nodes.n == 1 and opt.param_groups[0]["lam"] == 1e-3
    assert opt.accounting == "theory" and opt.family == "theory"
    assert opt.nodes.loss is not None and opt.structured is False
    with pytest.raises(TypeError) as info:
        opt.step(lambda: 0.0)
    assert str(info.value) == (
        "DistributedNewton.step() takes no closure: the optimizer owns the data "
        "(features/targets) and evaluates P itself"
    )
    out = opt.step()
    assert out.dim() == 0 and opt.global_state["step"] == 1 and opt.counters() == {"step": 1}
    assert opt.global_state["bits_sent"].dtype == F64
    with torch.random.fork_rng():
        torch.manual_seed(5)
        seeded = bl.DCGD([x0.clone()], A, b, compressor=RandK(1)).generator.initial_seed()
    assert seeded == 5
    opt = bl.DCGD([x0.clone()], A, b, compressor=RandK(1), accounting="paper")
    assert opt.accounting == "authors-code" and opt.family == "authors"
    assert opt.lr == pytest.approx(1 / bl.global_smoothness(opt.nodes), rel=1e-15)


# ------------------------------------------------------------------------------------------------
# More on the conventions, batched compressors, and the collectives' arguments
# ------------------------------------------------------------------------------------------------


def test_authors_bills_defaults_and_refusals_name_the_convention():
    m, d = 7, 4
    one = 32 * (4 + 8 + 2) + math.log2(21)
    assert acc.nl_authors_iteration_bits("authors-text", "nl1", RandK(2), m, d) == pytest.approx(
        one, rel=1e-14
    )  # num_nodes defaults to 1
    assert acc.paper_iteration_bits("nl1", RandK(1), m, d) == 32 * (4 + 4 + 1)
    assert acc.paper_iteration_bits("nl1", Identity(), m, d) == 32 * (4 + 28 + 7)
    with pytest.raises(ValueError, match=r"^accounting='authors-text' reproduces"):
        acc.nl_authors_iteration_bits("authors-text", "nl1", NaturalCompression(), m, d)


def test_batched_messages_of_dithering_and_bernoulli():
    """``(nodes, rows, dim)`` batches: norms and bills per last-dimension row."""
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [6.0, 8.0]]], dtype=F64)
    out = RandomDithering(1)(x, gen(0))
    norms = x.norm(dim=-1, keepdim=True)
    # s = 1: every nonzero entry becomes ±‖row‖ or 0, a zero row stays zero
    assert bool(((out == 0) | (out.abs() == norms)).all()) and torch.equal(out[0, 1], x[0, 1])
    assert torch.equal(out[1, 0], torch.tensor([1.0, 0.0], dtype=F64))  # |x|/‖x‖ = 1: kept
    comp = Bernoulli(0.5, Identity())
    y = torch.arange(1.0, 25.0, dtype=F64).reshape(2, 4, 3)
    sent = comp(y, gen(3))
    bits = comp.message_bits(sent)
    assert bits.shape == (2, 4) and 0 < int((bits > 0).sum()) < 8
    assert torch.equal(bits, torch.where((sent != 0).any(-1), 96.0, 0.0).to(F64))


def _collective_spies(monkeypatch):
    """Record every collective's arguments (and run it): which operation, destination and
    source each protocol step uses."""
    calls = []
    for name in ("reduce", "all_reduce", "gather", "broadcast", "all_gather"):
        real = getattr(dist, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, spy)
    return calls


def test_collectives_use_the_protocols_operations(gloo_one, monkeypatch):
    t = tr.CollectiveTransport()
    calls = _collective_spies(monkeypatch)
    v = torch.tensor([1.0, 2.0])
    t.sum_to_server(v), t.max_everywhere(v), t.gather_to_server(v[None])
    t.broadcast_from_server(v), t.broadcast_generator(gen(0)), t.check_agreement({"a": 1})
    assert [c[0] for c in calls] == [
        "reduce", "all_reduce", "gather", "broadcast", "broadcast", "all_gather"
    ]  # fmt: skip
    kw = [c[1] for c in calls]
    assert kw[0] == dict(group=None, dst=0, op=dist.ReduceOp.SUM)
    assert kw[1] == dict(group=None, op=dist.ReduceOp.MAX)
    assert kw[2]["dst"] == 0 and len(kw[2]["gather_list"]) == 1
    assert kw[3] == dict(group=None, src=0) and kw[4] == dict(group=None, src=0)


@pytest.mark.parametrize(
    ("name", "call", "what"),
    [
        ("reduce", lambda t: t.sum_to_server(torch.ones(1)), "reduce(sum)"),
        ("all_reduce", lambda t: t.max_everywhere(torch.ones(1)), "all_reduce(max)"),
        ("gather", lambda t: t.gather_to_server(torch.ones(1, 1)), "gather(messages)"),
        ("broadcast", lambda t: t.broadcast_from_server(torch.ones(1)), "broadcast(x)"),
        ("broadcast", lambda t: t.broadcast_generator(gen(0)), "broadcast(generator)"),
        ("all_gather", lambda t: t.check_agreement({"a": 1}), "all_gather(metadata)"),
    ],
)
def test_a_failed_collective_names_its_protocol_step(gloo_one, monkeypatch, name, call, what):
    t = tr.CollectiveTransport()

    def broken(*args, **kwargs):
        raise RuntimeError("connection reset")

    monkeypatch.setattr(dist, name, broken)
    with pytest.raises(tr.ProtocolError) as info:
        call(t)
    assert str(info.value) == (
        f"NewtonLearn: the collective '{what}' failed on rank 0 of 1 (a peer process died, or "
        "the process group's timeout passed): connection reset"
    )


def test_disagreeing_ranks_are_named_with_their_values(gloo_one, monkeypatch):
    """A second rank (faked in ``all_gather``) with another number of features and dtype."""
    t = tr.CollectiveTransport()
    t.world_size = 2

    def all_gather(every, mine, group=None):
        every[0].copy_(mine)
        every[1].copy_(mine + torch.tensor([0, 1, 0, 2]))

    monkeypatch.setattr(dist, "all_gather", all_gather)
    meta = dict(nodes=2, features=5, rows=3, dtype=1)
    with pytest.raises(tr.ProtocolError) as info:
        t.check_agreement(meta)
    assert str(info.value) == (
        "NewtonLearn: the ranks disagree on features, dtype (values by rank: {'features': "
        "[5, 6], 'dtype': [1, 3]}); every rank must pass shards with the same number of nodes, "
        "rows per node and features, and the same dtype, variant and option"
    )


def test_gather_on_a_rank_that_is_not_the_server(gloo_one, monkeypatch):
    """A non-server rank passes no gather list (torch refuses one there) and gets nothing."""
    t = tr.CollectiveTransport()
    t.is_server = False
    seen = {}

    def gather(buf, gather_list=None, dst=0, group=None):
        seen.update(gather_list=gather_list, dst=dst)

    monkeypatch.setattr(dist, "gather", gather)
    rows = torch.ones(2, 3)
    out = t.gather_to_server(rows)
    assert out.shape == (0, 3) and seen == dict(gather_list=None, dst=0)


def test_compressors_keep_the_input_dtype_and_shape():
    x = torch.tensor([[[3.0, -0.5, 0.0, 1.0], [2.0, 0.25, -6.0, 0.0]]] * 2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for comp in (NaturalCompression(), RandomDithering(2), RandK(3), TopK(3), Identity(),
                     Bernoulli(0.5, RandK(2))):  # fmt: skip
            out = comp(x.to(dtype), gen(0))
            assert out.dtype == dtype and out.shape == (2, 2, 4), (comp, dtype)
    out = TopK(3)(x)  # r = 3 > 2 rows: only the last dimension bounds r
    row = torch.tensor([[3.0, -0.5, 0.0, 1.0], [2.0, 0.25, -6.0, 0.0]])
    assert torch.equal(out, torch.stack([row, row]))  # three nonzeros per row: all kept


def test_factor_updates_in_float64_for_float32_features():
    """float32 data, float64 algebra: the rank-one updates of the factor use the float64
    coefficients, so the factor stays the Cholesky factor of ``H + λI`` to float64 rounding."""
    A, b = problem(4)
    x = x0_param(0.1).detach().float().requires_grad_(True)
    opt = NewtonLearn([x], A.float(), b.float(), lam=LAM, num_nodes=N,
                      solver="cholesky_update", compressor=TopK(2), generator=gen(1))  # fmt: skip
    for _ in range(4):
        opt.step()
    state = opt.global_state
    assert state["chol"].dtype == F64 and state["refactorizations"] == 0
    # the factor is of the lower triangle (the float32 Gram matrix of H^0 is symmetric only
    # to float32 rounding)
    H = state["H"].tril() + state["H"].tril(-1).T + LAM * torch.eye(D, dtype=F64)
    torch.testing.assert_close(state["chol"] @ state["chol"].T, H, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", ["cholesky", "cholesky_update"])
def test_threaded_ranks_with_zero_features_and_padded_messages(monkeypatch, solver):
    """Rows whose first feature is 0 still reach the server, and the zero padding of the
    shorter messages adds nothing (the update solver would break on a zero coefficient)."""
    A, b = problem(8, rows=4 * M)
    A[::2, 0] = 0.0
    x0 = torch.full((D,), 0.1, dtype=F64)
    kw = dict(variant="nl1", solver=solver, compressor=TopK(1))
    # rank 0 starts from h^0 = 0 (a message per node), rank 1 from h(x^0) (no messages at
    # first): the two ranks' messages have different lengths
    h0 = [torch.zeros(2 * M, dtype=F64), dense(A[2 * M :], b[2 * M :], x0)[2]]
    got = run_threads(monkeypatch, 2, 2, 3, A, b, x0, h0=h0, **kw)
    x = x0.clone().requires_grad_(True)
    ref = NewtonLearn([x], A, b, lam=LAM, num_nodes=4, generator=gen(100), h0=torch.cat(h0),
                      **kw)  # fmt: skip
    traj = []
    for _ in range(3):
        ref.step()
        traj.append(x.detach().clone())
    torch.testing.assert_close(got[0][0], torch.stack(traj), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0][1].global_state["H"], ref.global_state["H"], rtol=0,
                               atol=1e-14)  # fmt: skip
    if solver == "cholesky_update":  # every update succeeded: no zero-coefficient "update"
        assert got[0][1].global_state["refactorizations"] == 0


def test_checkpoint_refuses_a_group_of_two_parameters():
    x, opt = _ckpt_opt()
    sd = opt.state_dict()
    group = dict(sd["param_groups"][0], params=[0, 1])
    assert _refusal(opt, {**sd, "param_groups": [group]}) == (
        "the checkpoint is not of one parameter group holding one parameter, as NewtonLearn's (x)"
    )


def test_version_01_checkpoint_without_history_and_options():
    """A checkpoint whose group holds only ``lam`` and ``params`` and that has no history keeps
    this optimizer's options and starts an empty history; a generator state saved in another
    integer dtype is read as bytes."""
    x, opt = _ckpt_opt(variant="nl2")
    sd = opt.state_dict()
    entry = dict(sd["state"][0])
    del entry["history"]
    entry["generator_state"] = entry["generator_state"].to(torch.int16)
    old = {"state": {0: entry}, "param_groups": [{"lam": 0.5, "params": [0]}]}
    y = x0_param(0.0)
    A, b = problem(5)
    other = NewtonLearn([y], A, b, lam=LAM, num_nodes=N, variant="nl2", eta=0.3)
    other.load_state_dict(old)
    group = other.param_groups[0]
    assert group["lam"] == 0.5 and group["variant"] == "nl2" and group["eta"] == 0.3
    assert group["gamma"] == 0.25 and group["option"] == 1 and other.history == []
    assert torch.equal(other.generator.get_state(), opt.generator.get_state())


def test_a_failure_inside_load_state_dict_restores_state_and_options():
    x, opt = _ckpt_opt()
    sd = opt.state_dict()
    bad = {**sd["state"][0], "generator_state": torch.zeros_like(opt.generator.get_state())}
    bad_group = dict(sd["param_groups"][0], lam=0.7)
    state_before, groups_before = opt.state, opt.param_groups
    with pytest.raises(RuntimeError, match="mt19937"):
        opt.load_state_dict({"state": {0: bad}, "param_groups": [bad_group]})
    assert opt.state is state_before and opt.param_groups is groups_before
    assert opt.param_groups[0]["lam"] == LAM and opt.counters()["step"] == 2


def test_compressor_defaults():
    assert RandK().r == 1 and TopK().r == 1 and RandomDithering().s == 1


def test_theory_accounting_takes_any_compressor():
    opt = _build(compressor=NaturalCompression(), accounting="realistic", eta=0.5)
    assert opt.accounting == "realistic" and opt.eta == 0.5


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(lam=0.0), "lam must be > 0.0, got 0.0"),
        (dict(lam=-1.0, variant="nl2"), "lam must be >= 0.0, got -1.0"),
        (dict(eta=0.0), "eta must be > 0.0, got 0.0"),
        (dict(A=lambda: problem(0)[0].to_sparse_csc()),
         "features must be a dense, sparse CSR or sparse COO tensor, got torch.sparse_csc"),
        (dict(A=lambda: problem(0)[0].to("meta")), "features are on meta, the parameter on cpu"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Sparse CSC tensor support is in beta")
def test_more_constructor_refusals(kw, message):
    kw = {k: v() if callable(v) else v for k, v in kw.items()}
    with pytest.raises(ValueError) as info:
        _build(**kw)
    assert str(info.value) == message


def test_float64_algebra_up_to_the_size_limit(monkeypatch):
    A, b = problem(0)
    monkeypatch.setattr(nlm, "MAX_FLOAT64_SOLVE", D)
    assert _build(A=A.float(), b=b.float(), x=torch.zeros(D, requires_grad=True)).solve_dtype == F64
    monkeypatch.setattr(nlm, "MAX_FLOAT64_SOLVE", D - 1)
    opt = _build(A=A.float(), b=b.float(), x=torch.zeros(D, requires_grad=True))
    assert opt.solve_dtype == torch.float32 and opt.global_state["H"].dtype == torch.float32


def test_h0_takes_the_parameters_dtype():
    A, b = problem(0)
    opt = _build(A=A.float(), b=b.float(), x=torch.zeros(D, requires_grad=True),
                 h0=torch.full((12,), 0.1, dtype=F64))  # fmt: skip
    assert opt.global_state["h"].dtype == torch.float32 and opt.global_state["h"].shape == (3, 4)


def test_cnl_default_cubic_reg_is_in_defaults_and_group():
    opt = _build(variant="cnl")
    M_ = opt.param_groups[0]["cubic_reg"]
    assert M_ > 0 and opt.defaults["cubic_reg"] == M_


_SKIPPED = (
    ": every step would be skipped. Start from another x⁰, or write φ in an overflow-safe form "
    "(e.g. softplus(-b*t) rather than log(1 + exp(-b*t)))"
)


def _start_error(**kw):
    with pytest.raises(ValueError) as info:
        _build(**kw)
    return str(info.value)


def test_non_finite_starts_are_refused_with_the_reason():
    A, b = problem(0)
    A0 = A.clone()
    A0[:, 0] = 0.0  # x⁰'s first entry does not reach the margins
    huge = torch.tensor([1e160, 0.0, 0.0], dtype=F64, requires_grad=True)
    # P(x⁰) overflows through λ‖x⁰‖²/2 alone (margins, φ, φ' and φ'' are finite): every step
    # would be skipped
    assert _start_error(A=A0, x=huge) == (
        "loss='logistic' is not finite at x⁰ (φ, φ', φ'' = h(x⁰) or λ‖x⁰‖²/2 overflows there)"
        + _SKIPPED
    )
    # ‖x⁰‖² is evaluated in the server's float64: float32 x⁰ = 1e30 is a fine start
    _build(A=A0.float(), b=b.float(), x=torch.tensor([1e30, 0.0, 0.0], requires_grad=True))
    # an infinite entry that sparse products never touch (under 25 % stored entries: the
    # features stay sparse): only x⁰ itself and P are not finite
    inf = torch.tensor([math.inf, 0.0, 0.0], dtype=F64, requires_grad=True)
    sparse = torch.zeros(12, D, dtype=F64)
    sparse[torch.arange(8), 1 + torch.arange(8) % 2] = torch.linspace(-1.0, 1.0, 8, dtype=F64)
    assert _start_error(A=sparse.to_sparse_csr(), x=inf) == (
        "loss='logistic' is not finite at x⁰ (x⁰ (the parameter) has non-finite entries)" + _SKIPPED
    )

    def power15(t, y):  # |t|^1.5: φ and φ' finite at t = 0, φ'' infinite
        return (t - 0 * y).abs() ** 1.5

    assert _start_error(loss=power15, gamma=1.0) == (
        "loss='power15' is not finite at x⁰ (φ, φ', φ'' = h(x⁰) or λ‖x⁰‖²/2 overflows there)"
        + _SKIPPED
    )

    class Exp:  # a callable without __name__: named by its repr
        def __call__(self, t, y):
            return torch.exp(t * y)

        def __repr__(self):
            return "Exp()"

    x = torch.zeros(D, dtype=F64, requires_grad=True)
    with torch.no_grad():
        x[1] = 1.0
    A1 = A.clone()
    A1[0, 1] = 800.0  # one row overflows: φ = e^{±800} there
    b1 = torch.ones_like(b)
    assert _start_error(A=A1, b=b1, x=x, loss=Exp(), gamma=1.0) == (
        "loss='Exp()' is not finite at x⁰ (φ, φ', φ'' = h(x⁰) or λ‖x⁰‖²/2 overflows there)"
        + _SKIPPED
    )
    h0 = torch.zeros(12, dtype=F64)
    h0[5] = math.nan
    assert _start_error(h0=h0) == "h0 is not finite: 1 entries are NaN or ±inf"


def test_chol_lam_of_a_checkpoint_without_lam_anywhere():
    x, opt = _ckpt_opt(solver="cholesky_update")
    sd = opt.state_dict()
    del sd["state"][0]["chol_lam"]
    del sd["param_groups"][0]["lam"]
    A, b = problem(5)
    other = NewtonLearn([x0_param(0.0)], A, b, lam=0.125, num_nodes=N, solver="cholesky_update")
    other.load_state_dict(sd)
    assert other.global_state["chol_lam"] == 0.125 and other.param_groups[0]["lam"] == 0.125


def test_collective_transport_device_and_group_queries(gloo_one, monkeypatch):
    """The NCCL backend puts the messages on the current CUDA device; rank, size, backend and
    the server's global rank are those of the given group."""
    group = dist.new_group([0])
    asked = []
    for name in ("get_rank", "get_world_size", "get_backend"):
        real = getattr(dist, name)

        def spy(g=None, _real=real, _name=name):
            asked.append((_name, g))
            return _real(g)

        monkeypatch.setattr(dist, name, spy)
    monkeypatch.setattr(dist, "get_global_rank", lambda g, r: 5 + r)
    t = tr.CollectiveTransport(group, 0)
    assert t._server == 5 and t.server_rank == 0
    assert asked == [("get_rank", group), ("get_world_size", group), ("get_backend", group)]
    monkeypatch.setattr(dist, "get_backend", lambda g=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert tr.CollectiveTransport(group, 0).device == torch.device("cuda", 3)


def test_the_regulariser_is_checked_as_the_server_evaluates_it():
    """``λ‖x⁰‖²/2`` in float64 at the edge of overflow (λ = 4, so that ``‖x⁰‖²`` itself is
    finite): just finite is a fine start, just infinite is refused; a finite ``Σφ`` and a
    finite regulariser that overflow together are refused too."""
    A, b = problem(0)
    A0 = A.clone()
    A0[:, 0] = 0.0
    big = torch.finfo(F64).max

    def x_with_reg(fraction):  # x⁰ = (x1, 0, 0) with λ x1²/2 = fraction · max
        x1 = math.sqrt(fraction / 2) * math.sqrt(big)
        return torch.tensor([x1, 0.0, 0.0], dtype=F64, requires_grad=True)

    _build(A=A0, x=x_with_reg(0.3), lam=4.0)  # 4× that would overflow: still a fine start
    error = _start_error(A=A0, x=x_with_reg(1.2), lam=4.0)  # 2/3 of it would not overflow
    assert "λ‖x⁰‖²/2 overflows" in error
    # one row's φ = e^t ≈ 0.6·max and the regulariser ≈ 0.6·max: P overflows, their
    # difference would not
    A1 = torch.zeros(12, D, dtype=F64)
    A1[0, 1] = 1.0
    x1 = math.sqrt(0.3) * math.sqrt(big)
    x = torch.tensor([x1, math.log(0.6 * big), 0.0], dtype=F64, requires_grad=True)
    error = _start_error(A=A1, x=x, loss=lambda t, y: torch.exp(t), gamma=1.0, lam=4.0)
    assert "overflows there" in error


def test_a_rank_whose_only_fault_is_one_entry_stops_every_rank(monkeypatch):
    """One non-finite ``h⁰`` entry, or ``h(x⁰)`` infinite on one row only, on rank 1: rank 0
    learns it from the exchanged flags and stops too."""
    A, b = problem(2, rows=4 * M)
    h0 = torch.zeros(2 * M, dtype=F64)
    h0[3] = math.nan
    errors = _rank_errors(monkeypatch, A, b, kw=dict(h0=h0))
    assert str(errors[1]) == "h0 is not finite: 1 entries are NaN or ±inf"
    assert str(errors[0]).startswith("NewtonLearn: another rank refused its start")

    def zero_row(a, c):  # a zero row: margin 0, where |t|^1.5 has φ'' = ∞
        a[2] = 0.0
        return a, c

    def power15(t, y):
        return (t - 0 * y).abs() ** 1.5

    h0 = torch.full((2 * M,), 0.1, dtype=F64)  # finite: only h(x⁰) is not
    errors = _rank_errors(monkeypatch, A, b, x0=0.1, data=zero_row,
                          common=dict(loss=power15, gamma=1.0, h0=h0))  # fmt: skip
    assert "overflows there" in str(errors[1])
    assert str(errors[0]).startswith("NewtonLearn: another rank refused its start")


# ------------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------------


def test_fit_stops_at_the_first_gap_estimate_below_tol():
    A, b = problem(9, rows=40)
    x = torch.zeros(D, dtype=F64, requires_grad=True)
    opt = NewtonLearn([x], A, b, lam=LAM)  # one node, Identity: Newton with a lagged Hessian
    hist = opt.fit(tol=1e-12, max_iter=50)
    gaps = [h["gap_estimate"] for h in hist]
    assert hist == opt.history and len(hist) == opt.counters()["step"] < 50
    assert gaps[-1] <= 1e-12 < min(gaps[:-1])
    # the estimate is ½ ∇Pᵀ(H^k + λI)⁻¹∇P at the step's starting point
    _, g, _ = dense(A, b, torch.zeros(D, dtype=F64))
    H0 = gram(A, dense(A, b, torch.zeros(D, dtype=F64))[2]) + LAM * torch.eye(D, dtype=F64)
    assert gaps[0] == pytest.approx(0.5 * float(g @ torch.linalg.solve(H0, g)), rel=1e-12)
    more = opt.fit(tol=1e-12, max_iter=5)  # a second call returns its own iterations only
    assert len(more) == 1 and opt.history[-1] is more[0] and len(opt.history) == len(hist) + 1


def test_fit_stops_at_a_zero_gap_and_warns_when_max_iter_ends_it():
    A, _ = problem(9, rows=40)
    x = torch.zeros(D, dtype=F64, requires_grad=True)
    opt = NewtonLearn([x], A, torch.zeros(40, dtype=F64), loss="squared", lam=LAM)
    hist = opt.fit(tol=1e-300, max_iter=3)  # x⁰ = 0 is the minimiser: ∇P = 0, gap 0 exactly
    assert len(hist) == 1 and hist[0]["gap_estimate"] == 0.0
    A, b = problem(9, rows=40)
    opt = NewtonLearn([torch.zeros(D, dtype=F64, requires_grad=True)], A, b, lam=LAM)
    with pytest.warns(RuntimeWarning) as record:
        hist = opt.fit(tol=1e-300, max_iter=3)
    gap = hist[-1]["gap_estimate"]
    assert len(hist) == 3 and gap > 1e-300 and len(record) == 1
    assert str(record[0].message) == (
        f"NewtonLearn.fit: max_iter=3 iterations ended with the gap estimate {gap:.3g} > "
        "tol=1e-300; raise max_iter"
    )
    # a gap estimate equal to tol ends the fit (the same first step, the same estimate)
    first = hist[0]["gap_estimate"]
    again = NewtonLearn([torch.zeros(D, dtype=F64, requires_grad=True)], A, b, lam=LAM)
    assert len(again.fit(tol=first, max_iter=3)) == 1
    assert record[0].filename == __file__  # reported at the caller, not inside fit
    with pytest.raises(ValueError, match=r"^tol must be > 0\.0, got 0\.0$"):
        opt.fit(tol=0.0)
    with pytest.raises(ValueError, match=r"^max_iter must be an integer >= 1, got 0$"):
        opt.fit(max_iter=0)
    assert opt.counters()["step"] == 3


def test_fit_defaults():
    """``fit()``: ``tol = 1e-10``, at most 100 iterations (here every step is skipped: a NaN
    ``λ`` makes the gradient NaN, so the estimate never drops below ``tol``)."""
    A, b = problem(9, rows=40)
    opt = NewtonLearn([torch.zeros(D, dtype=F64, requires_grad=True)], A, b, lam=LAM)
    opt.param_groups[0]["lam"] = math.nan
    with pytest.warns(RuntimeWarning, match=r"^NewtonLearn\.fit: max_iter=100 iterations ended "
                      r"with the gap estimate nan > tol=1e-10; raise max_iter$"):  # fmt: skip
        hist = opt.fit()
    assert len(hist) == 100 and opt.counters() == {"step": 100, "skipped_steps": 100}
    opt = NewtonLearn([torch.zeros(D, dtype=F64, requires_grad=True)], A, b, lam=LAM)
    gaps = [h["gap_estimate"] for h in opt.fit()]
    assert gaps[-1] <= 1e-10 < min(gaps[:-1])


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (bl.DistributedNewton, {}),
        (bl.BFGS, {}),
        (bl.DCGD, dict(compressor=RandK(2))),
        (bl.DIANA, dict(compressor=RandK(2))),
        (bl.ADIANA, dict(compressor=RandK(2))),
        (bl.DINGO, {}),
    ],
)
def test_every_baseline_step_returns_p_at_its_starting_point(cls, kw):
    """``step()`` returns ``P(x^k) = mean φ + (λ/2)‖x^k‖²`` (ADIANA: at ``y^k``)."""
    A, b, x0 = _nodes_problem()
    x = x0.clone()
    opt = cls([x], A, b, lam=LAM, num_nodes=N, generator=gen(2), **kw)
    for _ in range(2):
        start = x.clone()
        P = opt.step()
        want = softplus(-b * (A @ start)).mean() + LAM / 2 * start.dot(start)
        torch.testing.assert_close(P, want, rtol=1e-14, atol=0)
        assert opt.history[-1]["loss"] == float(P)


@pytest.mark.parametrize(("theta", "cases"), [(1e-4, [3, 0, 0]), (3.0, [0, 0, 3])])
def test_dingo_counts_its_cases(theta, cases):
    x, opt = _baseline(bl.DINGO, theta=theta)
    for _ in range(3):
        opt.step()
    assert opt.global_state["cases"] == cases and opt.global_state["line_search_failures"] == 0


def test_adiana_eta_when_its_first_bound_is_the_smaller():
    """``n ≥ 128ω``: both bounds of ``η`` are ``1/(2L)``; for ``L < 1/2``, ``L/2`` and ``2L``
    would be smaller."""
    for L in (0.25, 0.4):
        assert bl.adiana_parameters(L, 1e-3, 1.0, 3200).eta == pytest.approx(1 / (2 * L), 1e-14)
