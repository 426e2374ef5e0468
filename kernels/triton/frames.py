"""Camera frame -> model inputs on the GPU in one pass: for each face box, the square crop with
its margin (edge pixels repeated outside the frame), resized bilinearly, scaled to the VQGAN's
input range.

It computes what the CPU path computes (runtime/faces.py crop_face, then runtime/images.py
model_input: Pillow's BILINEAR resize of the uint8 crop, x / 255, x -> 2x - 1), bit for bit:
Pillow's filter is a triangle widened by the scale when shrinking, applied as a horizontal pass
rounded to uint8 and then a vertical pass rounded to uint8, with 22-bit fixed-point weights
computed in float64. Here one program makes BLOCK_X columns of one output row of one face: for
each of its vertical taps it redoes the horizontal pass of that source row (a few taps, from L2)
in integers, so the uint8 roundings fall where Pillow's do. The weights are computed in the kernel
from the box's side, so only (N, 3) integers travel from the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import check_device, next_power_of_2, output_buffer
from .reference import square_boxes

HALF = tl.constexpr(1 << 21)  # one half in Pillow's 22-bit fixed point
BLOCK_X = 64  # output columns per program


@triton.jit
def _crop_resize_kernel(
    frame,  # (H, W, 3) uint8, contiguous
    squares,  # (N, 3) int32: x0, y0, side of each face's square crop
    out,  # (N, 3, size, size) float32
    height,
    width,
    size,
    SCALINGS: tl.constexpr,  # times x -> 2x - 1 is applied
    BLOCK_X: tl.constexpr,  # output columns per program
    KX: tl.constexpr,  # >= the most horizontal taps of any box
):
    n = tl.program_id(0)
    oy = tl.program_id(1)
    ox = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)  # (BLOCK_X,) output columns
    x0 = tl.load(squares + n * 3)
    y0 = tl.load(squares + n * 3 + 1)
    side = tl.load(squares + n * 3 + 2)
    scale = side.to(tl.float64) / size  # Pillow: in / out
    filterscale = tl.maximum(scale, 1.0)
    inv = 1.0 / filterscale  # Pillow multiplies by the reciprocal
    unit = 4194304.0  # 1 << 22: Pillow's fixed-point one
    # Horizontal taps of every output column: first source column, count, fixed-point weights.
    cx = (ox.to(tl.float64) + 0.5) * scale  # (BLOCK_X,)
    xmin = tl.maximum((cx - filterscale + 0.5).to(tl.int32), 0)  # C casts truncate
    xcount = tl.minimum((cx + filterscale + 0.5).to(tl.int32), side) - xmin
    i = tl.arange(0, KX)
    tap_ok = (i[None, :] < xcount[:, None]) & (ox[:, None] < size)  # (BLOCK_X, KX)
    dist = ((i[None, :] + xmin[:, None]).to(tl.float64) - cx[:, None] + 0.5) * inv
    wx = tl.where(tap_ok, tl.maximum(1.0 - tl.abs(dist), 0.0), 0.0)
    wsum = tl.sum(wx, 1)
    wx = tl.where(wsum[:, None] != 0.0, wx / wsum[:, None], wx)
    kx = (0.5 + wx * unit).to(tl.int32)  # (BLOCK_X, KX)
    cols = tl.minimum(tl.maximum(x0 + xmin[:, None] + i[None, :], 0), width - 1)  # clamped
    # Vertical taps of this output row, one at a time.
    cy = (oy.to(tl.float64) + 0.5) * scale
    ymin = tl.maximum((cy - filterscale + 0.5).to(tl.int32), 0)
    ycount = tl.minimum((cy + filterscale + 0.5).to(tl.int32), side) - ymin
    ysum = tl.full([], 0.0, tl.float64)
    for j in range(0, ycount):
        ysum += tl.maximum(1.0 - tl.abs(((j + ymin).to(tl.float64) - cy + 0.5) * inv), 0.0)
    ch = tl.arange(0, 4)  # R, G, B and one masked lane (shapes are powers of two)
    ch_ok = ch < 3
    acc = tl.zeros([BLOCK_X, 4], tl.int32) + HALF
    for j in range(0, ycount):
        wy = tl.maximum(1.0 - tl.abs(((j + ymin).to(tl.float64) - cy + 0.5) * inv), 0.0)
        wy = tl.where(ysum != 0.0, wy / ysum, wy)
        ky = (0.5 + wy * unit).to(tl.int32)
        src_row = tl.minimum(tl.maximum(y0 + ymin + j, 0), height - 1)
        pix = (src_row.to(tl.int64) * width + cols) * 3  # (BLOCK_X, KX) offsets of R
        rgb = tl.load(
            frame + pix[:, :, None] + ch[None, None, :],
            mask=tap_ok[:, :, None] & ch_ok[None, None, :],
            other=0,
        ).to(tl.int32)  # (BLOCK_X, KX, 4)
        # the horizontal pass of this source row, rounded to uint8 (Pillow's clip8), weighted
        row = tl.sum(rgb * kx[:, :, None], 1) + HALF  # (BLOCK_X, 4)
        acc += tl.minimum(tl.maximum(row >> 22, 0), 255) * ky
    x = tl.minimum(tl.maximum(acc >> 22, 0), 255).to(tl.float32)  # (BLOCK_X, 4) uint8 values
    x = tl.math.div_rn(x, 255.0)  # IEEE, like numpy's x / 255
    for _ in tl.static_range(SCALINGS):
        x = x * 2.0 - 1.0
    plane = ch.to(tl.int64) * size * size  # (4,) channel offsets in (3, size, size)
    dst = out + (n * 3).to(tl.int64) * size * size + oy * size + ox[:, None] + plane[None, :]
    tl.store(dst, x, mask=(ox < size)[:, None] & ch_ok[None, :])


def crop_resize(
    frame: torch.Tensor,
    boxes,
    size: int,
    margin: float = 0.5,
    scaling: int = 1,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 frame (H, W, 3) on the device, face boxes (N, 4) x, y, w, h in pixels or FaceBoxes
    (host values: a detector's output) -> float32 (N, 3, size, size) model inputs on the frame's
    device.

    margin: crop_face's margin on each side, as a fraction of the box's side. scaling: how many
    times x -> 2x - 1 follows x / 255 (facert.runtime.config.IMAGE_SCALINGS: 1 "taming", 2
    "reference"). A box wholly outside the frame is refused, as crop_face refuses it. `out`: a
    preallocated contiguous result to write into."""
    check_device(frame)
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {tuple(frame.shape)}")
    if not (isinstance(size, int) and size >= 1) or scaling not in (0, 1, 2):
        raise ValueError(f"size must be a positive int and scaling 0, 1 or 2; got {size}, "
                         f"{scaling}")  # fmt: skip
    height, width = frame.shape[:2]
    boxes = [(b.x, b.y, b.w, b.h) if hasattr(b, "w") else b for b in boxes]  # FaceBox too
    squares = square_boxes(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), margin)  # (N, 3)
    for x0, y0, side in squares.tolist():
        if x0 >= width or y0 >= height or x0 + side <= 0 or y0 + side <= 0:
            raise ValueError(f"box square {(x0, y0, side)} lies outside the {width}x{height} frame")
    out = output_buffer(out, (len(squares), 3, size, size), torch.float32, frame.device)
    if len(squares):
        most = int(squares[:, 2].max())
        taps = int(math.ceil(max(most / size, 1.0))) * 2 + 1  # Pillow's ksize for the widest box
        block_x = min(BLOCK_X, next_power_of_2(size))
        # enable_fp_fusion=False: the weights' float64 arithmetic rounds as Pillow's does
        _crop_resize_kernel[(len(squares), size, triton.cdiv(size, block_x))](
            frame.contiguous(), torch.as_tensor(squares, dtype=torch.int32, device=frame.device),
            out, height, width, size,
            SCALINGS=scaling, BLOCK_X=block_x, KX=next_power_of_2(taps), enable_fp_fusion=False,
        )  # fmt: skip
    return out
