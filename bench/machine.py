"""What machine a benchmark ran on, and how fast it streams memory (the decode floor)."""

from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata

import numpy as np


def cpu_kind(flags: set[str]) -> str:
    """The vector instructions the CPU kernel's products can use on this CPU: results differ
    most between AVX-512 hosts (with VNNI for int8) and AVX2-only ones, so every results file
    names which it came from."""
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        return "AVX-512 with VNNI"
    if {"avx2", "fma"} <= flags:
        if "avx512f" in flags:  # the kernel's AVX-512 products need BW and VNNI too
            return "AVX-512 without VNNI/BW: the kernel's AVX2 path"
        return "AVX2 (no AVX-512)"
    return "no AVX2 (portable kernel)"


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def describe() -> dict:
    cpu, flags = _cpuinfo()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for pkg in ("numpy", "onnxruntime", "torch", "transformers", "onnxruntime-genai"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cpu_kind": cpu_kind(flags),
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
