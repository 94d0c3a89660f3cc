"""Build entry for torch_rankone.

The pure-Python package installs everywhere. The compiled extension ``torch_rankone._C``
(C++ kernels, plus CUDA ones when torch has CUDA and nvcc exists) is assembled by
``_extensions()``; it builds against the torch that is already installed, hence
``pip install --no-build-isolation -e .``.
"""

from setuptools import setup


def _extensions() -> tuple[list, dict]:
    """Return ``(ext_modules, cmdclass)`` for the compiled kernels (none yet)."""
    return [], {}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
