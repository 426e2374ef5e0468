"""Plain numpy references for the Triton kernels: slow, obvious code that states each kernel's
contract, so the tests can compare against it. numpy only (no torch, no triton)."""

from __future__ import annotations

import math

import numpy as np

FLOAT_MAX = np.float32(np.finfo(np.float32).max)
# Pillow's fixed-point resampling of 8-bit images: coefficients carry 22 fraction bits.
PRECISION_BITS = 22


def decode_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """q, k_new, v_new (B, H, D); caches (S, H, M, D), written in place -> (B, H, D) float32."""
    B, H, D = q.shape
    out = np.empty((B, H, D), np.float32)
    for b in range(B):
        s, p = int(slots[b]), int(positions[b])
        k_cache[s, :, p], v_cache[s, :, p] = k_new[b], v_new[b]
        k = k_cache[s, :, : p + 1].astype(np.float64)  # (H, p+1, D)
        v = v_cache[s, :, : p + 1].astype(np.float64)
        scores = np.einsum("hd,htd->ht", q[b].astype(np.float64), k) / math.sqrt(D)  # (H, p+1)
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[b] = np.einsum("ht,htd->hd", w / w.sum(axis=1, keepdims=True), v)
    return out


def add_layer_norm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, delta: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(..., C) -> (x + delta, TencentPretrain's LayerNorm of it: unbiased std, eps on the std),
    both float64."""
    h = x.astype(np.float64) + (0.0 if delta is None else delta.astype(np.float64))
    diff = h - h.mean(-1, keepdims=True)
    std = np.sqrt((diff * diff).sum(-1, keepdims=True) / (h.shape[-1] - 1))
    return h, weight * diff / (std + eps) + bias


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's gelu_fast, tanh form, in float64."""
    v = x.astype(np.float64)
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def _sanitize(x: np.ndarray) -> np.ndarray:
    """NaN counts as masked (-inf), +inf as the largest float: the samplers' contract."""
    return np.minimum(np.where(np.isnan(x), -np.inf, x), FLOAT_MAX).astype(np.float32)


def _sample_row(row: np.ndarray, t: float, k: int, p: float, u: float) -> int:
    vocab = row.shape[0]
    if not t > 0:
        return int(np.argmax(_sanitize(row)))  # first maximum; 0 when every token is masked
    with np.errstate(over="ignore"):  # x / t may overflow to inf, which sanitize caps
        x = _sanitize(row.astype(np.float32) / np.float32(t))  # (V,) float32 division, as in C++
    if x.max() == -np.inf:
        return 0
    threshold = np.sort(x)[::-1][k - 1] if 0 < k < vocab else -np.inf  # ties with it survive
    idx = np.flatnonzero((x > -np.inf) & (x >= threshold))  # (n,) vocabulary order
    w = np.exp(x[idx].astype(np.float64) - np.float64(x.max()))  # unnormalised probabilities
    if 0 < p < 1:
        limit = np.float64(p) * np.cumsum(w)[-1]
        order = np.lexsort((idx, -w))  # admission order: heavier first, lower index on ties
        before = np.concatenate(([0.0], np.cumsum(w[order])[:-1]))  # mass admitted earlier
        keep = np.sort(order[before <= limit])
        idx, w = idx[keep], w[keep]
    target = (np.float64(u) if u > 0 else 0.0) * np.cumsum(w)[-1]
    before = np.concatenate(([0.0], np.cumsum(w)[:-1]))  # inverse CDF in vocabulary order
    crossed = np.flatnonzero((w > 0) & (before <= target))
    return int(idx[crossed[-1]] if crossed.size else idx[0])


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
) -> np.ndarray:
    """(B, V) logits and per-row parameters -> (B,) int64 tokens, with the semantics of
    kernels/cpu/sampling.cpp written out plainly (sequential float64 sums)."""
    rows = [
        _sample_row(row, float(t), int(k), float(p), float(u))
        for row, t, k, p, u in zip(logits, temperature, top_k, top_p, uniform)
    ]
    return np.array(rows, dtype=np.int64)


def nearest_codes(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """z (N, D), codebook (K, D) -> (N,) int64: the first minimum of the expanded squared distance
    |z|^2 + |e|^2 - 2 z.e, the formula of export/vqgan.py's Quantizer (here in float64)."""
    z, e = z.astype(np.float64), codebook.astype(np.float64)
    d = (z**2).sum(1)[:, None] + (e**2).sum(1)[None, :] - 2.0 * z @ e.T  # (N, K)
    return d.argmin(axis=1).astype(np.int64)  # argmin returns the first minimum


def square_boxes(boxes: np.ndarray, margin: float) -> np.ndarray:
    """Face boxes (N, 4) x, y, w, h -> (N, 3) int64 x0, y0, side of the square crop around each,
    `margin` of its side wider on every side: runtime/faces.py crop_face's arithmetic (Python's
    round, half to even)."""
    squares = []
    for x, y, w, h in np.asarray(boxes, dtype=np.int64).reshape(-1, 4).tolist():
        if w <= 0 or h <= 0:
            raise ValueError(f"box must have a positive size, got {w}x{h}")
        side = max(1, round(max(w, h) * (1 + 2 * margin)))
        squares.append((round(x + w / 2 - side / 2), round(y + h / 2 - side / 2), side))
    return np.array(squares, dtype=np.int64).reshape(-1, 3)


def bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's BILINEAR taps for resizing in_size -> out_size pixels (a triangle filter widened
    by the scale when shrinking): (out, 2) first tap and tap count, (out, ksize) int32 weights with
    PRECISION_BITS fraction bits."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int(): C's truncation toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = (np.arange(xmax) + xmin - center + 0.5) * (1.0 / filterscale)  # Pillow's order
        w = np.maximum(1.0 - np.abs(taps), 0.0)
        if w.sum() != 0.0:
            w = w / w.sum()
        weights[xx, :xmax] = (0.5 + w * (1 << PRECISION_BITS)).astype(np.int32)
        bounds[xx] = xmin, xmax
    return bounds, weights


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's rounding of a fixed-point sum (with its half already added) to uint8."""
    return np.clip(acc >> PRECISION_BITS, 0, 255)


def _resample_rows(src: np.ndarray, bounds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Resample axis 1 of int64 (A, in, C) -> (A, out, C), fixed point as Pillow does."""
    out = np.empty((src.shape[0], len(bounds), src.shape[2]), np.int64)
    for xx, (xmin, count) in enumerate(bounds.tolist()):
        taps = src[:, xmin : xmin + count] * weights[xx, :count, None]  # (A, count, C)
        out[:, xx] = _clip8(taps.sum(axis=1) + (1 << (PRECISION_BITS - 1)))
    return out


def crop_resize(
    frame: np.ndarray, boxes: np.ndarray, size: int, margin: float = 0.5, scaling: int = 1
) -> np.ndarray:
    """uint8 frame (H, W, 3), face boxes (N, 4) x, y, w, h -> float32 (N, 3, size, size).

    Each box's square crop (edge pixels repeated outside the frame), resized as Pillow's BILINEAR
    does for 8-bit RGB (horizontal pass, uint8, vertical pass, uint8), then x / 255 and
    `scaling` times x -> 2x - 1: runtime/faces.py crop_face + runtime/images.py model_input."""
    height, width = frame.shape[:2]
    out = np.empty((len(boxes), 3, size, size), np.float32)
    for n, (x0, y0, side) in enumerate(square_boxes(boxes, margin).tolist()):
        rows = np.clip(np.arange(y0, y0 + side), 0, height - 1)
        cols = np.clip(np.arange(x0, x0 + side), 0, width - 1)
        crop = frame[rows][:, cols].astype(np.int64)  # (side, side, 3)
        bounds, weights = bilinear_coefficients(side, size)
        if side != size:  # Pillow skips the resize when the size already matches
            crop = _resample_rows(crop, bounds, weights)  # (side, size, 3)
            crop = _resample_rows(crop.transpose(1, 0, 2), bounds, weights).transpose(1, 0, 2)
        x = crop.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)  # (3, size, size)
        for _ in range(scaling):
            x = x * np.float32(2.0) - np.float32(1.0)
        out[n] = x
    return out
