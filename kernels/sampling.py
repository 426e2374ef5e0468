"""Fused CPU sampling (numpy + ctypes): one token per logit row, each row with its own temperature,
top-k and top-p, and the uniform number u in [0, 1) that decides the draw.

The draw is the inverse CDF of the filtered softmax in vocabulary order, so the same u gives the
same token on any backend that implements the same filters. Semantics (kernels/cpu/sampling.cpp):
temperature <= 0 is greedy (first max wins); top_k outside (0, V) and top_p outside (0, 1) are off;
top-k keeps every token tied with the k-th value; top-p keeps a token iff the probability admitted
before it (higher probability first, lower index on ties) is <= top_p. NaN logits count as masked
like -inf, +inf as the largest float, and a row with every token masked yields token 0.
"""

import ctypes
from collections.abc import Callable
from functools import cache

import numpy as np
import numpy.typing as npt

from . import cpu_library

_MAX_VOCAB = 2**31 - 1  # the kernel stores vocabulary indices as int32


@cache
def _kernel() -> Callable[..., None]:
    fn = cpu_library().facert_sample
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
    fn.restype = None
    return fn


def _row_param(name: str, value: npt.ArrayLike, dtype: type, rows: int) -> np.ndarray:
    arr = np.ascontiguousarray(value, dtype=dtype)
    if arr.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) to match logits, got {arr.shape}")
    return arr


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
) -> np.ndarray:
    """logits float32 [B, V] (C-contiguous; convert if not), per-row params [B] -> int64 [B] token
    indices."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)  # [B, V]
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {logits.shape}")
    rows, vocab = logits.shape
    if not 1 <= vocab <= _MAX_VOCAB:
        raise ValueError(f"vocab size must be in [1, {_MAX_VOCAB}], got {vocab}")
    temperature = _row_param("temperature", temperature, np.float32, rows)
    # Clipping first keeps the int32 cast exact; 0 and V both mean "top-k off".
    top_k = _row_param("top_k", np.clip(top_k, 0, vocab), np.int32, rows)
    top_p = _row_param("top_p", top_p, np.float32, rows)
    uniform = _row_param("uniform", uniform, np.float32, rows)
    if not np.all((uniform >= 0.0) & (uniform < 1.0)):
        raise ValueError("uniform must lie in [0, 1)")

    out = np.empty(rows, dtype=np.int64)  # [B]
    if rows:
        _kernel()(
            logits.ctypes.data,
            rows,
            vocab,
            temperature.ctypes.data,
            top_k.ctypes.data,
            top_p.ctypes.data,
            uniform.ctypes.data,
            out.ctypes.data,
        )
    return out
