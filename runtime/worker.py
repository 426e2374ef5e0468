"""The one thread that owns the engine: it takes requests from any number of callers, runs
steps (new prompts, then one decode step for every running row, whatever its task), and
completes each caller's future.

Callers never touch the engine. `submit` decides admission at once, on the caller's thread
(a full queue or an impossible deadline is an error there and then); results are made
(`Request.finish`, e.g. the VQGAN drawing the faces) on a second thread, so turning codes into
pixels never holds up the next decode step. A backend error fails only the requests with rows
in that step; if the thread itself dies, every waiting caller gets the error and later calls
are refused with it, never a silent hang. A watchdog thread does the same for a step that runs
past `step_timeout` (a hung driver, a deadlocked callback): every waiting caller is failed and
new calls are refused until the step returns.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from .engine import Engine
from .errors import DeadlineExceeded, EngineFailure
from .metrics import Metrics
from .request import Request
from .scheduler import Batch, Scheduler


class Worker:
    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        metrics: Metrics,
        step_timeout: float | None = 60.0,
    ):
        """step_timeout: seconds one step may run before the engine counts as stuck (None:
        never)."""
        self.engine, self.scheduler, self.metrics = engine, scheduler, metrics
        self.step_timeout = step_timeout
        self._cv = threading.Condition()
        self._closing = False
        self._finishing = 0  # results being made; each may still submit a continuation
        self._failure: BaseException | None = None
        self.last_step_at = time.monotonic()
        self._step_started: float | None = None  # when the running step began
        self._stuck = False
        self._closed = threading.Event()  # the engine thread has stopped: the watchdog stops
        # results to make, most urgent first (a caption's words before a drawing's pixels)
        self._results: queue.PriorityQueue = queue.PriorityQueue()
        self._finisher = threading.Thread(target=self._finish_loop, name="facert-finish",
                                          daemon=True)  # fmt: skip
        self._finisher.start()
        engine.observers.append(scheduler.cost.observe)  # prices every step, whoever runs it
        self._thread = threading.Thread(target=self._loop, name="facert-engine", daemon=True)
        self._thread.start()
        if step_timeout is not None:
            threading.Thread(target=self._watch, name="facert-watchdog", daemon=True).start()

    def submit(self, req: Request, continuation: bool = False) -> Future:
        """Admit a request (or raise FacertOverloaded / DeadlineExceeded / EngineFailure).
        A continuation (the scoring half of a best-of-N drawing) skips the admission checks:
        its request was admitted already, and refusing it now would waste the work done."""
        with self._cv:
            if self._failure is not None:
                raise EngineFailure(f"the engine thread stopped: {self._failure!r}")
            if self._closing and not continuation:
                raise EngineFailure("this model is closed")
            if self._stuck:
                raise EngineFailure(self._stuck_message())
            if not self._thread.is_alive():  # e.g. a child forked after the model was loaded
                raise EngineFailure(
                    "this model's engine thread is not running in this process (was it forked "
                    "after facert.load()? load the model in the process that uses it)"
                )
            try:
                self.scheduler.admit(req, time.monotonic(), checks=not continuation)
            except Exception as e:
                self.metrics.count("rejected", type(e).__name__)
                raise
            self.metrics.count("requests", req.task)
            self.metrics.set("queue_depth", len(self.scheduler.queue))
            self._cv.notify()
        return req.future

    def health(self) -> dict[str, Any]:
        """Alive, busy, and how long since the last step (a stuck step shows here)."""
        with self._cv:
            busy = self.scheduler.has_work()
            waiting = len(self.scheduler.queue)
            stuck = self._stuck
        return {
            "alive": self._thread.is_alive() and self._failure is None,
            "stuck": stuck,
            "busy": busy,
            "waiting": waiting,
            "seconds_since_step": time.monotonic() - self.last_step_at,
            "failure": None if self._failure is None else repr(self._failure),
        }

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting, finish everything admitted, stop the threads."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._results.put(_LAST)
        if threading.current_thread() is not self._finisher:
            self._finisher.join()

    # -- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self.scheduler.has_work() and not (
                        self._closing and not self._finishing
                    ):
                        self._cv.wait()
                    if not self.scheduler.has_work():
                        return  # closing, and nothing left to run or finish
                    now = time.monotonic()
                    gone = self.scheduler.expired(now)
                    batch = self.scheduler.schedule()
                    self.metrics.set("queue_depth", len(self.scheduler.queue))
                    pool, kept = self.engine.pool, len(self.engine.prefixes)
                    self.metrics.set("slots_in_use", pool.num_slots - pool.num_free - kept)
                    self.metrics.set("prefix_cache_slots", kept)
                for req in gone:
                    self._fail_expired(req, now)
                if batch.rows:
                    self._step(batch)
                with self._cv:
                    finished = self.scheduler.retire()
                    self._finishing += len(finished)
                for req in finished:
                    self._results.put((0, req.sort_key(), req))
        except BaseException as e:  # a bug in the loop itself: fail everyone, refuse new work
            with self._cv:
                self._failure = e
                stranded = self.scheduler.requests()
                for req in stranded:
                    self.scheduler.drop(req)
            for req in stranded:
                _set_exception(req.future, EngineFailure(f"the engine thread stopped: {e!r}"))
        finally:
            self._closed.set()

    def _step(self, batch: Batch) -> None:
        """New prompts, then one decode step for every running row. A failure fails only the
        requests with rows in the failing call."""
        start = time.monotonic()
        with self._cv:
            self._step_started = start
        before = {id(s): len(s.generated) for s in batch.prefill + batch.decode}
        with self.engine.exclusive():
            self._prepare(batch)
            if batch.prefill:
                try:
                    self.engine.prefill(batch.prefill)
                except Exception as e:
                    self._fail_rows(batch.prefill, e)
            running = [s for s in batch.decode + batch.prefill if s.slot >= 0 and not s.done]
            decode_start = time.monotonic()
            if running:
                try:
                    self.engine.decode(running)
                except Exception as e:
                    self._fail_rows(running, e)
            self.scheduler.cost.observe_stall(decode_start - start)
        with self._cv:
            self.last_step_at, self._step_started = time.monotonic(), None
            if self._stuck:  # the step came back: serve again (its requests were failed)
                self._stuck = False
                self.metrics.count("recovered", "stuck_step")
        self.metrics.set("prefix_cache_hits", self.engine.prefixes.hits)
        self.metrics.set("prefix_cache_misses", self.engine.prefixes.misses)
        self.metrics.observe("step_seconds", self.last_step_at - start)
        self.metrics.observe("rows_per_step", batch.rows)
        self._report_tokens(batch, before)

    def _prepare(self, batch: Batch) -> None:
        """Requests starting now: their queue wait, and their images encoded (each request's
        own encoder call, so its codes never depend on what else arrived); one that fails
        loses its rows."""
        for req in self._owners({id(s) for s in batch.prefill}):
            start = time.monotonic()
            if req.admitted_at is None:
                req.admitted_at = start
                self.metrics.observe("queue_wait_seconds", start - req.arrival, req.task)
            if req.prepare is None:
                continue
            try:
                req.prepare()  # its encoder call prices the next ones (the engine reports it)
            except Exception as e:
                self._fail_rows(req.seqs, e)
            req.prepare = None
        batch.prefill = [s for s in batch.prefill if s.slot >= 0]

    def _watch(self) -> None:
        """The watchdog: a step past step_timeout fails every waiting caller at once (their
        requests are dropped when the step returns) and refuses new ones until it does."""
        while not self._closed.wait(min(1.0, self.step_timeout / 4)):
            with self._cv:
                started = self._step_started
                if self._stuck or started is None:
                    continue
                if time.monotonic() - started > self.step_timeout:
                    self._stuck = True
                    self.metrics.count("failed", "stuck_step")
                    for req in self.scheduler.requests():
                        _set_exception(req.future, EngineFailure(self._stuck_message()))

    def _stuck_message(self) -> str:
        running = time.monotonic() - (self._step_started or time.monotonic())
        return (
            f"the engine has been running one step for {running:.0f} s (step_timeout "
            f"{self.step_timeout:g} s): the backend is stuck; see health()"
        )

    def _report_tokens(self, batch: Batch, before: dict[int, int]) -> None:
        """First-token times, token counts and streaming callbacks for the tokens this step
        produced (a new row gets two: its prefill's and its first decode's); a callback that
        raises fails its own request only."""
        now = time.monotonic()
        for req in self._owners(set(before)):
            if req.first_token_at is None:
                req.first_token_at = now
                self.metrics.observe("time_to_first_token_seconds", now - req.arrival, req.task)
            new = [
                (i, token)
                for i, s in enumerate(req.seqs)
                if id(s) in before
                for token in s.generated[before[id(s)] :]
            ]
            self.metrics.count("tokens", req.task, len(new))
            if req.on_token is None:
                continue
            try:
                for i, token in new:
                    req.on_token(i, token)
            except BaseException as e:
                with self._cv:
                    self.scheduler.drop(req)
                _set_exception(req.future, e)

    def _owners(self, rows: set[int]) -> list[Request]:
        """The requests owning any of these sequences (by id)."""
        with self._cv:
            return [r for r in self.scheduler.requests() if any(id(s) in rows for s in r.seqs)]

    def _fail_rows(self, rows: list, error: Exception) -> None:
        failing = self._owners({id(s) for s in rows})
        with self._cv:
            for req in failing:
                self.scheduler.drop(req)
        self.metrics.count("failed", type(error).__name__)
        for req in failing:
            _set_exception(
                req.future, EngineFailure(f"the backend failed while running this request: {error}")
            )

    def _fail_expired(self, req: Request, now: float, making: float = 0.0) -> None:
        """Fail `req` for its deadline: passed at `now`, or passed by the time its result, which
        takes about `making` seconds to make, would be made."""
        if req.future.cancelled():
            self.metrics.count("cancelled", "caller")
            return
        if req.future.done():  # failed by the watchdog, counted there
            return
        self.metrics.count("cancelled", "deadline")
        late = now - req.deadline
        if late >= 0:
            why = f"this {req.task} request ran {late:.2f} s past its deadline"
        else:
            why = (f"this {req.task} request's result could not be made before its deadline: "
                   f"{-late:.2f} s were left, making it takes about {making:.2f} s")  # fmt: skip
        _set_exception(req.future, DeadlineExceeded(why))

    def _finish_loop(self) -> None:
        while (item := self._results.get()) is not _LAST:
            try:
                self._finish(item[2])
            except BaseException as e:  # a bug here fails its caller, never every later one
                _set_exception(item[2].future, EngineFailure(f"making the result failed: {e!r}"))

    def _finish(self, req: Request) -> None:
        """On the finisher thread: sequences -> the caller's result, unless its deadline passed
        while it waited or making it (as long as such results take) would end past it: a late
        result only delays the results still on time. Callbacks on the future (e.g. submitting
        the scoring half of a best-of-N) run before this returns."""
        start = time.monotonic()
        try:
            if req.deadline is not None:
                with self._cv:
                    busy = self.scheduler.has_work()  # the engine runs beside it
                    making = self.scheduler.cost.finish_estimate(req, beside_engine=busy)
                if start + making > req.deadline:
                    self._fail_expired(req, start, making)
                    return
            if not req.future.set_running_or_notify_cancel():
                return
            self.scheduler.cost.finisher_started()
            try:
                result = req.finish(req.seqs)
            except BaseException as e:
                req.future.set_exception(e)
                return
            req.future.set_result(result)  # its callbacks run here, e.g. drawing the faces
            self.metrics.observe("request_seconds", time.monotonic() - req.arrival, req.task)
        finally:
            with self._cv:
                self.scheduler.cost.finisher_stopped()
                self.scheduler.finished(req)
                self._finishing -= 1
                self._cv.notify()


_LAST = (1,)  # sorts after every (0, key, request): the finisher stops there


def _set_exception(future: Future, error: BaseException) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # cancelled by its caller meanwhile
        pass


def then(future: Future, fn: Callable[[Any], Any]) -> Future:
    """A future of fn(result): fn may return a value or another future to wait for. Cancelling
    the returned future cancels whatever it is waiting for."""
    out: Future = Future()
    waiting_on = [future]

    def on_cancel(f: Future) -> None:
        if f.cancelled():
            waiting_on[0].cancel()

    def settle(f: Future) -> None:
        if f.cancelled():
            out.cancel()
            return
        if f.exception() is not None:
            _set_exception(out, f.exception())
            return
        try:
            value = fn(f.result())
        except BaseException as e:
            _set_exception(out, e)
            return
        if isinstance(value, Future):
            waiting_on[0] = value
            value.add_done_callback(lambda g: _forward(g, out))
            if out.cancelled():
                value.cancel()
        else:
            _set_result(out, value)

    out.add_done_callback(on_cancel)
    future.add_done_callback(settle)
    return out


def _forward(source: Future, out: Future) -> None:
    if source.cancelled():
        out.cancel()
    elif source.exception() is not None:
        _set_exception(out, source.exception())
    else:
        _set_result(out, source.result())


def _set_result(future: Future, value: Any) -> None:
    try:
        future.set_result(value)
    except InvalidStateError:
        pass
