"""The exact Talk2Face prefix-LM in PyTorch (the reference backend's math).

Matches TencentPretrain's Talk2Face configuration operation for operation: its own LayerNorm
(unbiased std, eps added to the std), gelu_fast, scores divided by sqrt(head_dim), an additive
-10000 prefix mask, pre-LN blocks, a final LayerNorm and an untied, bias-free LM head.

Attention takes a `cache_op(layer, k, v) -> (k, v)` hook so one code path serves a full forward
(no cache), prefill (write the prompt's keys/values into the static cache) and decode (write one
position, read the cached prefix).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from facert.runtime.config import LMConfig

MASK_VALUE = -10000.0  # TencentPretrain adds this, not -inf, to hidden keys

CacheOp = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def no_cache(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return k, v


def tp_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """TencentPretrain's LayerNorm over the last axis: weight * (x - mean) / (std + eps) + bias,
    with the unbiased std (N - 1) and eps added to the std, not the variance."""
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    return weight * (x - mean) / (std + eps) + bias


class TPLayerNorm(nn.Module):
    """TencentPretrain's LayerNorm (tp_layer_norm) with its parameters."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_layer_norm(x, self.weight, self.bias, self.eps)


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.layer, self.n_head = layer, cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache_op: CacheOp) -> torch.Tensor:
        B, T, C = x.shape
        D = C // self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, D).transpose(1, 2)  # (B, H, T, D)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        k, v = cache_op(self.layer, k, v)  # (B, H, Tk, D)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(float(D))  # (B, H, T, Tk)
        probs = torch.softmax(scores + bias, dim=-1)
        y = torch.matmul(probs, v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.n_ffn)
        self.proj = nn.Linear(cfg.n_ffn, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gelu_fast(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.ln_1 = TPLayerNorm(cfg.n_embd, cfg.layernorm_eps)
        self.attn = Attention(cfg, layer)
        self.ln_2 = TPLayerNorm(cfg.n_embd, cfg.layernorm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache_op: CacheOp) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), bias, cache_op)
        return h + self.mlp(self.ln_2(h))


def prefix_mask_bias(segs: torch.Tensor) -> torch.Tensor:
    """Additive mask for a prompt, (B, T) segments -> (B, 1, T, T).

    Key j is visible to query i iff two of (seg_j == 1, seg_j > 0, j <= i) hold: segment-1 keys
    are seen by every query, segment-2 keys causally, segment-0 (padding) keys never.
    """
    T = segs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segs.device).tril()  # (T, T) [i, j]
    seg_j = segs[:, None, None, :]  # (B, 1, 1, T)
    votes = (seg_j == 1).int() + (seg_j > 0).int() + causal.int()
    return (1.0 - (votes >= 2).float()) * MASK_VALUE


def decode_mask_bias(positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """Additive mask for one new token per row: cached keys 0..pos are visible, (B,) -> (B,1,1,Tk).

    Every cached key at or before the new position is either a segment-1 prompt key or an
    earlier segment-2 key, so this equals the prefix mask's last row.
    """
    j = torch.arange(key_len, device=positions.device)
    visible = j[None, :] <= positions[:, None]  # (B, Tk)
    return ((1.0 - visible.float()) * MASK_VALUE)[:, None, None, :]


class Talk2FaceLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.n_embd)
        self.wse = nn.Embedding(3, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = TPLayerNorm(cfg.n_embd, cfg.layernorm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def hidden(
        self,
        ids: torch.Tensor,
        segs: torch.Tensor,
        positions: torch.Tensor,
        bias: torch.Tensor,
        cache_op: CacheOp = no_cache,
    ) -> torch.Tensor:
        """(B, T) ids, segments and positions -> (B, T, C) final-LayerNorm hidden states."""
        x = (self.wte(ids) + self.wpe(positions)) + self.wse(segs)  # (B, T, C)
        for block in self.blocks:
            x = block(x, bias, cache_op)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Project onto the vocabulary, or onto ids [lo, hi) only (e.g. the image codes)."""
        w = self.lm_head.weight if window is None else self.lm_head.weight[window[0] : window[1]]
        return F.linear(h, w)

    def forward(self, ids: torch.Tensor, segs: torch.Tensor) -> torch.Tensor:
        """Full prefix-LM forward without a cache, as the reference does: (B, T) -> (B, T, V)."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.logits(self.hidden(ids, segs, positions, prefix_mask_bias(segs)))
