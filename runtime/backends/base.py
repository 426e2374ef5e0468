"""The backend interface: a batch of rows, each with its own cache slot, position and length."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def allocate(self, num_slots: int, max_len: int) -> None:
        """Create the static KV cache: `num_slots` sequences of up to `max_len` positions."""

    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        """Full prefix-LM forward without a cache: (L,) ids and segments -> float32 (L, V)."""

    def prefill(
        self,
        slots: np.ndarray,
        ids: list[np.ndarray],
        segs: list[np.ndarray],
        window: tuple[int, int],
    ) -> np.ndarray:
        """Run each row's prompt, store its keys/values in its slot from position 0, and return
        the logits of each row's last prompt position over vocabulary ids [lo, hi): (B, hi-lo)."""

    def decode(
        self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray, window: tuple[int, int]
    ) -> np.ndarray:
        """Append one segment-2 token per row at its position, attending to the row's cached
        positions 0..pos; returns (B, hi-lo) float32 logits."""

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) scaled images -> int64 (N, T) VQGAN codes."""

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        """int64 (N, T) codes -> float32 (N, 3, H, W) images in [-1, 1]."""
