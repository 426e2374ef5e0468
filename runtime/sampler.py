"""Turn a batch of logit rows into tokens, each row with its own parameters and its own RNG.

Each row draws one uniform number per step from its sequence's Philox stream; the fused kernel
(facert.kernels.sampling) does temperature, top-k, top-p and the inverse-CDF pick from it.
"""

from __future__ import annotations

import numpy as np

from facert.kernels.sampling import sample

from .sequence import Sequence


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (scores must not lose small probabilities)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_tokens(logits: np.ndarray, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
    """(B, W) window logits -> (vocabulary ids (B,), their log-probabilities (B,)).

    Teacher-forced rows take their next forced id; the others sample with their own params.
    """
    temperature = np.array([s.params.temperature for s in seqs], dtype=np.float32)
    top_k = np.array([s.params.top_k for s in seqs], dtype=np.int32)
    top_p = np.array([s.params.top_p for s in seqs], dtype=np.float32)
    uniform = np.array([s.rng.random(dtype=np.float32) for s in seqs], dtype=np.float32)
    picked = sample(logits, temperature, top_k, top_p, uniform)  # (B,) window-relative
    lo = np.array([s.window[0] for s in seqs])
    for r, s in enumerate(seqs):
        if s.forced is not None:
            picked[r] = s.forced[len(s.generated)] - lo[r]
    logp = log_softmax(logits)[np.arange(len(seqs)), picked]
    return picked + lo, logp
