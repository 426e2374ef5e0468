"""GPT-2's gelu_fast on a linear's output in one kernel (eight in torch ops, plus two casts when
the linear is fp16 or bf16): computed in fp32, written back in the output's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_device, output_buffer

BLOCK = 1024  # elements per program
C = math.sqrt(2.0 / math.pi)


@triton.jit
def _gelu_kernel(x, out, n, c, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    v = tl.load(x + i, mask=ok, other=0.0).to(tl.float32)
    # 0.5 * v * (1 + tanh(z)) = v * sigmoid(2z): the same function, without tanh's cancellation;
    # the exponent is capped below fp32's overflow (there gelu is v / 5.5e34, within 1e-30 of 0)
    z = c * (v + 0.044715 * v * v * v)
    g = v / (1.0 + tl.exp(tl.minimum(-2.0 * z, 80.0)))
    tl.store(out + i, g.to(out.dtype.element_ty), mask=ok)


def gelu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_fast (GPT-2's tanh form) of x, computed in fp32, in x's dtype (into `out`, which may
    be x itself)."""
    check_device(x)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    out = output_buffer(out, tuple(x.shape), x.dtype, x.device)
    n = x.numel()
    if n:
        _gelu_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, C, BLOCK=BLOCK)
    return out
