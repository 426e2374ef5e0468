"""KV-cache memory: a fixed number of slots, each holding one sequence's keys and values for up
to `max_len` positions. The pool decides who owns which slot; the backend holds the arrays
(one static cache, allocated once, updated in place)."""

from __future__ import annotations

import heapq

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
