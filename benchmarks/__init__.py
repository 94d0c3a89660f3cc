"""Benchmarks that are not part of the installed package.

``python -m benchmarks.peers`` compares the package's optimizers with the ones users would pick
instead (Adam, AdamW, SGD, LBFGS, AdaHessian, SophiaH) on four small workloads; see
:mod:`benchmarks.peers`. Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""
