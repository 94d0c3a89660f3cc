"""The package's argument checks: one place for "a finite number at least ..." and "an integer at
least ...", so every option is refused with the same kind of message naming it."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float if it is a finite real ``≥ low`` (``> low`` when ``strict``); else a
    ``ValueError`` naming ``name``. A one-element tensor is read (a host sync: for set-up only)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return float(value)


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """``value`` if it is an ``int`` (not a bool) ``≥ low``; else a ``ValueError`` naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
