"""VQGAN nearest-code search on the GPU: for each latent vector z, the codebook index with the
smallest squared distance, the FIRST one on ties.

The distance is the expanded |z|^2 + |e|^2 - 2 z.e that export/vqgan.py's Quantizer (taming's
VectorQuantizer2) and the ONNX encoder compute, in float32 (the dot products in IEEE fp32, not
TF32, so near-ties resolve as closely as the CPU's). One program takes BLOCK_N latents against
the whole codebook in tiles of BLOCK_K codes, keeping the running minimum and its first index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, next_power_of_2, output_buffer

BLOCK_N = 32  # latents per program
BLOCK_K = 64  # codes per tile
BLOCK_D = 32  # embedding dims per step of the dot product


@triton.jit
def _nearest_codes_kernel(
    z,  # (N, D) contiguous
    codebook,  # (K, D) contiguous
    out,  # (N,) int64
    n,
    n_codes,
    dim,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < n
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, n_codes, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        codes_ok = codes < n_codes
        zz = tl.zeros([BLOCK_N], tl.float32)
        ee = tl.zeros([BLOCK_K], tl.float32)
        ze = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            zt = tl.load(
                z + rows[:, None].to(tl.int64) * dim + d[None, :],
                mask=rows_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            et = tl.load(
                codebook + codes[:, None].to(tl.int64) * dim + d[None, :],
                mask=codes_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_K, BLOCK_D)
            zz += tl.sum(zt * zt, 1)
            ee += tl.sum(et * et, 1)
            ze = tl.dot(zt, tl.trans(et), ze, input_precision="ieee")  # (BLOCK_N, BLOCK_K)
        dist = zz[:, None] + ee[None, :] - 2.0 * ze  # (BLOCK_N, BLOCK_K)
        dist = tl.where(codes_ok[None, :], dist, float("inf"))
        tile_best = tl.min(dist, 1)  # (BLOCK_N,)
        first = tl.min(tl.where(dist == tile_best[:, None], codes[None, :], n_codes), 1)
        better = tile_best < best  # strict: an earlier tile keeps its tie
        best_idx = tl.where(better, first.to(tl.int64), best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(out + rows, best_idx, mask=rows_ok)


def nearest_codes(
    z: torch.Tensor, codebook: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """z (N, D), codebook (K, D) floats on one device -> (N,) int64 index of each z's nearest
    code (squared distance, first minimum on ties; into `out` when given)."""
    check_device(z)
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z (N, D) and codebook (K, D) must share D, got {tuple(z.shape)} and "
                         f"{tuple(codebook.shape)}")  # fmt: skip
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    z, codebook = z.contiguous(), codebook.contiguous()
    n, dim = z.shape
    out = output_buffer(out, (n,), torch.int64, z.device)  # (N,)
    if n:
        _nearest_codes_kernel[(triton.cdiv(n, BLOCK_N),)](
            z, codebook, out, n, codebook.shape[0], dim,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=min(BLOCK_D, max(16, next_power_of_2(dim))),
        )  # fmt: skip
    return out
