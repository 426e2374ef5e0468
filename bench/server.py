"""A simple FIFO server around a FaceModel, for `facert bench load`.

The engine runs one batch to completion at a time, so the server is a loop: take what has
arrived, run it, repeat. The request at the head of the queue picks the vocabulary window (a
batch shares one), and the batch takes every waiting request with that window, in arrival
order, while their rows fit the KV slots (a score-mode attribute is one row per candidate).

Arrivals are given in advance and the clock is virtual: it jumps to the next arrival when the
server is idle and advances by each batch's real, measured service time. For one synchronous
server this is exact, and no run sleeps waiting for requests.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from facert.runtime.images import to_uint8
from facert.runtime.model import FaceModel
from facert.runtime.sampler import log_softmax
from facert.runtime.sequence import GREEDY, SamplingParams

from .contestants import DESCRIPTION


@dataclass
class Request:
    id: int
    task: str  # to_image, to_caption or to_attributes
    arrival: float
    finish: float | None = None

    @property
    def latency(self) -> float:
        return self.finish - self.arrival


def poisson_stream(rate: float, n: int, mix: dict[str, float], seed: int = 0) -> list[Request]:
    """n requests with exponential gaps (rate per second) and tasks drawn from `mix`."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    tasks = rng.choice(list(mix), n, p=np.array(list(mix.values())) / sum(mix.values()))
    return [Request(i, str(t), float(a)) for i, (t, a) in enumerate(zip(tasks, arrivals))]


class Server:
    def __init__(self, model: FaceModel, max_requests: int, attribute: str | None):
        self.model, self.max_requests, self.attribute = model, max_requests, attribute
        self.image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        self.batches: list[int] = []

    def _rows(self, r: Request) -> int:
        if r.task == "to_attributes":
            return len(self.model.config.attributes[self.attribute])
        return 1

    def _take(self, queue: deque) -> list[Request]:
        image, slots = queue[0].task == "to_image", self.model.engine.pool.num_slots
        batch, rows = [], 0
        for r in list(queue):
            if len(batch) == self.max_requests:
                break
            if (r.task == "to_image") == image and rows + self._rows(r) <= slots:
                batch.append(r)
                rows += self._rows(r)
                queue.remove(r)
        return batch

    def _run(self, batch: list[Request]) -> None:
        m, t = self.model, self.model.templates
        if batch[0].task == "to_image":
            seqs = [t.to_image(DESCRIPTION, SamplingParams(seed=r.id), 0) for r in batch]
            m.engine.run(seqs)
            for s in seqs:  # one image per decode call, as generate_faces does
                to_uint8(m.image_tokenizer.decode(t.codes_of(s)[None]))
            return
        codes = m.image_tokenizer.encode([self.image] * len(batch))
        seqs, scored = [], []
        for r, c in zip(batch, codes):
            if r.task == "to_caption":
                seqs.append(t.to_caption(c, GREEDY))
            else:
                answers = [t.candidate_ids(v) for v in m.config.attributes[self.attribute]]
                group = [t.to_attribute(c, self.attribute, forced=a) for a in answers]
                seqs += group
                scored.append(group)
        m.engine.run(seqs)
        for group in scored:
            log_softmax(np.array([sum(s.logprobs) for s in group]))

    def serve(self, requests: list[Request]) -> None:
        """Complete every request, setting its finish time on the virtual clock."""
        pending = deque(sorted(requests, key=lambda r: r.arrival))
        queue: deque[Request] = deque()
        clock = 0.0
        while pending or queue:
            while pending and pending[0].arrival <= clock:
                queue.append(pending.popleft())
            if not queue:
                clock = pending[0].arrival
                continue
            batch = self._take(queue)
            start = time.perf_counter()
            self._run(batch)
            clock += time.perf_counter() - start
            for r in batch:
                r.finish = clock
            self.batches.append(len(batch))
