"""The residual add and the LayerNorm after it, fused: a decode step at batch 1 on a big GPU is
bound by how many kernels it launches, not by its bytes, and in torch ops one TencentPretrain
LayerNorm is seven kernels (mean, std, four element-wise ops, a cast) plus the add before it.

`add_layer_norm(x, weight, bias, eps, delta=...)`: x += delta in place (the fp32 residual stream),
then TencentPretrain's LayerNorm of x (unbiased std, eps added to the std), computed in fp32 and
written in the dtype the next linear reads. One program per row (one token's channels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, next_power_of_2, output_buffer


@triton.jit
def _add_layer_norm_kernel(
    x,  # (N, C) fp32, contiguous; updated in place when HAS_DELTA
    delta,  # (N, C) contiguous, any float dtype (unused without HAS_DELTA)
    weight,  # (C,) fp32
    bias,  # (C,) fp32
    out,  # (N, C) contiguous, the next linear's dtype
    n_cols,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * n_cols
    c = tl.arange(0, BLOCK)
    ok = c < n_cols
    h = tl.load(x + row + c, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
    if HAS_DELTA:
        h = h + tl.load(delta + row + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(x + row + c, h, mask=ok)
    mean = tl.sum(h, 0) / n_cols
    diff = tl.where(ok, h - mean, 0.0)
    std = tl.sqrt(tl.sum(diff * diff, 0) / (n_cols - 1))  # unbiased, as torch.std
    w = tl.load(weight + c, mask=ok, other=0.0)
    b = tl.load(bias + c, mask=ok, other=0.0)
    y = w * diff / (std + eps) + b
    tl.store(out + row + c, y.to(out.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.view(-1, t.shape[-1])


def add_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., C) fp32 contiguous; weight, bias (C,) fp32 -> TencentPretrain's LayerNorm of
    x + delta, in out_dtype (default fp32; into `out` when given). With `delta` (x's shape, any
    float dtype) x is updated in place to x + delta first: the residual add of the block."""
    check_device(x)
    if x.dtype != torch.float32 or x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"x must be fp32 (..., C) with C >= 2, got {x.dtype} {tuple(x.shape)}")
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"weight and bias must be ({C},)")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta must be {tuple(x.shape)}, got {tuple(delta.shape)}")
    rows = _rows(x, "x")
    out = output_buffer(out, tuple(x.shape), out_dtype or torch.float32, x.device)
    if rows.shape[0]:
        w, b = weight.float().contiguous(), bias.float().contiguous()
        d = rows if delta is None else _rows(delta, "delta")
        _add_layer_norm_kernel[(rows.shape[0],)](
            rows, d, w, b, out, C, float(eps),
            HAS_DELTA=delta is not None, BLOCK=next_power_of_2(C),
        )  # fmt: skip
    return out
