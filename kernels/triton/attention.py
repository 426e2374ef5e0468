"""One layer's decode attention over the runtime's static slot cache, on the GPU.

Each row b of the step appends its new key/value at position positions[b] of cache slot slots[b]
(in place) and attends over that slot's positions 0..positions[b], scores / sqrt(D), softmax.
One program per (row, head) streams the row's cached positions in tiles with an online softmax
(running max and sum), reading nothing past the row's own position; the new position's key and
value come from registers, so the program never reads back what it just stored. Head dims that
are not powers of two are padded to the next one and masked.

Rows must not share a (slot, position): each sequence owns its slot. A row whose slot or position
is out of range writes nothing to the cache and NaN to its output (checking on the host would cost
a device synchronisation per layer).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_device, next_power_of_2, output_buffer

# A (row, head) program streams its positions tile by tile, so at batch 1 only 12 programs run and
# each waits on its loads once a tile: big tiles and 8 warps halve a layer's attention on an H200
# (position 300, fp16, batch 1: 24.8 us with 32-position tiles and 4 warps, 16.4 us with 128 and 8)
BLOCK_M = 128  # cached positions per tile
NUM_WARPS = 8


@triton.jit
def _decode_attention_kernel(
    q,  # (B, H, D) contiguous, like k_new, v_new and out
    k_cache,  # (S, H, M, D) contiguous, written in place
    v_cache,
    k_new,
    v_new,
    slots,  # (B,) int64
    positions,  # (B,) int64
    out,
    n_slots,
    n_heads,
    capacity,
    head_dim,
    scale,  # 1 / sqrt(head_dim)
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots + b)
    pos = tl.load(positions + b)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row = (b * n_heads + h) * head_dim
    qv = tl.load(q + row + d, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    kn = tl.load(k_new + row + d, mask=d_ok, other=0.0)
    vn = tl.load(v_new + row + d, mask=d_ok, other=0.0)
    o = tl.full([BLOCK_D], float("nan"), tl.float32)
    if (slot >= 0) & (slot < n_slots) & (pos >= 0) & (pos < capacity):
        base = (slot * n_heads + h) * capacity * head_dim  # this (slot, head)'s (M, D) block
        kn = kn.to(k_cache.dtype.element_ty)  # what the cache holds from now on
        vn = vn.to(v_cache.dtype.element_ty)
        tl.store(k_cache + base + pos * head_dim + d, kn, mask=d_ok)
        tl.store(v_cache + base + pos * head_dim + d, vn, mask=d_ok)
        # The new position starts the online softmax: running max m, sum l, weighted values acc.
        m = tl.sum(qv * kn.to(tl.float32), 0) * scale
        lsum = tl.full([], 1.0, tl.float32)
        acc = vn.to(tl.float32)  # (BLOCK_D,)
        for start in range(0, pos, BLOCK_M):
            t = start + tl.arange(0, BLOCK_M)
            t_ok = t < pos
            offs = base + t[:, None] * head_dim + d[None, :]  # (BLOCK_M, BLOCK_D)
            tile_ok = t_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_cache + offs, mask=tile_ok, other=0.0).to(tl.float32)
            s = tl.sum(kt * qv[None, :], 1) * scale  # (BLOCK_M,)
            s = tl.where(t_ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)  # (BLOCK_M,)
            vt = tl.load(v_cache + offs, mask=tile_ok, other=0.0).to(tl.float32)
            lsum = lsum * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
            m = m_new
        o = acc / lsum
    tl.store(out + row + d, o.to(out.dtype.element_ty), mask=d_ok)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k_new, v_new (B, H, D); k_cache, v_cache (S, H, M, D) contiguous, written in place at
    [slots[b], :, positions[b]]; slots, positions (B,) integers -> (B, H, D) attention output in
    q's dtype (into `out`, contiguous, when given: a preallocated buffer). Every tensor on one
    device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    check_device(q)
    if q.ndim != 3 or k_new.shape != q.shape or v_new.shape != q.shape:
        raise ValueError(f"q, k_new, v_new must share a (B, H, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k_new.shape)}, {tuple(v_new.shape)}")  # fmt: skip
    B, H, D = q.shape
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape or k_cache.shape[1::2] != (H, D):
        raise ValueError(f"caches must be (S, {H}, M, {D}), got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")  # fmt: skip
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches are written in place, so they must be contiguous")
    dev = q.device
    slots = torch.as_tensor(slots, device=dev).to(torch.int64).reshape(-1).contiguous()
    positions = torch.as_tensor(positions, device=dev).to(torch.int64).reshape(-1).contiguous()
    if slots.shape != (B,) or positions.shape != (B,):
        raise ValueError(f"slots and positions must have shape ({B},)")
    q, k_new, v_new = (t.contiguous() for t in (q, k_new, v_new))
    out = output_buffer(out, q.shape, q.dtype, q.device)  # (B, H, D)
    if B and H:
        S, _, M, _ = k_cache.shape
        _decode_attention_kernel[(B, H)](
            q, k_cache, v_cache, k_new, v_new, slots, positions, out, S, H, M, D,
            1.0 / math.sqrt(D), BLOCK_M=BLOCK_M, BLOCK_D=next_power_of_2(D), num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
