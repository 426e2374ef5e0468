"""The backend interface: a batch of rows, each with its own cache slot, position and length."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str
    lm_path: str  # where the LM's steps run, for reports: "fused kernel", "lm_decode graph", ...
    weight_bytes: int  # the weights as this backend holds them (every copy it keeps)
    cache_dtype: np.dtype  # of the KV cache's keys and values

    def allocate(self, num_slots: int, max_len: int) -> None:
        """Create the static KV cache: `num_slots` sequences of up to `max_len` positions."""

    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        """Full prefix-LM forward without a cache: (L,) ids and segments -> float32 (L, V)."""

    def prefill(
        self, slots: np.ndarray, ids: list[np.ndarray], segs: list[np.ndarray]
    ) -> np.ndarray:
        """Run each row's prompt, store its keys/values in its slot from position 0, and return
        the final hidden state (after ln_f) of each row's last prompt position: float32 (B, C)."""

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Append one segment-2 token per row at its position, attending to the row's cached
        positions 0..pos (its keys/values written in place); returns the rows' final hidden
        states, float32 (B, C)."""

    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        """(N, C) final hidden states -> float32 (N, hi-lo) logits over vocabulary ids [lo, hi).
        A step runs the layers once for all its rows (prefill/decode), then the head once per
        vocabulary window among them, so each row pays only for its own window."""

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into slot `dst`."""

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) scaled images -> int64 (N, T) VQGAN codes."""

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        """int64 (N, T) codes -> float32 (N, 3, H, W) images in [-1, 1]."""


def pad_rows(
    ids: list[np.ndarray], segs: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts of different lengths -> right-padded (B, T) ids and segments, and the lengths.
    Padding is segment 0, which the prefix mask hides from every query."""
    lengths = np.array([len(x) for x in ids])
    batch_ids = np.zeros((len(ids), int(lengths.max())), dtype=np.int64)  # (B, T)
    batch_segs = np.zeros_like(batch_ids)
    for r, (i, s) in enumerate(zip(ids, segs)):
        batch_ids[r, : len(i)], batch_segs[r, : len(s)] = i, s
    return batch_ids, batch_segs, lengths
