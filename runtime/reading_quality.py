"""How far a face lies from the faces a model learned: the in-distribution score of a reading.

A model reads attributes and captions from any picture, but what it says means something only
for pictures like its training faces; the bundled model learned synthetic drawings, so its
reading of a photo is a guess. The score says how like them a face is: the PSNR (dB, pixels in
[0, 1]) between the face at the model's resolution and the same face encoded to VQGAN codes and
decoded back. The VQGAN learned to draw the training faces, so it redraws faces like them
closely and anything else (photos, noise, flat colours) poorly: higher = more like the model's
training faces. A model's ReadingCalibration (facert.json) holds the threshold: the
CALIBRATION_PERCENTILE-th percentile of the scores of held-out faces.

Chosen over the cheaper distance of the encoder's latents to their nearest codebook vectors
(no decode), which did not separate held-out faces from photos on the bundled model, and which
the exported encoder graph does not output; the README gives the measured ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .config import IMAGE_SCALINGS, READING_MEASURE, ReadingCalibration
from .errors import InvalidArgument

CALIBRATION_PERCENTILE = 1.0  # 99 % of faces like the held-out ones read as reliable
# The 1st percentile of fewer faces is only their minimum, not a measured percentile.
MIN_CALIBRATION_FACES = 100


def vqgan_psnr(
    x: np.ndarray,
    scaling: str,
    encode: Callable[[np.ndarray], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Scaled encoder input float32 [N, 3, H, W] (as images.model_input makes it) -> each face's
    score: PSNR in dB of decode(encode(x)) (in [-1, 1]) against x's pixels."""
    return redrawn_psnr(x, scaling, decode(encode(x)))


def redrawn_psnr(x: np.ndarray, scaling: str, redrawn: np.ndarray) -> np.ndarray:
    """vqgan_psnr from the faces x and their redrawing, the decoder's output [N, 3, H, W] for
    x's codes (for a caller that encoded x already)."""
    pixels = x.astype(np.float64)
    for _ in range(IMAGE_SCALINGS[scaling]):  # undo images.scale_pixels: back to [0, 1]
        pixels = (pixels + 1.0) / 2.0
    redrawn = (np.clip(redrawn, -1.0, 1.0).astype(np.float64) + 1.0) / 2.0
    mse = ((pixels - redrawn) ** 2).mean(axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def check_calibration_faces(n: int) -> None:
    """Refuse to calibrate on too few faces (before any is read, when the caller knows n)."""
    if n < MIN_CALIBRATION_FACES:
        raise InvalidArgument(
            f"calibration needs at least {MIN_CALIBRATION_FACES} held-out faces, got {n}: the "
            f"{CALIBRATION_PERCENTILE:g}th percentile of fewer is only a guess"
        )


def calibrate(scores: np.ndarray) -> ReadingCalibration:
    """Held-out faces' scores -> the calibration a model's facert.json records."""
    scores = np.asarray(scores, dtype=np.float64)
    check_calibration_faces(len(scores))
    threshold = float(np.percentile(scores, CALIBRATION_PERCENTILE))
    return ReadingCalibration(
        READING_MEASURE, round(threshold, 3), CALIBRATION_PERCENTILE, len(scores)
    )


def reading(score: float, calibration: ReadingCalibration | None) -> dict[str, Any]:
    """A score judged by a model's calibration: {"score", "threshold", "reliable"}; threshold and
    reliable are None without one, never a made-up threshold."""
    score = float(score)
    if calibration is None:
        return {"score": score, "threshold": None, "reliable": None}
    return {
        "score": score,
        "threshold": calibration.threshold,
        "reliable": score >= calibration.threshold,
    }
