"""``warn_at_caller`` attributes a warning to the user's line, however many package, torch or
framework frames lie in between (LR schedulers wrap ``optimizer.step``), and filters and the
once-per-location registry keep working."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from torch_rankone import _warnings
from torch_rankone._warnings import warn_at_caller

# Functions whose frames look like the package's own: their module globals are named
# ``torch_rankone.fake``, exactly what the stack walk looks at.
_PACKAGE_SOURCE = """
import torch
from torch_rankone._warnings import warn_at_caller

def inner(message, category=RuntimeWarning):
    warn_at_caller(message, category)

def middle(message, category=RuntimeWarning):
    inner(message, category)

def outer(message, category=RuntimeWarning):
    middle(message, category)

class Fake(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        middle("unhealthy step")


class FixedStacklevel(Fake):
    def step(self, closure=None):
        import warnings
        warnings.warn("unhealthy step", RuntimeWarning, stacklevel=2)
"""
_pkg: dict = {"__name__": "torch_rankone.fake"}
exec(compile(_PACKAGE_SOURCE, "<torch_rankone.fake>", "exec"), _pkg)


def _line() -> int:
    """The line number of the caller."""
    return inspect.currentframe().f_back.f_lineno


def test_through_a_chain_of_package_frames_the_warning_points_at_the_caller():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _line() + 1
        _pkg["outer"]("look here")
    (w,) = rec
    assert w.filename == __file__ and w.lineno == line
    assert w.category is RuntimeWarning and str(w.message) == "look here"


def test_through_an_lr_scheduler_wrapped_step_the_warning_points_at_the_caller():
    opt = _pkg["Fake"]([torch.nn.Parameter(torch.zeros(2))])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _line() + 1
        opt.step()
        sched.step()
    (w,) = [w for w in rec if str(w.message) == "unhealthy step"]
    assert w.filename == __file__ and w.lineno == line


def test_a_fixed_stacklevel_would_point_into_torch():
    # why the stack is walked: the scheduler's wrapper sits between the user and step()
    opt = _pkg["FixedStacklevel"]([torch.nn.Parameter(torch.zeros(2))])
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step()
    (w,) = rec
    assert w.filename != __file__ and "torch" in w.filename


def test_user_category_and_error_filter():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="as an error"):
            _pkg["outer"]("as an error", UserWarning)


def test_module_filters_match_the_user_module_not_the_package():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=r"torch_rankone")  # not where it is attributed
        _pkg["outer"]("still shown")
    assert [str(w.message) for w in rec] == ["still shown"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.filterwarnings("error", module=__name__.replace(".", r"\."))
        with pytest.raises(RuntimeWarning):
            _pkg["outer"]("raised")


def test_once_per_location():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")  # once per (message, category, module, line)
        for _ in range(3):
            _pkg["outer"]("repeated")
        _pkg["outer"]("repeated")  # another line: shown again
    assert len(rec) == 2 and rec[0].lineno != rec[1].lineno


def test_without_a_user_frame_it_falls_back_to_warnings_warn(monkeypatch):
    monkeypatch.setattr(_warnings, "_is_internal", lambda module: True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warn_at_caller("no user frame")
    (w,) = rec
    assert str(w.message) == "no user frame" and w.category is RuntimeWarning


def test_code_without_a_source_file_gets_its_warning():
    """``python -c`` (and notebooks) have no file for linecache: the warning is still shown."""
    import subprocess
    import sys

    code = "from torch_rankone._warnings import warn_at_caller; warn_at_caller('checked')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "<string>:1: RuntimeWarning: checked" in out.stderr
