"""What machine a benchmark ran on, and how fast it streams memory (the decode floor)."""

from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata

import numpy as np


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for pkg in ("numpy", "onnxruntime", "torch", "transformers", "onnxruntime-genai"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def read_bandwidth(size_mib: int = 1024, repeats: int = 5) -> dict:
    """Bytes per second the CPU cores read from DRAM, measured two ways on a buffer far larger
    than the caches: parallel sums over one slice per core, and a BLAS matrix-vector product
    (the access pattern of a decode step). The faster is the floor's denominator."""
    a = np.ones(size_mib * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(a, os.cpu_count() or 1)

    def parallel_sum() -> None:
        threads = [threading.Thread(target=p.sum) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    matrix = a.reshape(4096, -1)
    vector = np.ones(matrix.shape[1], dtype=np.float32)
    result = {}
    for name, fn in (("parallel_sum", parallel_sum), ("gemv", lambda: matrix @ vector)):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        result[name] = a.nbytes / best
    result["bytes_per_s"] = max(result.values())
    return result


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
