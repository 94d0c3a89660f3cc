"""The optimizers' own random generators."""

from __future__ import annotations

import hashlib

import torch


def owned_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``torch.initial_seed()`` through a hash.

    Reproducible from the global seed (``torch.manual_seed(s)`` fixes it), yet not a replay of
    the global stream: seeding with ``torch.initial_seed()`` itself would make the first random
    direction equal the first tensor the user draws after ``torch.manual_seed(s)``. On the
    parameters' device, directions are drawn where they are used (no copies, no host sync).
    """
    digest = hashlib.sha256(f"torch_rankone:{torch.initial_seed()}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return generator
