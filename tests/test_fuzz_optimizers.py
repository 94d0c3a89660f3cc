"""Fuzzing the optimizers' public inputs (Hypothesis; derandomised in CI by the ``ci`` profile of
``conftest.py``): hyper-parameters of every kind, closures returning odd values or raising,
curvature sources, dtypes, empty and zero-size parameters. Every outcome must be one of

* a clear refusal — ``ValueError``/``TypeError`` or a package error (``CurvatureError``) whose
  message names what was wrong — with the parameters, their gradients' absence and the counters
  exactly as they were, or the closure's own exception, with the parameters restored;
* a valid step — finite parameters where the loss was finite, the step masked where it was not,
  and ``step + skipped_steps`` equal to the ``step()`` calls that returned.

Never another exception type, never a silently corrupted state.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from torch_rankone import FisherNewton, NeumannIHVP, RankOneNewton
from torch_rankone.optim import CurvatureError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ClosureError(Exception):
    """Raised by a fuzzed closure: must reach the caller unchanged."""


ODD = [-1.0, 0.0, math.nan, math.inf, -math.inf, 1e308, "0.1", None, True, [0.1]]
HYPER = {
    "lr": st.sampled_from([1e-3, 0.1, 1.0, *ODD]),
    "damping": st.sampled_from([1e-4, 1.0, 4.0, *ODD]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9, 1.0, *ODD]),
    "weight_decay": st.sampled_from([0.0, 1e-2, *ODD]),
}
CLASSES = {
    "RankOneNewton": RankOneNewton,
    "RankOneNewton-isotropic": lambda ps, **k: RankOneNewton(ps, preconditioner="isotropic", **k),
    "NeumannIHVP": lambda ps, **k: NeumannIHVP(ps, num_terms=3, **k),
    "FisherNewton": FisherNewton,
}
VALUES = ["finite", "nan", "inf", "none", "float", "matrix", "detached", "raises"]


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(CLASSES)))
    hyper = {k: draw(v) for k, v in HYPER.items() if draw(st.booleans())}
    return dict(
        name=name,
        hyper=hyper,
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16])),
        zero_size=draw(st.booleans()),
        frozen=draw(st.booleans()),
        source=draw(st.sampled_from(["backward", "loss", "graph"])),
        values=draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3)),
    )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid(key: str, value) -> bool | None:
    """True: every optimizer must accept it; False: every one must refuse it; None: either (a
    zero damping is singular for some modes only; ``None`` means a default for some)."""
    if value is None:  # "the default": damping everywhere, momentum for RankOneNewton only
        return True if key == "damping" else None
    if not _number(value) or value < 0:
        return False
    if key == "momentum":
        return value < 1
    if key == "damping" and value == 0:
        return None
    return True


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _unchanged(params, saved) -> bool:
    return all(torch.equal(p.detach(), s) for p, s in zip(params, saved))


@SETTINGS
@given(case=cases())
def test_fuzzed_inputs_give_a_clear_error_or_a_valid_step(case):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(case["dtype"])
    params = list(model.parameters())
    if case["zero_size"]:
        params.append(nn.Parameter(torch.zeros(0, 3, dtype=case["dtype"])))
    if case["frozen"]:
        params[0].requires_grad_(False)
    fisher = case["name"] == "FisherNewton"
    x = torch.randn(8, 3, dtype=case["dtype"])
    y = torch.randint(0, 2, (8,))
    verdicts = {k: _valid(k, v) for k, v in case["hyper"].items()}
    try:
        opt = CLASSES[case["name"]](params, **case["hyper"])
    except (ValueError, TypeError) as exc:
        bad = [k for k, ok in verdicts.items() if ok is not True]
        assert bad, f"refused valid hyper-parameters {case['hyper']}: {exc}"
        assert any(k in str(exc) for k in bad), f"message names no bad argument: {exc}"
        return
    assert False not in verdicts.values(), f"accepted invalid hyper-parameters {case['hyper']}"
    returned = 0
    for value in case["values"]:

        def losses(value=value):
            out = F.cross_entropy(model(x).float(), y, reduction="none").to(case["dtype"])
            if value == "nan":
                out = out * math.nan
            elif value == "inf":
                out = out + math.inf
            elif value == "none":
                return None
            elif value == "float":
                return 1.0
            elif value == "matrix":
                return out[:, None].expand(8, 2)
            elif value == "detached":
                return out.detach()
            elif value == "raises":
                raise ClosureError("from the closure")
            return out if fisher else out.mean()

        def closure():
            if case["source"] == "backward" and not fisher:
                opt.zero_grad()
                loss = losses()
                if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.dim() == 0:
                    loss.backward()
                return loss
            return losses()

        before = _snapshot(params)
        counters = opt.counters()
        try:
            if case["source"] == "graph" and not fisher:
                opt.zero_grad()
                loss = losses()
                if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.dim() == 0:
                    loss.backward(create_graph=True)
                opt.step()
            else:
                opt.step(closure)
        except ClosureError:
            assert _unchanged(params, before), "a raising closure left the parameters changed"
            assert opt.counters() == counters
            continue
        except (CurvatureError, ValueError, TypeError) as exc:
            assert str(exc), "an error without a message"
            assert _unchanged(params, before), f"refused ({exc}) but the parameters changed"
            assert opt.counters() == counters, f"refused ({exc}) but the counters moved"
            continue
        returned += 1
        after = opt.counters()
        assert (
            after["step"] + after["skipped_steps"]
            == counters["step"] + counters["skipped_steps"] + 1
        )
        if after["skipped_steps"] > counters["skipped_steps"]:
            assert _unchanged(params, before), "a skipped step changed the parameters"
        else:
            assert all(torch.isfinite(p).all() for p in params), "an applied step is not finite"
            # graph gradients do not show the loss: +inf (a constant) leaves them finite
            seen_loss = case["source"] != "graph" or fisher
            assert value == "finite" or (value == "inf" and not seen_loss), (
                f"a {value!r} loss was applied as a step"
            )
    assert opt.counters()["step"] + opt.counters()["skipped_steps"] == returned
