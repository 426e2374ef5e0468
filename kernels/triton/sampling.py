"""Fused sampler on the GPU: one program per logit row does temperature, top-k, top-p and the
inverse-CDF pick from the row's uniform u, so logits never leave the device (only the (B,)
tokens do).

Semantics are kernels/cpu/sampling.cpp's, so the same u gives the same token on both: greedy
(first max) when temperature <= 0; top-k keeps every token tied with the k-th value; top-p keeps a
token iff the mass admitted before it (heavier first, lower index on ties) is <= top_p * total;
weights exp(x - max) and every sum in float64; NaN masked, +inf as the largest float, every token
masked -> 0. Sums run in a different order than the C++ loop, so the two can differ only when u
(or the top-p limit) lands within float64 rounding of a step, which random draws practically never
do (exact cases, such as equal logits, stay exact).

Without sorting, order statistics are found by a 16-way search over the order-preserving int32
keys of float32 values (8 counting passes at most): the k-th largest value for top-k, and for
top-p the lightest weight whose strictly heavier tokens hold at most the limit (the group the
nucleus ends in); inside that group the first tokens in vocabulary order are admitted. Every pass
re-reads the row (from L2): greedy takes 1, top-k about 11, top-k with top-p about 22.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, next_power_of_2, output_buffer

# Globals a kernel reads must be constexprs.
FLOAT_MAX = tl.constexpr(3.4028234663852886e38)
INT32_MIN = tl.constexpr(-2147483648)
KEY_OF_MINUS_FLOAT_MAX = tl.constexpr(-2139095040)  # _key(-FLOAT_MAX): lowest finite key
BLOCK = 256  # logits per tile of a pass
RADIX = 16  # keys tried per pass of a search: 8 passes cover the 2^32 float32 keys


# Under the interpreter every call of a jit helper costs milliseconds, so the per-tile code of the
# passes (load + scale + sanitize: three lines) is written out in each loop, and helpers are
# called once per pass at most.


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (negative floats' magnitude bits flipped)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_key(k):
    """Inverse of _key (the map is its own inverse on the bits)."""
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _greedy(row, vocab, BLOCK: tl.constexpr):
    """First index of the largest sanitized logit; 0 when all are masked."""
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)  # (BLOCK,)
        top = tl.max(x, 0)
        first = tl.min(tl.where(x == top, offs, vocab), 0).to(tl.int64)
        best_idx = tl.where(top > best, first, best_idx)
        best = tl.maximum(best, top)
    return best_idx


@triton.jit
def _row_max(row, vocab, t, BLOCK: tl.constexpr):
    """max of sanitize(logit / t) over the row."""
    mx = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(x, t)  # IEEE division like the C++ loop (Triton's `/` is approximate)
        x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)  # NaN masked, inf capped
        mx = tl.maximum(mx, tl.max(x, 0))
    return mx


@triton.jit
def _kth_largest(row, vocab, t, k, mx, BLOCK: tl.constexpr, RADIX: tl.constexpr):
    """The k-th largest scaled logit, duplicates counted (0 < k < vocab): the largest key K with
    at least k values >= K. Each pass counts against RADIX evenly spaced keys of [lo, hi] and
    keeps the sub-range where the count drops below k (invariant: count(key >= lo) >= k)."""
    lo = tl.full([], INT32_MIN, tl.int64)
    hi = _key(mx).to(tl.int64)
    j = tl.arange(0, RADIX).to(tl.int64)
    while lo < hi:
        step = (hi - lo + RADIX - 1) // RADIX
        cand = tl.minimum(lo + step * j, hi)  # (RADIX,) increasing, cand[0] = lo
        count = tl.full([RADIX], 0, tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < vocab
            x = tl.load(row + offs, mask=valid, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(x, t)
            x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)
            b = x.to(tl.int32, bitcast=True)
            key = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)  # _key(x), (BLOCK,)
            ge = valid[:, None] & (key[:, None] >= cand[None, :])  # (BLOCK, RADIX)
            count += tl.sum(ge.to(tl.int32), 0)
        # count falls as cand grows: keep [last cand with enough, next cand - 1]
        n_enough = tl.sum((count >= k).to(tl.int64), 0)  # >= 1 (cand[0] = lo)
        hi = tl.where(n_enough < RADIX, tl.minimum(lo + step * n_enough, hi) - 1, hi)
        lo = tl.minimum(lo + step * (n_enough - 1), hi)
    return _from_key(lo.to(tl.int32))


@triton.jit
def _nucleus_group(row, vocab, t, threshold, mx, limit, BLOCK: tl.constexpr, RADIX: tl.constexpr):
    """The weight v* of the group the nucleus ends in, and how many of its tokens (first in
    vocabulary order) the nucleus admits.

    v* is the smallest survivor weight whose strictly heavier survivors weigh <= limit. Weights
    grow with x, so a search over x's key (RADIX keys a pass) finds the smallest key whose weight
    passes; v* is the weight of the smallest survivor at or above that key."""
    mxd = mx.to(tl.float64)
    lo = tl.full([], KEY_OF_MINUS_FLOAT_MAX, tl.int64)
    hi = _key(mx).to(tl.int64)  # passes: nothing weighs more than the top token
    j = tl.arange(0, RADIX).to(tl.int64)
    while lo < hi:
        step = (hi - lo + RADIX - 1) // RADIX
        cand = tl.minimum(lo + step * j, hi)  # (RADIX,) increasing
        v = tl.exp(_from_key(cand.to(tl.int32)).to(tl.float64) - mxd)  # (RADIX,)
        heavier = tl.full([RADIX], 0.0, tl.float64)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(x, t)
            x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)
            keep = (x != float("-inf")) & (x >= threshold)
            w = tl.where(keep, tl.exp(x.to(tl.float64) - mxd), 0.0)  # (BLOCK,)
            heavier += tl.sum(tl.where(w[:, None] > v[None, :], w[:, None], 0.0), 0)
        # heavier falls as cand grows: keep [last failing cand + 1, first passing cand]
        n_fail = tl.sum((heavier > limit).to(tl.int64), 0)
        hi = tl.where(n_fail < RADIX, tl.minimum(lo + step * n_fail, hi), hi)
        lo = tl.where(n_fail > 0, tl.minimum(lo + step * (n_fail - 1), hi) + 1, lo)
    x_star = tl.full([], float("inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(x, t)
        x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)
        b = x.to(tl.int32, bitcast=True)
        above = (x != float("-inf")) & (x >= threshold) & ((b ^ ((b >> 31) & 0x7FFFFFFF)) >= lo)
        x_star = tl.minimum(x_star, tl.min(tl.where(above, x, float("inf")), 0))
    v_star = tl.exp(x_star.to(tl.float64) - mxd)
    heavier = tl.full([], 0.0, tl.float64)
    n_group = tl.full([], 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(x, t)
        x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)
        keep = (x != float("-inf")) & (x >= threshold)
        w = tl.where(keep, tl.exp(x.to(tl.float64) - mxd), 0.0)
        heavier += tl.sum(tl.where(w > v_star, w, 0.0), 0)
        n_group += tl.sum((keep & (w == v_star)).to(tl.int64), 0)
    # The r-th group token (r = 0, 1, ...) is admitted iff heavier + r * v* <= limit (r = 0 is,
    # by the choice of v*): solve for r, then correct the rounding of the division.
    room = tl.maximum(limit - heavier, 0.0)
    r = tl.minimum(room / tl.maximum(v_star, 1e-300), n_group.to(tl.float64)).to(tl.int64)
    r = tl.where((r > 0) & (heavier + r.to(tl.float64) * v_star > limit), r - 1, r)
    up = heavier + (r + 1).to(tl.float64) * v_star <= limit
    r = tl.where((r + 1 < n_group) & up, r + 1, r)
    admitted = tl.where(v_star > 0.0, tl.minimum(r + 1, n_group), n_group)
    return v_star, admitted


@triton.jit
def _draw(row, vocab, t, threshold, mx, use_p, v_star, admitted, u, BLOCK: tl.constexpr):
    """Inverse CDF in vocabulary order over the kept tokens: the last kept token with mass whose
    mass before it is <= u * kept (the first kept token if none has mass). Two passes: the kept
    mass, then the walk. A token is kept iff it survived top-k and, with top-p on, is heavier
    than v* or one of the first `admitted` tokens weighing v*."""
    mxd = mx.to(tl.float64)
    kept = tl.full([], 0.0, tl.float64)
    cum = tl.full([], 0.0, tl.float64)
    token = tl.full([], 0, tl.int64) + vocab
    target = tl.full([], 0.0, tl.float64)
    for walk in tl.static_range(2):
        seen = tl.full([], 0, tl.int64)  # tokens weighing v* in earlier tiles
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(x, t)
            x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)
            keep = (x != float("-inf")) & (x >= threshold)
            w = tl.where(keep, tl.exp(x.to(tl.float64) - mxd), 0.0)  # (BLOCK,)
            group = (keep & (w == v_star)).to(tl.int64)
            rank = seen + tl.cumsum(group, 0) - group  # (BLOCK,) place among tokens weighing v*
            seen += tl.sum(group, 0)
            nucleus = (w > v_star) | ((group != 0) & (rank < admitted))
            keep = keep & ((use_p == 0) | nucleus)
            w = tl.where(keep, w, 0.0)
            if walk == 0:
                kept += tl.sum(w, 0)
                token = tl.minimum(token, tl.min(tl.where(keep, offs, vocab), 0).to(tl.int64))
            else:
                before = cum + (tl.cumsum(w, 0) - w)  # (BLOCK,) mass before each token
                hit = tl.max(tl.where(keep & (w > 0.0) & (before <= target), offs, -1), 0)
                token = tl.where(hit >= 0, hit.to(tl.int64), token)
                cum += tl.sum(w, 0)
        target = tl.where(u > 0.0, u, 0.0).to(tl.float64) * kept
    return token


@triton.jit
def _sample_kernel(
    logits,  # (B, V) float, unit stride along V
    stride_row,
    temperature,  # (B,) float32
    top_k,  # (B,) int32, already clipped to [0, V]
    top_p,  # (B,) float32
    uniform,  # (B,) float32
    out,  # (B,) int64
    vocab,
    BLOCK: tl.constexpr,
    RADIX: tl.constexpr,
):
    b = tl.program_id(0)
    row = logits + b.to(tl.int64) * stride_row
    t = tl.load(temperature + b)
    token = tl.full([], 0, tl.int64)
    if t > 0.0:
        mx = _row_max(row, vocab, t, BLOCK)
        if mx > float("-inf"):  # else every token is masked: 0
            k = tl.load(top_k + b)
            threshold = tl.full([], float("-inf"), tl.float32)
            if (k > 0) & (k < vocab):
                threshold = _kth_largest(row, vocab, t, k, mx, BLOCK, RADIX)
            p = tl.load(top_p + b)
            use_p = ((p > 0.0) & (p < 1.0)).to(tl.int32)
            v_star = tl.full([], 0.0, tl.float64)
            admitted = tl.full([], 0, tl.int64)
            if use_p != 0:
                total = tl.full([], 0.0, tl.float64)
                for start in range(0, vocab, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    x = tl.load(row + offs, mask=offs < vocab, other=float("-inf"))
                    x = tl.math.div_rn(x.to(tl.float32), t)
                    x = tl.minimum(tl.where(x == x, x, float("-inf")), FLOAT_MAX)
                    keep = (x != float("-inf")) & (x >= threshold)
                    total += tl.sum(tl.where(keep, tl.exp(x.to(tl.float64) - mx), 0.0), 0)
                limit = p.to(tl.float64) * total
                v_star, admitted = _nucleus_group(row, vocab, t, threshold, mx, limit, BLOCK, RADIX)
            u = tl.load(uniform + b)
            token = _draw(row, vocab, t, threshold, mx, use_p, v_star, admitted, u, BLOCK)
    else:
        token = _greedy(row, vocab, BLOCK)
    tl.store(out + b, token)


def _row_param(value, name: str, dtype: torch.dtype, rows: int, device: torch.device):
    t = torch.as_tensor(value, device=device).to(dtype).reshape(-1)
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) to match logits, got {tuple(t.shape)}")
    return t.contiguous()


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) float on the device (a window view of wider rows is fine), per-row params
    (B,) (tensors or arrays, moved to the logits' device) -> (B,) int64 window-relative tokens on
    the same device (into `out` when given). No host synchronisation: uniforms are not
    range-checked here (u outside [0, 1) acts as the C++ sampler's does)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    check_device(logits)
    rows, vocab = logits.shape
    if not 1 <= vocab < 2**31:
        raise ValueError(f"vocab size must be in [1, 2^31), got {vocab}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    temperature = _row_param(temperature, "temperature", torch.float32, rows, dev)
    top_k = _row_param(top_k, "top_k", torch.int64, rows, dev).clamp(0, vocab).to(torch.int32)
    top_p = _row_param(top_p, "top_p", torch.float32, rows, dev)
    uniforms = _row_param(uniforms, "uniforms", torch.float32, rows, dev)
    out = output_buffer(out, (rows,), torch.int64, dev)  # (B,)
    if rows:
        block = min(BLOCK, next_power_of_2(vocab))
        # enable_fp_fusion=False: no FMA contraction, so float64 sums round as the CPU's do
        _sample_kernel[(rows,)](
            logits, logits.stride(0), temperature, top_k, top_p, uniforms, out, vocab,
            BLOCK=block, RADIX=RADIX, enable_fp_fusion=False,
        )  # fmt: skip
    return out
