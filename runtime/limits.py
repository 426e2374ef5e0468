"""Upper bounds on one call, and the checks every public entry point runs on its arguments.

A runtime serving many callers must refuse an absurd request (a million faces, a gigapixel
upload, a book as a prompt) before it allocates anything, with an error that names the limit
and how to raise it. The limits are configurable per model: `facert.load(..., limits=Limits(...))`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument, LimitExceeded


@dataclass(frozen=True)
class Limits:
    max_faces: int = 64  # faces per generate_faces call
    max_candidates: int = 128  # drawings per face (best of N)
    max_text_chars: int = 2000  # characters of a description (the model reads 64 ids of it)
    max_image_pixels: int = 40_000_000  # decoded pixels of one input image (decompression bombs)
    max_images: int = 256  # images per encode call
    max_questions: int = 64  # attribute names per attributes() call

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            check_int(value, f"Limits.{name}", lo=1)


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (bool and float refused: 2.0 faces is a caller's bug) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"{lo} to {hi}" if lo is not None else ""
        raise InvalidArgument(f"{name} must be {bounds or f'at most {hi}'}, got {value}")
    return value


def check_limit(value: Any, name: str, limit: int, field: str) -> int:
    """A count of at least 1 that the model's Limits allow."""
    value = check_int(value, name, lo=1)
    if value > limit:
        raise LimitExceeded(
            f"{name}={value} is over this model's limit of {limit} "
            f"(raise it with facert.load(..., limits=Limits({field}=...)))"
        )
    return value


def check_float(value: Any, name: str, lo: float, hi: float = math.inf) -> float:
    """A finite real number (NaN would silently turn sampling greedy) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgument(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        bounds = f">= {lo}" if hi == math.inf else f"between {lo} and {hi}"
        raise InvalidArgument(f"{name} must be a finite number {bounds}, got {value}")
    return value


def check_text(value: Any, name: str, max_chars: int) -> str:
    """A non-empty str within the limit (bytes refused: the caller decides the encoding)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgument(f"{name} is empty")
    if len(value) > max_chars:
        raise LimitExceeded(
            f"{name} has {len(value)} characters, over this model's limit of {max_chars} "
            "(raise it with facert.load(..., limits=Limits(max_text_chars=...)))"
        )
    return value
