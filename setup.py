"""Build entry for torch_rankone.

The compiled extension ``torch_rankone._C`` (the kernels of ``csrc/``) is built against
the torch that is already installed, hence ``pip install --no-build-isolation -e .``:

* always the C++ sources (``csrc/**/*.cpp``), a ``CppExtension``;
* plus the CUDA sources (``csrc/**/*.cu``), a ``CUDAExtension``, when torch was built with CUDA
  and ``nvcc`` is found (``CUDA_HOME`` or ``PATH``);
* nothing with ``TORCH_RANKONE_BUILD_EXT=0``: the package then runs on its pure-PyTorch
  references (``torch_rankone.has_extension()`` is False).

Flags: ``-O3 -ffp-contract=fast`` (fused multiply-adds) and ``-fopenmp`` where torch uses OpenMP;
no ``-march=native`` and no ``-ffast-math`` (the wheel must run on other CPUs, and fast-math
breaks NaN propagation, which the optimizers rely on). The CPU loops are compiled a second time
for AVX2+FMA and picked at run time (``csrc/cpu/kernels_avx2.cpp``). The build uses ninja when
present (``MAX_JOBS`` caps its parallelism).

``nvcc_compile_command`` is also used by ``tests/test_ext.py`` to compile the CUDA sources on
machines whose torch has no CUDA (the build check); importing this file does not run ``setup()``.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CXX_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cpp"))
CUDA_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cu"))
CXX_FLAGS = ["/O2"] if sys.platform == "win32" else ["-O3", "-ffp-contract=fast"]
NVCC_FLAGS = ["-O3"]


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's CPU threads are OpenMP (Linux wheels): ``at::parallel_for`` is a
    header template whose ``#pragma omp parallel`` is compiled into the extension, so without the
    flag the kernels would run on one thread. Elsewhere they do (correct, slower)."""
    import torch

    linux_gcc_like = sys.platform.startswith("linux")
    return ["-fopenmp"] if linux_gcc_like and torch.backends.openmp.is_available() else []


def _build_cuda() -> bool:
    """Torch was built with CUDA and torch's build helpers found the CUDA toolkit (nvcc)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions() -> tuple[list, dict]:
    """Return ``(ext_modules, cmdclass)`` for ``torch_rankone._C``."""
    if os.environ.get("TORCH_RANKONE_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    openmp = _openmp_flags()
    cxx = {"extra_compile_args": {"cxx": CXX_FLAGS + openmp}, "extra_link_args": openmp}
    if _build_cuda():
        cxx["extra_compile_args"]["nvcc"] = NVCC_FLAGS
        ext = CUDAExtension(
            "torch_rankone._C",
            CXX_SOURCES + CUDA_SOURCES,
            define_macros=[("TORCH_RANKONE_WITH_CUDA", None)],
            **cxx,
        )
    else:
        ext = CppExtension("torch_rankone._C", CXX_SOURCES, **cxx)
    return [ext], {"build_ext": BuildExtension}


def nvcc_compile_command(source: str | Path, output: str | Path, arch: str = "sm_90") -> list[str]:
    """The ``nvcc -c`` command line that compiles one CUDA source of ``torch_rankone._C``.

    The same preprocessor flags, language standard and optimisation as ``CUDAExtension`` uses,
    against the installed torch's headers and the CUDA toolkit of the ``nvcc`` on ``PATH`` (or
    ``CUDA_HOME``), for one architecture. ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` skips
    ``c10/cuda/impl/cuda_cmake_macros.h``, which CPU-only torch wheels do not ship (it only
    defines a Windows DLL-export switch). Raises ``FileNotFoundError`` without ``nvcc``.
    """
    import torch
    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(cuda_home, "bin", "nvcc")) if cuda_home else shutil.which("nvcc")
    if nvcc is None or not Path(nvcc).is_file():
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    includes = [
        *cpp_extension.include_paths(),
        str(Path(nvcc).resolve().parent.parent / "include"),
        sysconfig.get_paths()["include"],
    ]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(output),
        *(f"-I{p}" for p in includes),
        *cpp_extension.COMMON_NVCC_FLAGS,
        *NVCC_FLAGS,
        "-std=c++20",
        f"-arch={arch}",
        "-Xcompiler",
        "-fPIC",
        "-DTORCH_RANKONE_WITH_CUDA",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
    ]


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
