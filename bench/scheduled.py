"""The `scheduler` policy of `facert bench load`: the same Poisson stream replayed in real time
through the public API (`FaceModel.submit` with each task's deadline), so the model's own
scheduler batches, orders, refuses and cancels. Unlike the FIFO loop (server.py) its clock is
real: requests arrive while earlier ones run."""

from __future__ import annotations

import threading
import time

import numpy as np

from facert.runtime.errors import DeadlineExceeded, FacertError
from facert.runtime.model import FaceModel

from .contestants import DESCRIPTION
from .server import Request
from .timing import summary_ms


def _submit(model: FaceModel, r: Request, image: np.ndarray, attribute: str, deadline: float):
    if r.task == "to_image":
        return model.submit("generate_faces", DESCRIPTION, n=1, seed=r.id, candidates=1,
                            deadline_s=deadline)  # fmt: skip
    if r.task == "to_caption":
        return model.submit("caption", image, deadline_s=deadline)
    return model.submit("attributes", image, attribute, views=1, deadline_s=deadline)


def serve(
    model: FaceModel, requests: list[Request], deadlines: dict[str, float], attribute: str
) -> dict:
    """Replay the stream; returns the load table's row (plus refusals) for this policy."""
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rows_before = _rows_per_step(model)
    done = threading.Semaphore(0)
    refused, refusal_s, missed = [], [], []
    refused_by: dict[str, int] = {}
    start = time.perf_counter()

    def finished(r: Request, future) -> None:
        if future.exception() is None:
            r.finish = time.perf_counter() - start
        elif isinstance(future.exception(), DeadlineExceeded):
            missed.append(r)  # cancelled when it ran past its deadline
        done.release()

    submitted = 0
    for r in sorted(requests, key=lambda r: r.arrival):
        time.sleep(max(0.0, r.arrival - (time.perf_counter() - start)))
        t0 = time.perf_counter()
        try:
            future = _submit(model, r, image, attribute, deadlines[r.task])
        except FacertError as e:  # refused at admission: FacertOverloaded or DeadlineExceeded
            refused.append(r)
            refused_by[type(e).__name__] = refused_by.get(type(e).__name__, 0) + 1
            refusal_s.append(time.perf_counter() - t0)
            continue
        submitted += 1
        future.add_done_callback(lambda f, r=r: finished(r, f))
    for _ in range(submitted):
        done.acquire()
    completed = [r for r in requests if r.finish is not None]
    met = [r for r in completed if r.latency <= deadlines[r.task]]
    span = max([r.finish for r in completed], default=0.0) - min(r.arrival for r in requests)
    lat = summary_ms([r.latency for r in completed] or [0.0])
    rows, steps = (a - b for a, b in zip(_rows_per_step(model), rows_before))
    return {
        "throughput_rps": len(completed) / span if span else 0.0,
        "goodput_rps": len(met) / span if span else 0.0,
        "met": len(met) / len(requests),
        "admitted_met": len(met) / submitted if submitted else 1.0,
        "refused": len(refused) / len(requests),
        "refused_by": refused_by,  # DeadlineExceeded: its own; FacertOverloaded: others' promises
        "overran": len(missed) / len(requests),  # admitted, then cancelled past its deadline
        "refusal_ms_max": 1e3 * max(refusal_s, default=0.0),
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "mean_batch": rows / steps if steps else 0.0,
        "span_s": span,
    }


def _rows_per_step(model: FaceModel) -> tuple[float, int]:
    """Rows run and steps taken so far (the scheduler's metrics)."""
    h = model.metrics.snapshot()["histograms"].get("rows_per_step", {}).get("", {})
    return h.get("sum", 0.0), h.get("count", 0)
