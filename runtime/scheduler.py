"""Policy: which requests are admitted, which sequences start next, and which are dropped.

No threads and no execution here (the worker runs steps, the engine executes them). The rules:
- a bounded queue: past `max_queue` waiting requests a new one is refused at once with
  FacertOverloaded and an estimate of when to retry, never an unbounded backlog;
- deadlines: a request the cost model says cannot finish in time (with `headroom` of its time
  kept for the model's error) is refused at admission, and so is one whose work would push an
  admitted request past that line (admission is a promise); one that runs past its deadline
  is dropped and its slots freed;
- priorities: lower first (analysis before drawing by default), then earliest deadline, then
  arrival; `reserved_slots` slots are kept for the most urgent priority, so a kiosk's question
  never waits behind a 256-token drawing that filled the cache;
- a prefill budget: the prompts started in one step hold at most `prefill_budget` tokens (at
  least one prompt), so a burst of arrivals cannot stall the running rows for long.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from .engine import StepEvent
from .errors import DeadlineExceeded, FacertOverloaded
from .kv_cache import PrefixCache
from .request import PRIORITY_ANALYSIS, Request
from .sequence import Sequence

# Free text (captions, generate-mode answers) usually stops at [SEP] long before its room runs
# out; the cost model counts this many tokens for such a row until it has seen some finish.
EXPECTED_TEXT_TOKENS = 24


class LinearFit:
    """y ~ a + b . x by exponentially weighted least squares (every b >= 0: no feature makes
    the work cheaper), so it follows the machine's current speed; 0 before anything was
    seen."""

    def __init__(self, features: int = 1, decay: float = 0.98):
        self.decay = decay
        self._zz = np.zeros((features + 1, features + 1))  # sum of z z^T, z = (1, x)
        self._zy = np.zeros(features + 1)  # sum of z y
        self._theta: list[float] | None = None  # the fit, solved when first asked

    def observe(self, y: float, *x: float) -> None:
        z = np.array([1.0, *x])
        self._zz = self.decay * self._zz + np.outer(z, z)
        self._zy = self.decay * self._zy + z * y
        self._theta = None

    def __call__(self, *x: float) -> float:
        """Priced many times per admission (`Scheduler.predict`): the fit is solved once per
        observation, and a price is a few float operations."""
        theta = self._theta
        if theta is None:
            if self._zz[0, 0] == 0:
                return 0.0
            solved = np.linalg.lstsq(self._zz, self._zy, rcond=None)[0]  # min-norm if degenerate
            theta = self._theta = [float(solved[0]), *(max(0.0, float(b)) for b in solved[1:])]
        return max(0.0, theta[0] + sum(b * v for b, v in zip(theta[1:], x)))


# While the finisher makes a result and the engine runs (two threads of work on the same cores),
# each goes at about this share of its speed alone.
SHARED_SPEED = 0.5

# The share of a deadline's time that admission keeps in reserve for the cost model's error: a
# request is admitted only if predicted to finish that much before its deadline, and later
# arrivals may not push it past that line.
DEADLINE_HEADROOM = 0.1

# the engine thread's calls (the finisher's are "draw")
ENGINE_CALLS = ("prefill", "decode", "encode")


class BusySpans:
    """When one thread of work was busy lately (spans of the last `keep` seconds, and one still
    open), so that another thread's call can tell how long it shared the cores. Calls less than
    `gap` apart make one span: the thread's own code ran between them. Any thread may add or
    ask."""

    def __init__(self, keep: float = 300.0, gap: float = 0.01):
        self.keep, self.gap = keep, gap
        self._spans: collections.deque[tuple[float, float]] = collections.deque()
        self._open: float | None = None  # the start of the span still going on
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._append(start, end)

    def begin(self, now: float) -> None:
        with self._lock:
            self._open = now

    def end(self, now: float) -> float:
        """Close the open span; returns its seconds."""
        with self._lock:
            start, self._open = self._open, None
            if start is None:
                return 0.0
            self._append(start, now)
        return now - start

    def overlap(self, start: float, end: float) -> float:
        """Seconds of [start, end] this thread was busy."""
        with self._lock:
            spans = list(self._spans)
            if self._open is not None:
                spans.append((self._open, end))
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans)

    def _append(self, start: float, end: float) -> None:
        """Under the lock: one more span, merged with the last if it continues it."""
        if self._spans and start <= self._spans[-1][1] + self.gap:
            start = min(start, self._spans[-1][0])
            end = max(end, self._spans.pop()[1])
        self._spans.append((start, end))
        while self._spans[0][1] < end - self.keep:
            self._spans.popleft()


@dataclass
class StepCost:
    """Seconds the engine's work takes with the cores to itself, learnt online: a decode step by
    its rows, a prefill call by the prompt tokens it computes (copying a cached prefix and the
    text head cost something even when few tokens are new), the VQGAN per image encoded (before
    a request starts) and drawn (making a drawing's result); how long free text runs; the share
    of wall time (idle time included) that prompts, encoding and the finisher took in the last
    `stall_window` seconds (`stall_share`): they stall every running row, and arrivals to come
    will take as much again. A call that shared the cores with the other thread (a step while
    the finisher drew, a face drawn beside steps) took longer than it would alone: it is priced
    at its time alone, and `Scheduler.predict` plays the sharing forward."""

    stall_window: float = 10.0  # seconds: the time constant of `stall_share`
    clock: Callable[[], float] = time.monotonic
    # (image rows, text rows) -> seconds: a text row's head spans the whole wordpiece
    # vocabulary, an image row's only the codes, so the two cost differently
    decode_seconds: LinearFit = field(default_factory=lambda: LinearFit(features=2))
    prefill_seconds: LinearFit = field(default_factory=LinearFit)  # (tokens) -> seconds
    encode_per_image: float = 0.0
    draw_per_image: float = 0.0
    text_tokens: float = 0.0  # a free-text row's mean length (0: none seen yet)
    engine_busy: BusySpans = field(default_factory=BusySpans)  # the engine thread's calls
    finisher_busy: BusySpans = field(default_factory=BusySpans)  # the finisher making results
    _seen: dict[str, int] = field(default_factory=dict)  # values each running mean has seen
    _stalled: float = 0.0  # stalled seconds, each decayed by its age
    _at: float | None = None  # when _stalled was last decayed

    def observe(self, event: StepEvent) -> None:
        """The engine's hook: every prefill, decode and image call, whoever ran it (the
        scheduler's steps and results, `Engine.run`, a direct `image_tokenizer` call), prices
        the next ones."""
        if event.kind == "text":
            self._follow("text_tokens", event.tokens)
            return
        now = self.clock()
        start = now - event.seconds
        other = self.engine_busy if event.kind == "draw" else self.finisher_busy
        alone = event.seconds - (1 - SHARED_SPEED) * other.overlap(start, now)
        if event.kind in ENGINE_CALLS:
            self.engine_busy.add(start, now)
        if event.kind == "prefill":
            self.prefill_seconds.observe(alone, event.tokens)
        elif event.kind == "decode":
            self.decode_seconds.observe(alone, event.rows - event.text_rows, event.text_rows)
        elif event.kind in ("encode", "draw") and event.rows:
            name = "encode_per_image" if event.kind == "encode" else "draw_per_image"
            self._follow(name, alone / event.rows)

    def _follow(self, name: str, value: float) -> None:
        """Running mean `name` takes `value`: the plain mean of its first ten values (a graph's
        first run is slow: ONNX Runtime allocates), then each new one weighs a tenth, so it
        follows the machine's current speed."""
        n = self._seen[name] = self._seen.get(name, 0) + 1
        weight = max(1 / n, 0.1)
        setattr(self, name, (1 - weight) * getattr(self, name) + weight * value)

    def finisher_started(self) -> None:
        """The finisher thread starts making a result."""
        self.finisher_busy.begin(self.clock())

    def finisher_stopped(self) -> None:
        """It is done: the engine lost (1 - SHARED_SPEED) of that time (a stall)."""
        self.observe_stall((1 - SHARED_SPEED) * self.finisher_busy.end(self.clock()))

    def finish_estimate(self, req: Request, beside_engine: bool = False) -> float:
        """Seconds the finisher takes to make `req`'s result: the faces it draws (the rest,
        turning tokens into words or answers, is next to nothing); at SHARED_SPEED if the
        engine runs all along beside it."""
        alone = req.draws * self.draw_per_image
        return alone / SHARED_SPEED if beside_engine else alone

    def observe_stall(self, seconds: float) -> None:
        """The engine's rows waited `seconds` (prompts and encoding, or the finisher)."""
        self._decay_to(self.clock())
        self._stalled += seconds

    @property
    def stall_share(self) -> float:
        """Counted as if the engine had idled before its first step, so one early prompt does
        not read as a machine that does nothing else."""
        self._decay_to(self.clock())
        return min(1.0, self._stalled / self.stall_window)

    def _decay_to(self, now: float) -> None:
        self._stalled *= math.exp(-(now - (self._at or now)) / self.stall_window)
        self._at = now

    def forget(self) -> None:
        """Drop everything learnt: after work whose runs were cold (a graph's first run
        allocates; on a GPU, CUDA and cuDNN set up, many times a warm run's time), so the
        prices start from the warm runs that follow (FaceModel.warm_up)."""
        fresh = StepCost(self.stall_window, self.clock)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def start_seconds(self, req: Request, seqs: list[Sequence]) -> float:
        """Starting `seqs` of `req`: their prompts, and its images if it still encodes them."""
        encode = req.images * self.encode_per_image if req.prepare else 0.0
        return self.prefill_seconds(prompt_tokens(seqs)) + encode

    def expected_steps(self, seq: Sequence) -> int:
        if seq.forced is None and seq.stop_id is not None:
            expected = math.ceil(self.text_tokens or EXPECTED_TEXT_TOKENS) - len(seq.generated)
            return min(seq.tokens_left, max(1, expected))
        return seq.tokens_left


def prompt_tokens(seqs: list[Sequence]) -> int:
    """Prompt tokens the engine computes for one request's sequences: a shared prefix once, and
    each distinct prompt's own rest once (the candidate answers to one question share it)."""
    shared = [s for s in seqs if s.shared_prefix]
    prefixes = {s.prompt_ids[: s.shared_prefix].tobytes(): s.shared_prefix for s in shared}
    rests = {s.prompt_ids.tobytes(): len(s.prompt_ids) - s.shared_prefix for s in shared}
    alone = sum(len(s.prompt_ids) for s in seqs if not s.shared_prefix)
    return sum(prefixes.values()) + sum(rests.values()) + alone


class SharedCores:
    """The engine and the finisher played forward on the cores they share: the finisher makes
    one result at a time, the most urgent of those ready (`owed`: handed to it already), each
    in its time alone while the engine has nothing to do; while both work, each goes at
    SHARED_SPEED."""

    def __init__(self, cost: StepCost, owed: list[Request]):
        self.cost, self.clock = cost, 0.0
        self.ready_results = sorted(owed, key=Request.sort_key)  # rows done, result not started
        self.making: Request | None = None
        self.left = 0.0  # seconds alone that `making` still needs
        self.made: dict[Request, float] = {}

    def ready(self, req: Request) -> None:
        """`req`'s rows are done now: the finisher may make its result."""
        bisect.insort(self.ready_results, req, key=Request.sort_key)

    def engine(self, seconds: float) -> None:
        """The engine does work that takes `seconds` alone."""
        while seconds > 0 and self._finisher_works():
            shared = min(seconds, self.left)  # seconds alone each does beside the other
            self.clock += shared / SHARED_SPEED
            seconds -= shared
            self._finisher_did(shared)
        self.clock += seconds

    def drain(self) -> dict[Request, float]:
        """The engine is done: the finisher goes on alone. Returns when each result is made."""
        while self._finisher_works():
            self.clock += self.left
            self._finisher_did(self.left)
        return self.made

    def _finisher_works(self) -> bool:
        """Is the finisher making a result (starting the next one if it was idle)?"""
        while self.making is None and self.ready_results:
            req = self.ready_results.pop(0)
            self.left = self.cost.finish_estimate(req)
            if self.left > 0:
                self.making = req
            else:
                self.made[req] = self.clock
        return self.making is not None

    def _finisher_did(self, seconds: float) -> None:
        self.left -= seconds
        if self.left <= 1e-12:
            self.made[self.making] = self.clock
            self.making = None


@dataclass
class Batch:
    """One step's work: prompts to prefill (they now hold slots) and rows to decode."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.prefill) + len(self.decode)


class Scheduler:
    def __init__(
        self,
        prefixes: PrefixCache,
        max_queue: int = 256,
        prefill_budget: int = 1024,
        reserved_slots: int | None = None,
        headroom: float = DEADLINE_HEADROOM,
    ):
        """prefixes: the engine's prefix cache, whose slots the scheduler takes back when a
        sequence needs one."""
        self.prefixes, self.pool = prefixes, prefixes.pool
        self.max_queue, self.prefill_budget = max_queue, prefill_budget
        self.headroom = headroom
        self.reserved_slots = self.pool.num_slots // 4 if reserved_slots is None else reserved_slots
        self.queue: list[Request] = []  # requests with sequences not started, in admission order
        self.active: list[Request] = []  # requests with at least one sequence started
        self.finishing: list[Request] = []  # done in the engine, their results being made
        self.cost = StepCost()

    def has_work(self) -> bool:
        return bool(self.queue or self.active)

    def requests(self) -> list[Request]:
        return list(dict.fromkeys(self.active + self.queue))

    # -- admission (any thread, under the worker's lock) ------------------------------------

    def admit(self, req: Request, now: float, checks: bool = True) -> None:
        """Queue a request, or refuse it with a clear error before it costs anything
        (`checks=False`: queue it regardless, for the second half of admitted work). Refused:
        past `max_queue`; a deadline the cost model says it cannot meet; and a request whose
        work would delay an admitted request past its deadline (admission is a promise: later
        arrivals, however urgent, do not break it, nor slow one already running late)."""
        if checks and len(self.queue) >= self.max_queue:
            retry = max(0.05, self.estimate_seconds(None))
            raise FacertOverloaded(
                f"the model is busy ({len(self.queue)} requests waiting); retry in about "
                f"{retry:.1f} s",
                retry_after=retry,
            )
        admitted = self.requests()
        promised = [r for r in admitted if r.due is not None]
        if req.deadline is not None:
            req.due = req.deadline - self.headroom * max(0.0, req.deadline - now)
        if checks and (req.due is not None or promised):
            after = self.predict([*admitted, req])
            if req.due is not None and now + after[req] > req.due:
                raise DeadlineExceeded(
                    f"this {req.task} request needs about {after[req]:.2f} s at the current "
                    f"load, more than its deadline allows ({req.deadline - now:.2f} s, less "
                    f"{self.headroom:.0%} kept for the estimate's error)"
                )
            before = self.predict(admitted) if promised else {}
            # late, or later still: while an admitted request runs late, nothing may slow it
            broken = [r for r in promised
                      if now + after[r] > r.due and after[r] > before[r] + 1e-6]  # fmt: skip
            if broken:
                retry = max(0.05, min(before[r] for r in broken))
                raise FacertOverloaded(
                    f"the model is busy: this {req.task} request would delay {len(broken)} "
                    f"admitted request(s) past their deadline; retry in about {retry:.1f} s",
                    retry_after=retry,
                )
        bisect.insort(self.queue, req, key=Request.sort_key)

    def estimate_seconds(self, req: Request | None) -> float:
        """Predicted seconds until `req` would finish if admitted now (None: until everything
        admitted has finished)."""
        admitted = self.requests()
        if req is None:
            return max(self.predict(admitted).values(), default=0.0)
        return self.predict([*admitted, req])[req]

    def predict(self, reqs: list[Request]) -> dict[Request, float]:
        """Seconds from now until each request's result is made, by playing the schedule
        forward with the cost model: rows start in admission order as slots free up (each
        request's prompts and encoding stall every running row when it starts, as do those the
        step running now has taken and not yet computed), every decode step is priced at the
        rows running then, and the finisher makes each result once its rows are done, sharing
        the cores with the engine (`SharedCores`). Decode steps are stretched by the share of
        time that prompts took lately (`stall_share`): requests yet to arrive will stall them
        again."""
        cost = self.cost
        order = sorted(reqs, key=Request.sort_key)
        running = [[cost.expected_steps(s), s.writes_text, r]
                   for r in order for s in r.seqs[: r.started] if not s.done]  # fmt: skip
        waiting = [(r, s) for r in order for s in r.waiting]
        rows_left = {r: sum(1 for s in r.seqs if not s.done) for r in order}
        free = self.pool.num_slots - len(running)
        stretch = 1.0 / (1.0 - min(cost.stall_share, 0.9))
        cores = SharedCores(cost, self.finishing)
        for r in order:
            taken = [s for s in r.seqs[: r.started] if not s.generated]
            if taken:  # prompts (and images) taken by the step running now: not computed yet
                cores.engine(cost.start_seconds(r, taken))
            if not rows_left[r]:
                cores.ready(r)
        while running or waiting:
            for r, s in list(waiting):
                if free <= 0:
                    break
                reserve = 0 if r.priority <= PRIORITY_ANALYSIS else self.reserved_slots
                if free <= reserve:
                    continue
                if s is r.waiting[0]:  # the request starts: its prompts and images first
                    cores.engine(cost.start_seconds(r, r.waiting))
                running.append([cost.expected_steps(s), s.writes_text, r])
                waiting.remove((r, s))
                free -= 1
            if not running:  # only slots kept for analysis are free, and only drawings wait
                break
            steps = min(row[0] for row in running)
            text = sum(1 for row in running if row[1])
            cores.engine(steps * cost.decode_seconds(len(running) - text, text) * stretch)
            for row in running:
                row[0] -= steps
            for row in [row for row in running if row[0] <= 0]:
                running.remove(row)
                free += 1
                rows_left[row[2]] -= 1
                if not rows_left[row[2]]:
                    cores.ready(row[2])
        made = cores.drain()
        return {r: made.get(r, math.inf) for r in reqs}

    # -- the worker's side ------------------------------------------------------------------

    def expired(self, now: float) -> list[Request]:
        """Requests past their deadline, or whose future is already done (cancelled by the
        caller, failed by the watchdog): dropped, slots freed."""
        gone = [
            r
            for r in self.requests()
            if r.future.done() or (r.deadline is not None and now > r.deadline)
        ]
        for r in gone:
            self.drop(r)
        return gone

    def schedule(self) -> Batch:
        """Rows to decode (every started, unfinished sequence) and prompts to start: in
        admission order, while slots and the prefill budget last."""
        batch = Batch(decode=[s for r in self.active for s in r.seqs[: r.started] if not s.done])
        budget = self.prefill_budget
        for req in list(self.queue):
            reserve = 0 if req.priority <= PRIORITY_ANALYSIS else self.reserved_slots
            shares = bool(req.waiting and req.waiting[0].shared_prefix and self.prefixes.capacity)
            if shares and not req.started and len(req.waiting) > self._free_slots() - reserve:
                reserve += 1  # a slot for the prefix cache: the rest start later from it
            # the rest of a request already started branch from its cached prefix: keep it
            keep_cached = shares and req.started > 0
            starting: list[Sequence] = []  # this request's sequences starting in this step
            while req.waiting and self._free_slots(keep_cached) > reserve:
                seq = req.waiting[0]
                # what starting it adds: its whole prompt, or only its own question when it
                # shares a prefix (or the whole prompt) with a sequence starting beside it
                cost = prompt_tokens([*starting, seq]) - prompt_tokens(starting)
                if batch.prefill and cost > budget:
                    return batch
                seq.slot = self.prefixes.acquire()
                req.started += 1
                budget -= cost
                starting.append(seq)
                batch.prefill.append(seq)
                if req not in self.active:
                    self.active.append(req)
            if not req.waiting:
                self.queue.remove(req)
        return batch

    def _free_slots(self, keep_cached: bool = False) -> int:
        """Slots a sequence could take now: free ones and those the prefix cache keeps."""
        return self.pool.num_free + (0 if keep_cached else len(self.prefixes))

    def retire(self) -> list[Request]:
        """Free the slots of finished sequences; returns the requests now complete."""
        finished = []
        for req in list(self.active):
            for s in req.seqs[: req.started]:
                if s.done and s.slot >= 0:
                    self._release(s)
            if req.done:
                self.active.remove(req)
                finished.append(req)
        self.finishing += finished
        return finished

    def finished(self, req: Request) -> None:
        """Its result is made (or failed): the finisher no longer owes it anything."""
        if req in self.finishing:
            self.finishing.remove(req)

    def drop(self, req: Request) -> None:
        """Forget a request (cancelled, expired or failed), freeing every slot it holds."""
        for s in req.seqs:
            if s.slot >= 0:
                self._release(s)
        for queue in (self.queue, self.active):
            if req in queue:
                queue.remove(req)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.slot)
        seq.slot = -1
