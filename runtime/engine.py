"""Execution: prefill new sequences, then decode one token for every running row, on the
backend's static cache. Which sequences run together is the scheduler's decision; this file
only executes a step and reports it to its observers.

A step may mix tasks: the layers run once for all its rows, then the head once per vocabulary
window among them (image codes for drawings, text for captions and answers), each row sampled
with its own parameters and RNG. Prompts are prefilled in groups of equal length, so a row's
arithmetic never depends on which other prompts arrived beside it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .kv_cache import PrefixCache, SlotPool
from .sampler import next_tokens
from .sequence import Sequence


@dataclass(frozen=True)
class StepEvent:
    """What one engine call did, for observers (benchmarks, doctor, metrics)."""

    # "prefill" or "decode" (rows of tokens); "encode" or "draw" (rows of images); "text": a
    # free-text row ended (at [SEP] or its room's end) with `tokens` tokens, in no time
    kind: str
    rows: int
    tokens: int  # prompt tokens computed (prefill; a cached prefix costs none) or produced
    seconds: float
    text_rows: int = 0  # rows that ran the wordpiece head (decode), the rest the image head


class Engine:
    def __init__(
        self, backend: Backend, num_slots: int, max_len: int, prefix_slots: int | None = None
    ):
        """prefix_slots: slots the prefix cache may keep (default: an eighth of them)."""
        self.backend = backend
        self.pool = SlotPool(num_slots, max_len)
        self.prefixes = PrefixCache(self.pool, num_slots // 8 if prefix_slots is None
                                    else prefix_slots)  # fmt: skip
        backend.allocate(num_slots, max_len)
        self._lock = threading.Lock()
        # Called after every prefill, decode and image call with a StepEvent; observers must
        # not raise (an observer's error fails the step's requests).
        self.observers: list[Callable[[StepEvent], None]] = []

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the backend's cache: steps and runs of different threads never interleave."""
        with self._lock:
            yield

    @property
    def idle(self) -> bool:
        """No sequence holds a slot (the prefix cache may keep some)."""
        return self.pool.num_free + len(self.prefixes) == self.pool.num_slots

    def prefill(self, seqs: list[Sequence]) -> int:
        """Run the prompts of sequences that hold slots; each gets its first token. Returns the
        prompt tokens computed (shared and cached prefixes count once, or not at all)."""
        if not seqs:
            return 0
        start = time.perf_counter()
        by_length: dict[int, list[Sequence]] = defaultdict(list)
        by_prefix: dict[bytes, list[Sequence]] = defaultdict(list)
        for s in seqs:
            if s.shared_prefix:
                by_prefix[s.prompt_ids[: s.shared_prefix].tobytes()].append(s)
            else:
                by_length[len(s.prompt_ids)].append(s)
        for group in by_length.values():
            hidden = self.backend.prefill(
                np.array([s.slot for s in group]),
                [s.prompt_ids for s in group],
                [s.prompt_segs for s in group],
            )  # (B, C)
            self._sample(group, hidden)
        tokens = sum(len(s.prompt_ids) for group in by_length.values() for s in group)
        for group in by_prefix.values():
            tokens += self._branch(group)
        self._report(StepEvent("prefill", len(seqs), tokens, time.perf_counter() - start))
        return tokens

    def _branch(self, group: list[Sequence]) -> int:
        """Sequences whose prompts start with one shared prefix: the prefix is prefilled once
        (or found in the prefix cache) and its cached positions copied into a slot per distinct
        prompt; that prompt's own rest (segment 2, e.g. "gender :") is then fed one token per
        decode step, which is what prefilling it would compute, and the whole prompt copied to
        every other row asking the same (each candidate answer to one question). Returns the
        prompt tokens computed."""
        first = group[0]
        n = first.shared_prefix
        ids, segs = first.prompt_ids[:n], first.prompt_segs[:n]
        if any((s.prompt_segs[n:] != 2).any() for s in group):
            raise ValueError("only segment-2 ids may follow a shared prefix")
        asking: dict[bytes, list[Sequence]] = defaultdict(list)  # one question, its rows
        for s in group:
            asking[s.prompt_ids.tobytes()].append(s)
        leads = [rows[0] for rows in asking.values()]
        cached = self.prefixes.get(ids)
        tokens = sum(len(s.prompt_ids) - n for s in leads)
        if cached is None:
            tokens += n
            keep = self.prefixes.reserve()
            src = first.slot if keep is None else keep
            hidden = self.backend.prefill(np.array([src]), [ids], [segs])[0]  # (C,)
            if keep is not None:
                self.prefixes.put(ids, keep, hidden)
        else:
            src, hidden = cached.slot, cached.hidden
        for s in leads:
            if s.slot != src:
                self.backend.copy_slot(src, s.slot, n)
        last = {id(s): hidden for s in leads}  # each lead's hidden state at its last position
        for pos in range(n, max(len(s.prompt_ids) for s in leads)):
            rows = [s for s in leads if len(s.prompt_ids) > pos]
            h = self.backend.decode(
                np.array([s.slot for s in rows]),
                np.array([s.prompt_ids[pos] for s in rows]),
                np.full(len(rows), pos),
            )  # (B, C)
            last.update((id(s), row) for s, row in zip(rows, h))
        for lead, rows in zip(leads, asking.values()):
            for s in rows[1:]:
                self.backend.copy_slot(lead.slot, s.slot, len(s.prompt_ids))
        self._sample(group, np.stack([last[id(asking[s.prompt_ids.tobytes()][0])]
                                      for s in group]))  # fmt: skip
        return tokens

    def decode(self, seqs: list[Sequence]) -> None:
        """One token for each running sequence, whatever its task."""
        if not seqs:
            return
        start = time.perf_counter()
        hidden = self.backend.decode(
            np.array([s.slot for s in seqs]),
            np.array([s.generated[-1] for s in seqs]),
            np.array([s.last_position for s in seqs]),
        )  # (B, C)
        self._sample(seqs, hidden)
        text = sum(1 for s in seqs if s.writes_text)
        self._report(StepEvent("decode", len(seqs), len(seqs), time.perf_counter() - start, text))

    def _sample(self, seqs: list[Sequence], hidden: np.ndarray) -> None:
        """Head and sampling per vocabulary window; append each row's token and log-prob."""
        by_window: dict[tuple[int, int], list[int]] = defaultdict(list)
        for r, s in enumerate(seqs):
            by_window[s.window].append(r)
        for window, rows in by_window.items():
            logits = self.backend.head(hidden[rows], window)  # (N, hi - lo)
            group = [seqs[r] for r in rows]
            tokens, logp = next_tokens(logits, group)
            for s, t, lp in zip(group, tokens, logp):
                s.generated.append(int(t))
                s.logprobs.append(float(lp))
                if s.done and s.forced is None and s.stop_id is not None:
                    self._report(StepEvent("text", 1, len(s.generated), 0.0))

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) faces -> int64 (N, T) codes. Image calls take no cache, so they
        run beside steps; they are reported like steps, so whoever ran them prices the next."""
        start = time.perf_counter()
        codes = self.backend.encode_images(images)
        self._report(StepEvent("encode", len(images), 0, time.perf_counter() - start))
        return codes

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        """int64 (N, T) codes -> float32 (N, 3, H, W) faces in [-1, 1] (see encode_images)."""
        start = time.perf_counter()
        images = self.backend.decode_images(codes)
        self._report(StepEvent("draw", len(codes), 0, time.perf_counter() - start))
        return images

    def _report(self, event: StepEvent) -> None:
        for observer in self.observers:
            observer(event)

    def run(self, seqs: list[Sequence], on_step: Callable[[int], None] | None = None) -> None:
        """Complete a fixed list of sequences on the calling thread, at most `num_slots` at a
        time (the one-at-a-time baseline the benchmarks compare the scheduler with, and the
        tools' direct path). `on_step(n)` reports n tokens produced. Every slot it took is free
        again when it returns, raises or is interrupted."""
        with self.exclusive():
            for start in range(0, len(seqs), self.pool.num_slots):
                batch = seqs[start : start + self.pool.num_slots]
                try:
                    for s in batch:
                        s.slot = self.prefixes.acquire()
                    self.prefill(batch)
                    while True:
                        if on_step:
                            on_step(sum(1 for s in batch if s.slot >= 0))
                        for s in batch:
                            if s.done and s.slot >= 0:
                                self._release(s)
                        active = [s for s in batch if s.slot >= 0]
                        if not active:
                            break
                        self.decode(active)
                finally:
                    for s in batch:
                        if s.slot >= 0:
                            self._release(s)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.slot)
        seq.slot = -1
