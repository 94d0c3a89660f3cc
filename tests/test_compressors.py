"""Compressors (SPEC §4.4, seed 002 §3.4): unbiasedness by Monte Carlo, the variance bound
``E‖C(x)‖² ≤ (ω+1)‖x‖²``, bit counts, seeded reproducibility and row independence."""

from __future__ import annotations

import math

import pytest
import torch

from torch_rankone.distributed.compressors import (
    Bernoulli,
    Compressor,
    Identity,
    NaturalCompression,
    RandK,
    RandomDithering,
    TopK,
)

DIM = 7
UNBIASED = [
    Identity(),
    RandK(1),
    RandK(3),
    RandomDithering(2),
    NaturalCompression(),
    Bernoulli(0.3, RandK(2)),
]
ALL = [*UNBIASED, TopK(2)]
DRAWS = 40_000


def _x() -> torch.Tensor:
    return torch.tensor([0.3, -1.7, 0.0, 2.5, -0.01, 0.9, 1.0], dtype=torch.float64)


def _draws(comp) -> torch.Tensor:
    """``DRAWS`` independent compressions of ``x`` in one batched call (rows are independent)."""
    x = _x().expand(DRAWS, DIM).contiguous()
    return comp(x, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("comp", UNBIASED, ids=repr)
def test_unbiased_by_monte_carlo(comp):
    out = _draws(comp)
    mean, se = out.mean(0), out.std(0) / math.sqrt(DRAWS)
    # 5 standard errors per entry (and exact where the entry never varies)
    assert ((mean - _x()).abs() <= 5 * se + 1e-12).all(), (mean, _x(), se)


@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_second_moment_within_omega(comp):
    out = _draws(comp)
    second = (out * out).sum(1).mean()
    bound = (comp.omega(DIM) + 1) * _x().dot(_x())
    assert second <= bound * 1.02, (float(second), float(bound))


def test_omega_is_tight_for_randk():
    """RandK: ``E‖C(x)‖² = (dim/r)‖x‖²`` exactly, i.e. ``ω = dim/r − 1`` cannot be lowered."""
    out = _draws(RandK(2))
    assert float((out * out).sum(1).mean() / _x().dot(_x())) == pytest.approx(DIM / 2, rel=0.02)


def test_randk_keeps_r_entries_scaled():
    out = RandK(3)(torch.arange(1.0, 11.0).expand(500, 10), torch.Generator().manual_seed(1))
    assert ((out != 0).sum(1) == 3).all()
    nz = out[out != 0].reshape(500, 3)
    orig = nz * 3 / 10  # each kept value is an original entry (1..10) times dim/r
    assert torch.allclose(orig, orig.round()) and ((orig >= 1) & (orig <= 10)).all()


def test_topk_keeps_largest_unscaled():
    x = _x()[None]
    assert torch.equal(TopK(2)(x), torch.tensor([[0, -1.7, 0, 2.5, 0, 0, 0]], dtype=x.dtype))
    assert not TopK(2).unbiased


def test_natural_compression_rounds_to_powers_of_two():
    out = _draws(NaturalCompression())
    nz = out[out != 0].abs()
    assert torch.equal(torch.exp2(torch.log2(nz).round()), nz)
    assert (out[:, 2] == 0).all()  # zero stays zero


def test_bernoulli_sends_with_probability_p():
    out = _draws(Bernoulli(0.3, Identity()))
    sent = (out != 0).any(1).double().mean()
    assert float(sent) == pytest.approx(0.3, abs=0.01)
    bits = Bernoulli(0.3, Identity()).message_bits(out)
    assert set(bits.unique().tolist()) == {0.0, 32.0 * DIM}


@pytest.mark.parametrize(
    ("comp", "bits"),
    [
        (Identity(), 32 * DIM),
        (RandK(1), 32 + math.log2(7)),
        (RandK(3), 96 + math.log2(35)),
        (TopK(2), 64 + math.log2(21)),
        (NaturalCompression(), 9 * DIM),
        (RandomDithering(3), 32 + DIM * 3),  # sign + 2-bit level per entry, 32 for the norm
        (Bernoulli(0.25, RandK(1)), 0.25 * (32 + math.log2(7))),
    ],
    ids=repr,
)
def test_bits(comp, bits):
    assert comp.bits(DIM) == pytest.approx(bits, rel=1e-12)


def test_omegas():
    assert RandK(2).omega(10) == 4.0
    assert Identity().omega(10) == 0.0
    assert NaturalCompression().omega(10) == 0.125
    assert RandomDithering(2).omega(16) == min(16 / 4, 4 / 2)
    assert Bernoulli(0.5, RandK(2)).omega(10) == pytest.approx(9.0)


@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_seeded_and_shape_only_randomness(comp):
    """Same seed, same output; and the generator advances by an amount that depends on the
    shape only (what keeps simulated and distributed NewtonLearn runs in step)."""
    x = torch.randn(5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(comp(x, g1), comp(x, g2))
    g3 = torch.Generator().manual_seed(9)
    comp(torch.zeros_like(x), g3)
    assert torch.equal(g1.get_state(), g3.get_state())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RandK(0), "r must be"),
        (lambda: TopK(1.5), "r must be"),
        (lambda: RandomDithering(0), "s must be"),
        (lambda: Bernoulli(0.0), "p must be"),
        (lambda: Bernoulli(1.5), "p must be"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bernoulli_inner_type_and_r_above_dim():
    with pytest.raises(TypeError, match="inner"):
        Bernoulli(0.5, "randk")
    with pytest.raises(ValueError, match="dim >= r"):
        RandK(8)(torch.zeros(DIM))


def test_compressor_subclass_missing_a_method_is_refused_at_construction():
    class NoOmega(Compressor):
        def __call__(self, x, generator=None):
            return x

        def bits(self, dim):
            return 32.0 * dim

    with pytest.raises(TypeError, match="abstract method.*omega"):
        NoOmega()
