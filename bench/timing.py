"""Timing records shared by the scenarios: one generation's token times, percentiles, and a clock
that sees every engine step inside a public FaceModel call."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from facert.runtime.engine import StepEvent
from facert.runtime.model import FaceModel


@dataclass
class Run:
    """One call: when each step's tokens appeared (seconds since the call began) and its length."""

    token_times: list[float] = field(default_factory=list)
    total: float = 0.0
    tokens: int = 0  # tokens produced over all rows

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def step_times(self) -> list[float]:
        """Seconds between consecutive steps (each one token per running row)."""
        return np.diff(self.token_times).tolist()


# Contestants share one process. After its work, a library's idle threads (OpenMP under torch,
# ONNX Runtime's and onnxruntime-genai's pools) spin for a while before they sleep, and on a
# machine with few cores they would take a core from whichever contestant runs next. A pause
# before every timed call, off the clock, lets them settle.
SETTLE_S = 0.2


def timed(call: Callable[[Callable[[int], None]], object]) -> Run:
    """Run `call(tick)`; the callee calls tick(n) when a step has produced n tokens."""
    time.sleep(SETTLE_S)
    run = Run()
    start = time.perf_counter()

    def tick(n: int) -> None:
        run.token_times.append(time.perf_counter() - start)
        run.tokens += n

    call(tick)
    run.total = time.perf_counter() - start
    return run


def timed_call(model: FaceModel, call: Callable[[], object]) -> Run:
    """Time a public FaceModel call step by step: for the duration of the call, the model's
    engine reports every prefill and decode (each producing one token per row) to the clock,
    through its public observer hook."""

    def with_clock(tick: Callable[[int], None]) -> None:
        def observe(event: StepEvent) -> None:
            if event.kind in ("prefill", "decode"):
                tick(event.rows)

        model.engine.observers.append(observe)
        try:
            call()
        finally:
            model.engine.observers.remove(observe)

    return timed(with_clock)


def summary_ms(seconds: list[float]) -> dict:
    """n, mean and the 50/95/99th percentiles, in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        **{f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)},
    }
