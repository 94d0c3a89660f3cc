"""Reproductions of the seed papers' experiments (run as modules, e.g.
``python -m torch_rankone.experiments.paper --dataset a9a --lam 1e-3``)."""
