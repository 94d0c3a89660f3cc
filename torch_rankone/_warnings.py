"""Warnings reported at the user's line of code.

A fixed ``stacklevel`` points into torch internals as soon as ``step`` is wrapped (LR schedulers
wrap it; Lightning and the HuggingFace Trainer call it from deep inside), so the location is
found by walking the stack to the first frame outside these packages.
"""

from __future__ import annotations

import os
import sys
import warnings

#: top-level modules whose frames are never the user's code
_INTERNAL = (
    "torch_rankone",
    "torch",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "accelerate",
    "warnings",
    "contextlib",
    "functools",
    "mutmut",  # the mutation-testing tool wraps every function of the package
)


def _is_internal(module: str) -> bool:
    return module.split(".", 1)[0] in _INTERNAL


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package, torch and the
    training frameworks (filters and once-per-location registries keep working)."""
    frame = sys._getframe(1)
    while frame is not None and _is_internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals, filename = frame.f_globals, frame.f_code.co_filename
    warnings.warn_explicit(
        message,
        category,
        filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        # the source line in the message, as warnings.warn shows; only for files: linecache
        # raises ImportError for `python -c` code, whose __main__ has a built-in loader
        module_globals=module_globals if os.path.isfile(filename) else None,
    )
