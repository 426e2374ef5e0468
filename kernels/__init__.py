"""Fused kernels. CPU kernels are C++ in `cpu/`, built by CMakeLists.txt into a C-ABI shared
library that this package loads with ctypes (found through the import system, so an editable
install and a wheel both work)."""

import ctypes
import importlib.util
from functools import cache


@cache
def cpu_library() -> ctypes.CDLL:
    """The compiled CPU kernel library; a clear error if the build step did not run."""
    spec = importlib.util.find_spec("facert.kernels.libfacert_cpu")
    if spec is None or spec.origin is None:
        raise ImportError(
            "facert's CPU kernels are not built: install facert with pip (it runs CMake), "
            "e.g. `pip install -e .`"
        )
    return ctypes.CDLL(spec.origin)
