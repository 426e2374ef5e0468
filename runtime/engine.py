"""Run sequences to completion: prefill, then one decode step at a time for the rows still
running. Policy (which requests run together) belongs to the caller; this file only executes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .backends.base import Backend
from .kv_cache import SlotPool
from .sampler import next_tokens
from .sequence import Sequence


class Engine:
    def __init__(self, backend: Backend, num_slots: int, max_len: int):
        self.backend = backend
        self.pool = SlotPool(num_slots, max_len)
        backend.allocate(num_slots, max_len)

    def run(self, seqs: list[Sequence], on_step: Callable[[int], None] | None = None) -> None:
        """Complete every sequence (in-place), at most `num_slots` at a time. Rows of one batch
        share a vocabulary window; `on_step(n)` reports n tokens produced (for progress bars)."""
        for start in range(0, len(seqs), self.pool.num_slots):
            self._run_batch(seqs[start : start + self.pool.num_slots], on_step)

    def _run_batch(self, seqs: list[Sequence], on_step: Callable[[int], None] | None) -> None:
        window = seqs[0].window
        if any(s.window != window for s in seqs):
            raise ValueError("all rows of a batch must share one vocabulary window")
        for s in seqs:
            s.slot = self.pool.acquire()
        try:
            logits = self.backend.prefill(
                np.array([s.slot for s in seqs]),
                [s.prompt_ids for s in seqs],
                [s.prompt_segs for s in seqs],
                window,
            )
            active = seqs
            while True:
                tokens, logp = next_tokens(logits, active)
                for s, t, lp in zip(active, tokens, logp):
                    s.generated.append(int(t))
                    s.logprobs.append(float(lp))
                if on_step:
                    on_step(len(active))
                for s in active:
                    if s.done:
                        self._release(s)
                active = self._compact([s for s in active if not s.done])
                if not active:
                    return
                logits = self.backend.decode(
                    np.array([s.slot for s in active]),
                    np.array([s.generated[-1] for s in active]),
                    np.array([s.last_position for s in active]),
                    window,
                )
        finally:
            for s in seqs:
                if s.slot >= 0:
                    self._release(s)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.slot)
        seq.slot = -1

    def _compact(self, active: list[Sequence]) -> list[Sequence]:
        """Move running rows into the lowest free slots and order them by slot, so a decode
        step's rows stay slots 0..B-1, which backends bind in place."""
        for s in sorted(active, key=lambda s: s.slot, reverse=True):
            if not self.pool.num_free:
                break  # every slot is in use, so the running rows already are 0..B-1
            target = self.pool.acquire()
            if target < s.slot:
                self.backend.copy_slot(s.slot, target, s.last_position)
                self.pool.release(s.slot)
                s.slot = target
            else:
                self.pool.release(target)
        return sorted(active, key=lambda s: s.slot)
