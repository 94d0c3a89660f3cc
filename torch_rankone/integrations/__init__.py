"""Integrations with training frameworks.

* :mod:`torch_rankone.integrations.lightning` — :class:`SecondOrderCallback` for a
  ``lightning.Trainer`` (extra ``pip install torch_rankone[lightning]``);
* :mod:`torch_rankone.integrations.hf` — :class:`SecondOrderTrainer`, a ``transformers.Trainer``
  subclass (extra ``pip install torch_rankone[hf]``).

This package imports nothing itself, so ``import torch_rankone`` works without either framework;
the submodules import theirs and say which extra to install when it is missing.
"""
