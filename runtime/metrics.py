"""In-process counters and histograms of the scheduler, plain Python so that any exporter (the
HTTP server's Prometheus endpoint, a camera app's log line, a benchmark) reads one snapshot."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Seconds, from a fraction of a decode step to a long best-of-N drawing.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus's shape): counts[i] observations <= buckets[i]."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            self.counts[i] += 1
        self.count += 1
        self.total += value

    def snapshot(self) -> dict[str, Any]:
        return {
            "buckets": dict(zip(self.buckets, self.counts)),
            "count": self.count,
            "sum": self.total,
        }


class Metrics:
    """What the scheduler did, by request task: waits, latencies, steps, slots, rejections."""

    HISTOGRAMS = {
        "queue_wait_seconds": TIME_BUCKETS,  # submission -> first prefill
        "time_to_first_token_seconds": TIME_BUCKETS,
        "request_seconds": TIME_BUCKETS,  # submission -> result
        "step_seconds": TIME_BUCKETS,  # one engine step: prefills and a decode
        "rows_per_step": ROW_BUCKETS,
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histograms: dict[tuple[str, str], Histogram] = {}
        self._counters: Counter[tuple[str, str]] = Counter()
        self._gauges: dict[str, float] = {}

    def observe(self, name: str, value: float, task: str = "") -> None:
        with self._lock:
            key = (name, task)
            if key not in self._histograms:
                self._histograms[key] = Histogram(self.HISTOGRAMS[name])
            self._histograms[key].observe(value)

    def count(self, name: str, label: str = "", by: int = 1) -> None:
        """Counters: requests and tokens by task, rejections and cancellations by reason."""
        with self._lock:
            self._counters[(name, label)] += by

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def snapshot(self) -> dict[str, Any]:
        """{"counters": {name: {label: n}}, "gauges": {name: v},
        "histograms": {name: {task: {"buckets", "count", "sum"}}}}"""
        with self._lock:
            counters: dict[str, dict[str, int]] = {}
            for (name, label), n in self._counters.items():
                counters.setdefault(name, {})[label] = n
            histograms: dict[str, dict[str, Any]] = {}
            for (name, task), h in self._histograms.items():
                histograms.setdefault(name, {})[task] = h.snapshot()
            return {"counters": counters, "gauges": dict(self._gauges), "histograms": histograms}
