"""Every public name of every public module imports in a fresh interpreter, in any order: no
import cycles (a module importing another that is half-initialised fails here)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import torch_rankone

PUBLIC = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(torch_rankone.__path__, "torch_rankone.")
    if not any(part.startswith("_") for part in name.split("."))
    and not name.startswith("torch_rankone.integrations")  # optional dependencies
)


@pytest.mark.parametrize("module", PUBLIC)
def test_module_and_its_public_names_import_first_in_a_fresh_interpreter(module):
    code = (
        f"import importlib; m = importlib.import_module({module!r}); "
        "names = getattr(m, '__all__', []); "
        "missing = [n for n in names if not hasattr(m, n)]; "
        "assert not missing, missing"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_list_covers_the_package():
    assert {"torch_rankone.glm", "torch_rankone.linalg", "torch_rankone.optim.newton_learn"} <= set(
        PUBLIC
    )
    assert "torch_rankone.distributed.transports" in PUBLIC
