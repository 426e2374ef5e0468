"""KV-cache memory: a fixed number of slots, each holding one sequence's keys and values for up
to `max_len` positions. The pool decides who owns which slot; the backend holds the arrays
(one static cache, allocated once, updated in place)."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .config import LMConfig
from .errors import FacertError


def kv_bytes_per_slot(cfg: LMConfig, max_len: int, bytes_per_value: int = 4) -> int:
    """Keys and values of every layer for one sequence of `max_len` positions."""
    return 2 * cfg.n_layer * cfg.n_embd * max_len * bytes_per_value


class SlotPool:
    def __init__(self, num_slots: int, max_len: int):
        if num_slots < 1:
            raise FacertError("the KV cache needs at least one slot")
        self.num_slots, self.max_len = num_slots, max_len
        self._free = list(range(num_slots))  # a min-heap: the lowest free slot goes first

    @classmethod
    def for_budget(cls, cfg: LMConfig, max_len: int, budget_bytes: int) -> SlotPool:
        """As many slots as fit in a byte budget."""
        slots = budget_bytes // kv_bytes_per_slot(cfg, max_len)
        if slots < 1:
            need = kv_bytes_per_slot(cfg, max_len)
            raise FacertError(f"KV budget {budget_bytes} B is below one slot ({need} B)")
        return cls(slots, max_len)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        """The lowest free slot, so a batch started on an idle pool holds slots 0..B-1, which
        backends can bind in place."""
        if not self._free:
            raise FacertError("no free KV-cache slot")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not in use")
        heapq.heappush(self._free, slot)


@dataclass
class CachedPrefix:
    slot: int
    length: int
    hidden: np.ndarray  # (C,) final hidden state of the prefix's last position


class PrefixCache:
    """Recently prefilled prompt prefixes, each kept in a slot of its own (least recently used
    goes first), keyed by their exact ids: every question about one face, and the same face
    asked again (a kiosk asks about the same person frame after frame), branch from one
    prefill by copying its cached positions. Its slots come from the pool, and the scheduler
    takes them back (evict) whenever a sequence needs one."""

    def __init__(self, pool: SlotPool, capacity: int):
        self.pool, self.capacity = pool, capacity
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ids: np.ndarray) -> CachedPrefix | None:
        entry = self._entries.get(ids.tobytes())
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(ids.tobytes())
        return entry

    def reserve(self) -> int | None:
        """A slot to prefill a new prefix into, or None when none can be spared."""
        if self.capacity < 1:
            return None
        if len(self._entries) >= self.capacity or not self.pool.num_free:
            self.evict()  # the least recently used prefix makes room for this one
        return self.pool.acquire() if self.pool.num_free else None

    def put(self, ids: np.ndarray, slot: int, hidden: np.ndarray) -> None:
        self._entries[ids.tobytes()] = CachedPrefix(slot, len(ids), hidden)

    def acquire(self) -> int:
        """A free slot for a sequence, taking one back from the cache if that is where they
        all are."""
        if not self.pool.num_free:
            self.evict()
        return self.pool.acquire()

    def evict(self) -> bool:
        """Free the least recently used prefix's slot; False if none is kept."""
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        self.pool.release(entry.slot)
        return True
