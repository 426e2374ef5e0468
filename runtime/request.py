"""Request state: one caller's unit of work, the sequences it runs and what it waits for.

A request is every sequence one answer needs (all drawings of a best-of-N, every candidate
answer of every view): they are admitted, cancelled and failed together, and the caller's
future resolves once the last one ends, with `finish(seqs)` turning them into the result.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .sequence import Sequence

# Lower runs first. Analysis (captions, attributes) answers someone waiting at a kiosk;
# drawing is a background job that may take seconds.
PRIORITY_ANALYSIS = 0
PRIORITY_GENERATION = 1

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    task: str  # "generate", "score", "caption", "attributes": for metrics and errors
    seqs: list[Sequence]
    finish: Callable[[list[Sequence]], Any]  # completed sequences -> the caller's result
    priority: int = PRIORITY_ANALYSIS
    deadline: float | None = None  # time.monotonic() by which the result is due
    # what admission promised: the result predicted by then (the deadline less a headroom for
    # the cost model's error; set when it is admitted)
    due: float | None = None
    on_token: Callable[[int, int], None] | None = None  # (sequence index, token id), streaming
    # Work the engine thread does just before the first prefill: encode the request's images
    # (`images` of them) and write their codes into its prompts. Admission never waits for it.
    prepare: Callable[[], None] | None = None
    images: int = 0
    draws: int = 0  # faces that making its result decodes (the VQGAN drawing them)
    future: Future = field(default_factory=Future)
    arrival: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))
    started: int = 0  # sequences admitted so far (they are admitted in order)
    admitted_at: float | None = None  # when its first sequence got a slot
    first_token_at: float | None = None

    @property
    def waiting(self) -> list[Sequence]:
        """Sequences not admitted yet."""
        return self.seqs[self.started :]

    @property
    def done(self) -> bool:
        return self.started == len(self.seqs) and all(s.done for s in self.seqs)

    def sort_key(self) -> tuple:
        """Admission order: priority, then the earliest deadline, then arrival."""
        return (self.priority, self.deadline if self.deadline is not None else float("inf"),
                self.arrival, self.id)  # fmt: skip
