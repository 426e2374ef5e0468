"""The scheduler: requests of many callers batched together give what each gives alone, and the
policy (priorities, deadlines, cancellation, overload, fault isolation) holds its promises."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

import facert
from facert.runtime.engine import StepEvent
from facert.runtime.errors import (
    DeadlineExceeded,
    EngineFailure,
    FacertOverloaded,
    InvalidArgument,
)
from facert.runtime.kv_cache import PrefixCache, SlotPool
from facert.runtime.memory import MAX_SLOTS
from facert.runtime.request import Request
from facert.runtime.scheduler import SHARED_SPEED, LinearFit, Scheduler, StepCost
from facert.runtime.sequence import GREEDY, SamplingParams, Sequence

TEXT = "a smiling woman with glasses"


def _load(tiny_model_dir, backend="onnxruntime", **options):
    """backend: BACKEND[-DECODE][:PRECISION]"""
    backend, _, precision = backend.partition(":")
    backend, _, decode = backend.partition("-")
    options.setdefault("precision", precision or "fp32")
    return facert.load(
        tiny_model_dir, backend=backend, decode=decode or "auto", progress=False, **options
    )


def _pool_free(m, timeout=5.0):
    """Slots are freed by the engine thread: wait (briefly) for it."""
    end = time.monotonic() + timeout
    while not m.engine.idle and time.monotonic() < end:
        time.sleep(0.01)
    return m.engine.idle


def _mixed_calls(face):
    """(task, args, kwargs) of every task, greedy and seeded."""
    return [
        ("generate_faces", (TEXT,), dict(n=2, seed=1, candidates=2)),
        ("generate_faces", ("an old man",), dict(n=1, seed=2, candidates=1, top_p=0.9)),
        ("caption", (face,), {}),
        ("caption", (face,), dict(greedy=False, seed=5)),
        ("attributes", (face, "gender"), dict(views=4)),
        ("attributes", (face, ["age", "mood"]), dict(mode="generate")),
    ]


def _close(got, want) -> bool:
    """Equal, but for probabilities within a relative 1e-4."""
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_close(got[k], want[k]) for k in want)
    if isinstance(want, float):
        return abs(got - want) <= 1e-4 * abs(want)
    return got == want


def _comparable(result):
    if isinstance(result, list):
        return [f.tobytes() for f in result]
    return result


@pytest.mark.parametrize(
    "backend", ["onnxruntime", "onnxruntime:int8", "onnxruntime-graph", "torch"]
)
def test_requests_batched_together_equal_each_alone(tiny_model_dir, backend):
    """int8: the fused kernel over its float16 KV cache."""
    m = _load(tiny_model_dir, backend)
    face = m.generate_faces("a face", n=1, seed=9, candidates=1)[0]
    calls = _mixed_calls(face)
    alone = [_comparable(getattr(m, task)(*a, **kw)) for task, a, kw in calls]
    futures = [m.submit(task, *a, **kw) for task, a, kw in calls * 2]
    together = [_comparable(f.result(timeout=120)) for f in futures]
    if backend == "torch":  # its rows differ in the last bits with the batch (README)
        assert all(_close(got, want) for got, want in zip(together, alone * 2))
    else:
        assert together == alone * 2
    assert _pool_free(m)
    steps = m.metrics.snapshot()["histograms"]["rows_per_step"][""]
    assert max(b for b, n in steps["buckets"].items() if n < steps["count"]) >= 4  # batched


def test_image_and_text_rows_in_one_step_equal_separate_steps(tiny_model_dir):
    """The engine's step with both vocabulary windows gives each row the bits it gets in a
    step of its own task (fused kernel: per-row arithmetic independent of the batch)."""
    m = _load(tiny_model_dir)
    t = m.templates
    codes = np.arange(m.config.vqgan.num_codes_per_image) % m.config.vqgan.n_embed

    def rows():
        drawing = t.to_image(TEXT, GREEDY, stream=0)
        caption = t.to_caption(codes, GREEDY)
        answer = t.to_attribute(codes, "gender", forced=t.candidate_ids("female"))
        return [drawing, caption, answer]

    def run(groups):
        seqs = [s for g in groups for s in g]
        with m.engine.exclusive():
            for s in seqs:
                s.slot = m.engine.pool.acquire()
            try:
                for group in groups:
                    m.engine.prefill(group)
                for _ in range(2):
                    for group in groups:
                        m.engine.decode([s for s in group if not s.done])
            finally:
                for s in seqs:
                    m.engine.pool.release(s.slot)
        return [(s.generated, s.logprobs) for s in seqs]

    mixed = rows()
    separate = rows()
    assert run([mixed]) == run([[s] for s in separate])


def test_queue_order_is_priority_then_deadline_then_arrival():
    pool = SlotPool(4, 16)
    s = Scheduler(PrefixCache(pool, 0))

    def request(priority, deadline=None):
        seq = Sequence(np.array([1, 2]), np.array([1, 1]), (0, 10), 1)
        return Request("caption", [seq], list, priority=priority, deadline=deadline)

    late, urgent, background, soon = request(0), request(0, 50.0), request(1), request(0, 10.0)
    for r in (late, urgent, background, soon):
        s.admit(r, now=0.0)
    assert s.queue == [soon, urgent, late, background]
    batch = s.schedule()  # 4 slots, one kept for priority 0: the background request waits
    assert [x.slot for x in batch.prefill] == [0, 1, 2]
    assert s.queue == [background] and pool.num_free == 1


def _call(cost: StepCost, now: list[float], kind: str, seconds: float, rows: int = 1,
          tokens: int | None = None, text_rows: int = 0) -> None:  # fmt: skip
    """One engine or finisher call of `seconds` (of `rows`, and `tokens`, default one a row),
    ending as the fake clock `now` moves on by them."""
    now[0] += seconds
    tokens = rows if tokens is None else tokens
    cost.observe(StepEvent(kind, rows, tokens, seconds, text_rows))


def test_admission_prices_a_request_from_the_steps_it_saw():
    now = [0.0]
    s = Scheduler(PrefixCache(SlotPool(4, 16), 0))
    s.cost.clock = lambda: now[0]
    _call(s.cost, now, "decode", 0.1, text_rows=1)
    _call(s.cost, now, "prefill", 0.1, tokens=2)
    now[0] += 1.0
    s.cost.finisher_started()  # a result: two faces drawn while the engine idles
    _call(s.cost, now, "draw", 0.6, rows=2, tokens=0)
    s.cost.finisher_stopped()

    def request(deadline):  # an analysis, whose result redraws the face for its reading
        seq = Sequence(np.array([1, 2]), np.array([1, 1]), (0, 10), max_new_tokens=10)
        return Request("analyze", [seq], list, deadline=deadline, draws=1)

    # 10 steps of 0.1 s, a 0.1 s prompt and 0.3 s to draw its one face: 1.4 s, once the
    # finisher's share of the cores (half its 0.6 s) has faded from the recent past
    assert s.estimate_seconds(request(None)) > 1.4
    now[0] += 1e4
    assert s.estimate_seconds(request(None)) == pytest.approx(1.4)
    s.admit(request(1.6), now=0.0)  # 1.4 s within 90 % of 1.6 s (the headroom kept)
    with pytest.raises(DeadlineExceeded, match="needs about"):
        s.admit(request(1.5), now=0.0)  # 1.4 s in time, but not within 90 % of 1.5 s


def _priced_scheduler(slots: int = 4) -> Scheduler:
    """A scheduler whose cost model has seen exact data: a decode step costs 0.1 s per image
    row, a prompt 0.05 s per token, nothing else."""
    s = Scheduler(PrefixCache(SlotPool(slots, 64), 0), reserved_slots=0)
    for rows in (1, 2, 3):
        s.cost.observe(StepEvent("decode", rows=rows, tokens=rows, seconds=0.1 * rows))
    for tokens in (2, 4):
        s.cost.observe(StepEvent("prefill", rows=1, tokens=tokens, seconds=0.05 * tokens))
    return s


def _drawing(steps: int, deadline: float | None = None, priority: int = 1, draws: int = 1
             ) -> Request:  # fmt: skip
    seq = Sequence(np.array([1, 2]), np.array([1, 1]), (10, 20), max_new_tokens=steps)
    return Request("generate", [seq], list, priority=priority, deadline=deadline, draws=draws)


def test_each_decode_step_is_priced_at_the_rows_running_then():
    s = _priced_scheduler()
    short, long = _drawing(2), _drawing(10)
    s.admit(short, now=0.0)
    s.admit(long, now=0.0)
    got = s.predict(s.requests())
    # both prompts (0.1 s each), 2 steps of two rows, then 8 steps of one row
    assert got[short] == pytest.approx(0.2 + 2 * 0.2)
    assert got[long] == pytest.approx(0.2 + 2 * 0.2 + 8 * 0.1)


def test_rows_wait_for_a_free_slot_in_admission_order():
    s = _priced_scheduler(slots=1)
    first, second = _drawing(3), _drawing(3)
    s.admit(first, now=0.0)
    s.admit(second, now=0.0)
    got = s.predict(s.requests())
    assert got[first] == pytest.approx(0.1 + 0.3)
    assert got[second] == pytest.approx(0.1 + 0.3 + 0.1 + 0.3)


def test_admission_keeps_the_promises_it_made():
    s = _priced_scheduler(slots=1)
    drawing = _drawing(10, deadline=1.25)  # needs 0.1 + 1.0 s
    s.admit(drawing, now=0.0)
    # a question goes first (priority 0): 0.1 + 0.2 s more would make the drawing late
    with pytest.raises(FacertOverloaded, match="delay 1 admitted request") as caught:
        s.admit(_drawing(2, deadline=10.0, priority=0), now=0.0)
    assert caught.value.retry_after == pytest.approx(1.1)
    assert s.queue == [drawing]
    later = _drawing(2, deadline=10.0)  # behind the drawing: it delays nobody
    s.admit(later, now=0.0)
    assert s.queue == [drawing, later]


def test_nothing_may_slow_an_admitted_request_that_runs_late():
    s = _priced_scheduler(slots=1)
    late = _drawing(10, deadline=0.5)  # admitted unchecked; it needs 1.1 s
    s.admit(late, now=0.0, checks=False)
    with pytest.raises(FacertOverloaded, match="delay 1 admitted request"):
        s.admit(_drawing(2, priority=0), now=0.0)  # a question would go first
    behind = _drawing(2, deadline=10.0)  # waits for the late one's slot: it slows nothing
    s.admit(behind, now=0.0)
    assert s.queue == [late, behind]


def test_prompts_the_running_step_took_are_priced_until_computed():
    s = _priced_scheduler()
    s.cost.encode_per_image = 0.5
    drawing = _drawing(2)
    drawing.images, drawing.prepare = 1, lambda: None  # an edit: its face is encoded first
    s.admit(drawing, now=0.0)
    expected = 0.5 + 0.1 + 2 * 0.1  # encode, the 2-token prompt, two steps of one row
    assert s.predict([drawing])[drawing] == pytest.approx(expected)
    assert s.schedule().prefill == drawing.seqs  # the step now running took it
    assert s.predict([drawing])[drawing] == pytest.approx(expected)
    drawing.prepare = None  # encoded: the prompt and the steps are left
    assert s.predict([drawing])[drawing] == pytest.approx(expected - 0.5)
    drawing.seqs[0].generated.append(5)  # prefilled (its first token): one step is left
    assert s.predict([drawing])[drawing] == pytest.approx(0.1)


def test_results_are_made_most_urgent_first_after_the_finishers_backlog():
    s = _priced_scheduler()
    s.cost.draw_per_image = 0.1
    drawing, question = _drawing(2, draws=10), _drawing(2, priority=0)
    question.task = "analyze"  # its reading redraws one face
    s.admit(drawing, now=0.0)
    s.admit(question, now=0.0)
    got = s.predict(s.requests())
    done = 0.2 + 2 * 0.2  # both prompts, then two steps of two rows
    assert got[question] == pytest.approx(done + 0.1)  # its answer before the drawing's faces
    assert got[drawing] == pytest.approx(done + 0.1 + 1.0)
    s.finishing.append(_drawing(1, draws=10))  # ten faces (1 s alone) the finisher owes
    # the question's 0.3 s of prompt and steps share the cores with them: done at 0.6 s, when
    # 0.7 s of faces are left; then its own face
    assert s.predict([question])[question] == pytest.approx(0.6 + 0.7 + 0.1)


def test_the_finisher_and_the_engine_share_the_cores():
    s = _priced_scheduler()
    s.cost.draw_per_image = 1.0
    short, long = _drawing(2), _drawing(10)
    s.admit(short, now=0.0)
    s.admit(long, now=0.0)
    got = s.predict(s.requests())
    # prompts 0.2 s, two steps of two rows 0.4 s: the short one's rows are done at 0.6 s; then
    # its face (1 s alone) and the long one's 8 steps of one row (0.8 s alone) share the cores,
    # each at half speed: the rows are done at 0.6 + 1.6 s, the face 0.2 s later, and the long
    # one's face is drawn alone after it
    assert got[short] == pytest.approx(0.6 + 1.6 + 0.2)
    assert got[long] == pytest.approx(0.6 + 1.6 + 0.2 + 1.0)
    s.finishing.append(_drawing(1))  # a face still to draw delays the steps beside it
    # the long one's prompt and 10 steps (1.1 s alone) beside the face (1 s): the face is done
    # at 2.0 s, the rows at 2.1 s
    assert s.predict([long])[long] == pytest.approx(2.1 + 1.0)


def test_a_call_that_shared_the_cores_is_priced_at_its_time_alone():
    """A face drawn while the engine ran took longer than alone, and so did a step taken while
    the finisher drew: each price is the call's time alone, so the forward play (which shares
    the cores itself) does not count the sharing twice."""
    now = [0.0]
    cost = StepCost(clock=lambda: now[0])
    cost.finisher_started()
    for _ in range(10):  # 2 s of steps, all beside the finisher
        _call(cost, now, "decode", 0.2)
    cost.finisher_stopped()
    assert cost.decode_seconds(1, 0) == pytest.approx(0.1)
    _call(cost, now, "decode", 0.1)  # alone
    assert cost.decode_seconds(1, 0) == pytest.approx(0.1)
    start = now[0]
    for _ in range(10):  # 1 s of steps...
        _call(cost, now, "decode", 0.1)
    now[0] = start
    _call(cost, now, "draw", 1.6, rows=2)  # ...beside a 1.6 s drawing of two faces: 1.1 s alone
    assert cost.draw_per_image == pytest.approx(1.1 / 2)
    now[0] += 60
    _call(cost, now, "draw", 1.2, rows=2)  # alone
    assert cost.draw_per_image == pytest.approx((1.1 + 1.2) / 4)
    started = _drawing(1, draws=3)
    assert cost.finish_estimate(started) == pytest.approx(3 * cost.draw_per_image)
    assert cost.finish_estimate(started, beside_engine=True) == pytest.approx(
        3 * cost.draw_per_image / SHARED_SPEED
    )


def test_step_prices_keep_their_slopes_through_a_spell_of_one_batch_size():
    """The decode fit's slopes survive hundreds of steps that cannot tell them apart (a lone
    drawing runs 256 steps of one row), and it follows the machine when all of it slows."""
    fit = LinearFit(features=2)
    rng = np.random.default_rng(0)

    def step(img, txt):  # seconds: the weights' read, then each row's head and attention
        return 0.0035 + 0.0006 * img + 0.0012 * txt

    for _ in range(300):
        img, txt = rng.integers(0, 9), rng.integers(0, 4)
        fit.observe(step(img, txt), img, txt)
    assert fit(8, 0) == pytest.approx(step(8, 0)) and fit(0, 1) == pytest.approx(step(0, 1))
    for _ in range(600):  # one drawing alone, then another
        fit.observe(step(1, 0), 1, 0)
    assert fit(8, 0) == pytest.approx(step(8, 0), rel=0.02)
    assert fit(3, 2) == pytest.approx(step(3, 2), rel=0.02)
    for _ in range(300):  # the machine gets 1.5x slower (a neighbour, the finisher)
        img, txt = rng.integers(0, 9), rng.integers(0, 4)
        fit.observe(1.5 * step(img, txt), img, txt)
    assert fit(8, 0) == pytest.approx(1.5 * step(8, 0), rel=0.1)
    cheaper = LinearFit()  # more rows never cost less, whatever the data says
    for rows, seconds in ((1, 0.01), (4, 0.008), (8, 0.006)):
        cheaper.observe(seconds, rows)
    assert cheaper(16) >= cheaper(1) > 0


def test_a_vqgan_price_is_the_mean_of_its_first_ten_calls_then_follows_the_machine():
    cost = StepCost()

    def encode(per_image: float) -> None:  # a call that encodes two faces
        cost.observe(StepEvent("encode", rows=2, tokens=0, seconds=2 * per_image))

    encode(2.0)  # the first run is slow: ONNX Runtime allocates
    for _ in range(9):
        encode(1.0)
    assert cost.encode_per_image == pytest.approx(1.1)
    encode(0.1)
    assert cost.encode_per_image == pytest.approx(0.9 * 1.1 + 0.1 * 0.1)
    assert cost.draw_per_image == 0  # each price learns from its own calls


def test_stall_share_is_the_recent_share_of_wall_time():
    now = [0.0]
    cost = StepCost(stall_window=20.0, clock=lambda: now[0])
    assert cost.stall_share == 0.0
    for _ in range(200):  # one second in three spent on prompts, for 200 s
        now[0] += 1.0
        cost.observe_stall(1 / 3)
    assert cost.stall_share == pytest.approx(1 / 3, abs=0.02)
    now[0] += 100.0  # idle: the share fades
    assert cost.stall_share < 0.01


def test_the_cost_model_prices_work_from_any_engine_call(tiny_model_dir):
    m = _load(tiny_model_dir)
    assert m.scheduler.cost.decode_seconds(1, 0) == 0.0  # nothing ran: it cannot refuse yet
    m.engine.run([m.templates.to_image(TEXT, SamplingParams(seed=0), 0)])  # not scheduled
    assert m.scheduler.cost.decode_seconds(1, 0) > 0 and m.scheduler.cost.prefill_seconds(9) > 0
    with pytest.raises(DeadlineExceeded, match="needs about"):
        m.generate_faces(TEXT, n=4, seed=0, candidates=4, deadline_s=0.001)
    assert _pool_free(m)
    # how long free text runs, too: a caption's length, then the mean with the next
    codes = m.image_tokenizer.encode(np.zeros((1, 32, 32, 3), np.uint8))[0]
    captions = [m.templates.to_caption(codes, SamplingParams(seed=i)) for i in range(2)]
    m.engine.run(captions[:1])
    assert m.scheduler.cost.text_tokens == len(captions[0].generated)
    m.engine.run(captions[1:])
    lengths = [len(c.generated) for c in captions]
    assert m.scheduler.cost.text_tokens == pytest.approx((lengths[0] + lengths[1]) / 2)


def test_a_warmed_up_model_prices_its_first_requests(tiny_model_dir):
    """Priced from the warm-up's second round only: its first one is cold."""
    m = _load(tiny_model_dir)
    cost = m.scheduler.cost
    events: list[StepEvent] = []
    m.engine.observers.append(events.append)
    assert m.warm_up() > 0
    m.engine.observers.remove(events.append)
    encodes, draws = ([e for e in events if e.kind == kind] for kind in ("encode", "draw"))
    assert len(encodes) == len(draws) == 2  # a caption and a drawing, twice
    assert cost.encode_per_image == encodes[1].seconds / encodes[1].rows
    assert cost.draw_per_image == draws[1].seconds / draws[1].rows
    texts = [e for e in events if e.kind == "text"]
    assert cost.text_tokens == texts[-1].tokens and len(texts) == 2
    assert cost.prefill_seconds(50) > 0 and cost.decode_seconds(0, 1) > 0
    # the first drawing's face alone takes longer than this deadline: refused at once
    with pytest.raises(DeadlineExceeded, match="needs about"):
        m.generate_faces(TEXT, n=1, seed=0, candidates=1, deadline_s=cost.draw_per_image / 2)
    assert m.metrics.snapshot()["counters"]["rejected"]["DeadlineExceeded"] == 1


def test_analysis_overtakes_a_drawing_that_filled_the_cache(tiny_model_dir):
    m = _load(tiny_model_dir, num_slots=4)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    order = []
    drawing = m.submit("generate_faces", TEXT, n=2, seed=0, candidates=4)
    drawing.add_done_callback(lambda f: order.append("drawing"))
    time.sleep(0.05)  # the drawing holds every slot but the one kept for analysis
    question = m.submit("caption", face)
    question.add_done_callback(lambda f: order.append("caption"))
    assert question.result(timeout=60) == m.caption(face)
    drawing.result(timeout=120)
    assert order == ["caption", "drawing"]


def test_an_impossible_deadline_is_refused_at_once(tiny_model_dir):
    m = _load(tiny_model_dir)
    m.generate_faces(TEXT, n=1, seed=0, candidates=2)  # the cost model learns this machine
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="needs about"):
        m.generate_faces(TEXT, n=4, seed=0, candidates=4, deadline_s=0.001)
    assert time.monotonic() - start < 0.5  # refused, not run (running it takes seconds)
    assert _pool_free(m)
    assert m.metrics.snapshot()["counters"]["rejected"]["DeadlineExceeded"] == 1


def test_a_request_past_its_deadline_is_cancelled_and_frees_its_slots(tiny_model_dir):
    m = _load(tiny_model_dir)  # a fresh model has no cost estimate yet: it admits
    with pytest.raises(DeadlineExceeded, match="past its deadline"):
        m.generate_faces(TEXT, n=4, seed=0, candidates=4, deadline_s=0.05)
    assert _pool_free(m)
    assert m.metrics.snapshot()["counters"]["cancelled"]["deadline"] == 1
    assert len(m.generate_faces(TEXT, n=1, seed=0, candidates=1)) == 1


def test_image_work_done_anywhere_prices_the_next_requests(tiny_model_dir):
    """The VQGAN's time is learnt from every encoder and decoder call, not only from requests
    the scheduler ran: a model that has only drawn through `image_tokenizer` (a FIFO loop, a
    warm-up) prices its first scheduled drawing and question with them."""
    m = _load(tiny_model_dir)
    cost = m.scheduler.cost
    assert cost.encode_per_image == 0 and cost.draw_per_image == 0
    size = m.config.vqgan.resolution
    codes = m.image_tokenizer.encode(np.zeros((2, size, size, 3), np.uint8))
    assert cost.encode_per_image > 0
    m.image_tokenizer.decode(codes)
    assert cost.draw_per_image > 0
    # a drawing's result decodes each face (best of 1), a best-of-N's scoring half each best
    # face, an analysis one face for its reading, a caption none
    drawn = []
    admit = m.scheduler.admit
    m.scheduler.admit = lambda req, *args, **kw: drawn.append(req) or admit(req, *args, **kw)
    faces = []  # faces the VQGAN decoded meanwhile
    m.engine.observers.append(lambda e: e.kind == "draw" and faces.append(e.rows))
    m.generate_faces(TEXT, n=2, seed=0, candidates=1)
    m.generate_faces(TEXT, n=1, seed=0, candidates=2)
    m.analyze(np.zeros((size, size, 3), np.uint8), list(m.config.attributes)[:1])
    m.caption(np.zeros((size, size, 3), np.uint8))
    assert [(r.task, r.draws) for r in drawn] == [
        ("generate", 2), ("generate", 0), ("score", 1), ("analyze", 1), ("caption", 0)
    ]  # fmt: skip
    assert sum(faces) == sum(r.draws for r in drawn)
    assert cost.finish_estimate(drawn[0]) == 2 * cost.draw_per_image


def test_a_result_that_would_be_made_too_late_fails_instead_of_being_made(tiny_model_dir):
    """The finisher does not start a result that, as long as such results take, would end past
    its deadline: making it would only delay the results still on time."""
    m = _load(tiny_model_dir)
    m.generate_faces(TEXT, n=1, seed=0, candidates=1)  # the cost model learns this machine
    decoded = []
    decode = m.backend.decode_images
    m.backend.decode_images = lambda codes: decoded.append(len(codes)) or decode(codes)

    def slow_finisher(k):  # after admission: drawing a face now seems to take 100 s
        m.scheduler.cost.draw_per_image = 100.0

    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="could not be made before its deadline"):
        m.generate_faces(TEXT, n=1, seed=0, candidates=1, deadline_s=60, on_step=slow_finisher)
    assert time.monotonic() - start < 30 and decoded == []  # failed at once, nothing drawn
    assert m.metrics.snapshot()["counters"]["cancelled"]["deadline"] == 1
    assert _pool_free(m)
    assert len(m.generate_faces(TEXT, n=1, seed=0, candidates=1)) == 1 and decoded == [1]


def test_a_cancelled_future_frees_its_slots_within_a_step(tiny_model_dir):
    m = _load(tiny_model_dir)
    started = threading.Event()
    future = m.submit("generate_faces", TEXT, n=4, seed=0, candidates=4,
                      on_step=lambda k: started.set())  # fmt: skip
    assert started.wait(30)
    assert future.cancel()
    assert _pool_free(m, timeout=1.0)
    assert m.metrics.snapshot()["counters"]["cancelled"]["caller"] == 1


def test_overload_is_a_prompt_error_with_a_retry_estimate(tiny_model_dir):
    m = _load(tiny_model_dir, num_slots=1, max_queue=1)
    first = m.submit("generate_faces", TEXT, n=1, seed=0, candidates=1)
    second = None
    with pytest.raises(FacertOverloaded) as caught:
        second = m.submit("generate_faces", TEXT, n=1, seed=1, candidates=1)
        m.submit("generate_faces", TEXT, n=1, seed=2, candidates=1)
    assert caught.value.retry_after > 0
    assert len(first.result(timeout=60)) == 1
    if second is not None:
        assert len(second.result(timeout=60)) == 1
    assert _pool_free(m)


def test_a_failing_step_fails_only_its_requests(tiny_model_dir):
    m = _load(tiny_model_dir)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    expected_drawing = [f.tobytes() for f in m.generate_faces(TEXT, n=1, seed=0, candidates=1)]
    expected_caption = m.caption(face)
    drawing_started = threading.Event()
    drawing = m.submit("generate_faces", TEXT, n=1, seed=0, candidates=1,
                       on_step=lambda k: drawing_started.set())  # fmt: skip
    assert drawing_started.wait(30)

    def fail_next_prefill(event):
        if event.kind == "prefill":
            m.engine.observers.remove(fail_next_prefill)
            raise RuntimeError("injected fault")

    m.engine.observers.append(fail_next_prefill)
    with pytest.raises(EngineFailure, match="injected fault"):
        m.caption(face)
    assert [f.tobytes() for f in drawing.result(timeout=60)] == expected_drawing
    assert m.caption(face) == expected_caption
    assert _pool_free(m)
    assert m.health()["alive"]


def test_asyncio_callers(tiny_model_dir):
    m = _load(tiny_model_dir)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    expected = (m.caption(face), m.attributes(face, "gender", views=2))

    async def main():
        caption, answers, faces = await asyncio.gather(
            m.acaption(face),
            m.aattributes(face, "gender", views=2),
            m.agenerate_faces(TEXT, n=1, seed=0, candidates=2),
        )
        assert (caption, answers) == expected and faces[0].shape == (256, 256, 3)
        slow = asyncio.ensure_future(m.agenerate_faces(TEXT, n=4, seed=0, candidates=4))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow

    asyncio.run(main())
    assert _pool_free(m)


def test_close_finishes_admitted_work_then_refuses(tiny_model_dir):
    with _load(tiny_model_dir) as m:
        future = m.submit("generate_faces", TEXT, n=1, seed=0, candidates=2)
    assert len(future.result(timeout=0)) == 1  # close() waited for it
    with pytest.raises(EngineFailure, match="closed"):
        m.caption(np.zeros((8, 8, 3), np.uint8))
    assert not m.health()["alive"] or not m.health()["busy"]


def test_metrics_describe_what_ran(tiny_model_dir):
    m = _load(tiny_model_dir)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    m.caption(face)
    snap = m.metrics.snapshot()
    assert snap["counters"]["requests"] == {"generate": 1, "caption": 1}
    assert snap["counters"]["tokens"]["generate"] == 256
    for name in ("queue_wait_seconds", "time_to_first_token_seconds", "request_seconds"):
        assert snap["histograms"][name]["caption"]["count"] == 1
    assert snap["gauges"]["slots_in_use"] >= 0


def test_submit_refuses_an_unknown_task(tiny_model_dir):
    m = _load(tiny_model_dir)
    with pytest.raises(InvalidArgument, match="task must be one of"):
        m.submit("draw", TEXT)
    assert isinstance(m.submit("caption", np.zeros((8, 8, 3), np.uint8)), Future)


def test_a_caption_streams_as_it_is_written(tiny_model_dir):
    m = _load(tiny_model_dir)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    drawing = m.submit("generate_faces", TEXT, n=1, seed=0, candidates=2)  # alongside
    texts = list(m.stream_caption(face, greedy=False, seed=4))
    assert texts[-1] == m.caption(face, greedy=False, seed=4)
    assert len(texts) > 1 and len(set(texts)) == len(texts)
    words = [t.split() for t in texts]
    assert all(a == b[: len(a)] or a[:-1] == b[: len(a) - 1] for a, b in zip(words, words[1:]))
    unfinished = m.stream_caption(face)
    next(unfinished)
    unfinished.close()  # stops early: the request is cancelled
    assert len(drawing.result(timeout=60)) == 1
    assert _pool_free(m)


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-graph", "torch"])
def test_questions_about_one_face_share_its_prefill(tiny_model_dir, backend):
    """Every question and candidate answer about a face branch from one prefill of
    `[CLS] to attributes [SEP] codes [SEP]`: the scores equal independent prefills, and the
    same face asked again computes no prefix at all (the prefix cache); each question's own
    tokens are computed once for all its candidate answers."""
    m = _load(tiny_model_dir, backend)
    t = m.templates
    codes = m.image_tokenizer.encode([np.full((32, 32, 3), 90, np.uint8)])[0]
    answers = [t.candidate_ids(v) for v in ("male", "female")]

    def rows(shared):
        seqs = [
            t.to_attribute(codes, name, forced=a) for name in ("gender", "age") for a in answers
        ]
        for s in seqs:
            s.shared_prefix = s.shared_prefix if shared else 0
        return seqs

    independent, shared = rows(False), rows(True)
    m.engine.run(independent)
    events = []
    m.engine.observers.append(events.append)
    m.engine.run(shared)
    again = rows(True)
    m.engine.run(again)
    m.engine.observers.remove(events.append)
    for a, b, c in zip(independent, shared, again):
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        assert c.logprobs == b.logprobs
    prefix = shared[0].shared_prefix
    asked = {s.prompt_ids.tobytes(): len(s.prompt_ids) for s in shared}  # each question once
    questions = sum(n - prefix for n in asked.values())
    assert len(asked) == 2 and questions < sum(len(s.prompt_ids) - prefix for s in shared)
    prefills = [e.tokens for e in events if e.kind == "prefill"]
    assert prefills == [prefix + questions, questions]  # once, then not at all
    assert m.engine.prefixes.hits >= 1 and m.engine.idle


def test_a_forked_child_is_told_the_engine_is_not_running(tiny_model_dir):
    """A fork keeps only the calling thread: the child's copy of the model must say so at
    once, not wait forever for an engine thread that does not exist there."""
    import multiprocessing

    m = _load(tiny_model_dir)
    face = np.zeros((8, 8, 3), np.uint8)
    m.caption(face)

    def child(queue):
        try:
            m.caption(face)
            queue.put("answered")
        except EngineFailure as e:
            queue.put(str(e))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(queue,))
    p.start()
    assert "engine thread is not running" in queue.get(timeout=30)
    p.join(30)
    assert isinstance(m.caption(face), str)  # the parent's model goes on


def test_a_refused_request_never_runs_the_image_encoder(tiny_model_dir):
    """Admission comes before the VQGAN encoder: the image of a request refused for overload
    or for its deadline is never encoded (the encoder runs on the engine thread, just before
    the request's first prefill)."""
    m = _load(tiny_model_dir, num_slots=1, max_queue=1)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    encoded = []
    encode = m.backend.encode_images
    m.backend.encode_images = lambda images: encoded.append(len(images)) or encode(images)
    started = threading.Event()
    drawing = m.submit("generate_faces", TEXT, n=1, seed=0, candidates=1,
                       on_step=lambda k: started.set())  # fmt: skip
    assert started.wait(30)
    queued = m.submit("caption", face)  # waits behind the drawing for the one slot
    with pytest.raises(FacertOverloaded):
        m.submit("attributes", face, "gender", views=4)
    drawing.result(timeout=60)
    caption = queued.result(timeout=60)
    with pytest.raises(DeadlineExceeded):
        m.submit("caption", face, deadline_s=0.0)
    assert caption == m.caption(face)
    assert encoded == [1, 1]  # the two captions that ran, one image each


def test_a_stuck_step_fails_every_waiting_caller_then_the_model_recovers(tiny_model_dir):
    m = _load(tiny_model_dir, step_timeout=0.3)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    expected = m.caption(face)
    release = threading.Event()

    def hang_once(event):
        m.engine.observers.remove(hang_once)
        release.wait(30)

    m.engine.observers.append(hang_once)
    stuck = m.submit("caption", face)
    with pytest.raises(EngineFailure, match="stuck"):
        stuck.result(timeout=10)
    assert m.health()["stuck"]
    with pytest.raises(EngineFailure, match="stuck"):
        m.caption(face)
    release.set()
    end = time.monotonic() + 10
    while m.health()["stuck"] and time.monotonic() < end:
        time.sleep(0.01)
    assert m.caption(face) == expected
    assert _pool_free(m)
    assert m.metrics.snapshot()["counters"]["failed"]["stuck_step"] == 1


def test_a_memory_budget_sizes_the_cache_and_refuses_below_the_minimum(tiny_model_dir):
    plain = _load(tiny_model_dir)
    p = plain.memory
    assert p.slots == 16 and p.weights == plain.backend.weight_bytes > 0
    assert plain.backend.k_cache.nbytes + plain.backend.v_cache.nbytes == p.cache
    budget = p.weights + p.activations + 5 * p.kv_per_slot + p.kv_per_slot // 2
    m = _load(tiny_model_dir, memory_budget=budget)
    assert m.memory.slots == m.engine.pool.num_slots == 5 and m.memory.total <= budget
    assert _load(tiny_model_dir, memory_budget=budget, num_slots=3).memory.slots == 3
    assert m.caption(m.generate_faces(TEXT, n=1, seed=0, candidates=1)[0])
    minimum = p.weights + p.activations + p.kv_per_slot
    with pytest.raises(InvalidArgument, match=f"minimum of {minimum / 2**20:.1f} MiB"):
        _load(tiny_model_dir, memory_budget=minimum - 1)
    for bad in ("lots", "-1GiB", "2 parsecs", 0, 1.5, "1.2.3MiB"):
        with pytest.raises(InvalidArgument, match="memory_budget"):
            _load(tiny_model_dir, memory_budget=bad)
    assert _load(tiny_model_dir, memory_budget="1GiB").memory.slots == MAX_SLOTS
    # int8 keeps keys and values in float16: a slot costs half, so the same cache budget holds
    # twice the slots
    half = _load(tiny_model_dir, precision="int8", num_slots=4)
    assert half.backend.k_cache.dtype == np.float16 and half.memory.kv_per_slot * 2 == p.kv_per_slot
    assert half.backend.k_cache.nbytes + half.backend.v_cache.nbytes == half.memory.cache


def test_a_bug_while_making_a_result_does_not_stop_later_results(tiny_model_dir):
    m = _load(tiny_model_dir)
    face = m.generate_faces("a face", n=1, seed=3, candidates=1)[0]
    expected = m.caption(face)
    real = m.metrics.observe

    def broken(name, *args, **kwargs):
        if name == "request_seconds":  # after the result is made, on the finisher thread
            m.metrics.observe = real
            raise RuntimeError("injected fault")
        return real(name, *args, **kwargs)

    m.metrics.observe = broken
    assert m.submit("caption", face).result(timeout=30) == expected
    assert m.submit("caption", face).result(timeout=30) == expected  # the finisher lives on
    assert m.metrics.observe is real
