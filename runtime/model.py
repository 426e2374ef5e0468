"""The public model object: `facert.load(...)` returns a FaceModel.

Every task call becomes a request for the model's scheduler: one engine thread batches the
rows of every caller's requests in each step, so a FaceModel is safe and efficient to share
between threads and asyncio tasks. Each task has three forms with the same arguments: blocking
(`caption(...)`), a Future (`submit("caption", ...)`) and an awaitable (`await acaption(...)`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import secrets
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from .backends import create_backend
from .config import VOCAB_FILE, ModelConfig, check_views, load_config
from .engine import Engine
from .errors import InvalidArgument, LimitExceeded
from .images import ImageLike, face_views, model_input, to_uint8
from .kv_cache import kv_bytes_per_slot
from .limits import Limits, check_float, check_int, check_limit, check_text
from .memory import activation_bytes, parse_bytes
from .memory import plan as plan_memory
from .metrics import Metrics
from .request import PRIORITY_ANALYSIS, PRIORITY_GENERATION, Request
from .sampler import log_softmax
from .scheduler import Scheduler
from .sequence import GREEDY, TOP_K, SamplingParams, Sequence
from .tasks import Templates
from .tokenizer import WordPieceTokenizer
from .worker import Worker, then

DEFAULT_SLOTS = 16
TASKS = ("generate_faces", "edit_face", "caption", "attributes", "analyze")


def _task(submit: Callable[..., Future]) -> Callable[..., Any]:
    """A task method. Its body checks the arguments, builds the request and returns a Future of
    the result (the form `FaceModel.submit` and the awaitables use); calling the method blocks
    for that result, and an interrupt (Ctrl-C) while waiting cancels the request."""

    @functools.wraps(submit)
    def blocking(self: FaceModel, *args: Any, **kwargs: Any) -> Any:
        future = submit(self, *args, **kwargs)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    blocking.submit = submit
    return blocking


class ImageTokenizer:
    """Faces <-> VQGAN codes, through the engine (which reports the time they take)."""

    def __init__(self, engine: Engine, config: ModelConfig, limits: Limits):
        self.engine, self.config, self.limits = engine, config, limits

    def model_input(self, images: Any) -> np.ndarray:
        """Images in any accepted form -> float32 [N, 3, H, W] encoder input, within limits."""
        return model_input(
            images, self.config.vqgan.resolution, self.config.image_scaling,
            max_pixels=self.limits.max_image_pixels, max_images=self.limits.max_images,
        )  # fmt: skip

    def encode(self, images: Any) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB (or paths / PIL images), or float32 [N, 3, H, W] already
        scaled -> int64 [N, T] codes."""
        return self.engine.encode_images(self.model_input(images))

    def decode(self, codes: Any) -> np.ndarray:
        """int [N, T] codes -> float32 [N, 3, H, W] images in [-1, 1]."""
        codes = _int_array(codes, "codes")
        n_codes, n_embed = self.config.vqgan.num_codes_per_image, self.config.vqgan.n_embed
        if codes.ndim != 2 or codes.shape[1] != n_codes or not len(codes):
            raise InvalidArgument(f"codes must be integers [N, {n_codes}], got {list(codes.shape)}")
        check_limit(len(codes), "the number of code rows", self.limits.max_images, "max_images")
        if codes.min() < 0 or codes.max() >= n_embed:
            raise InvalidArgument(f"codes must lie in [0, {n_embed})")
        return self.engine.decode_images(codes)


class FaceModel:
    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        engine_dir: str | Path | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        decode: str = "auto",
        num_slots: int | None = None,
        progress: bool = True,
        limits: Limits | None = None,
        max_queue: int = 256,
        prefill_budget: int = 1024,
        memory_budget: str | int | None = None,
        step_timeout: float | None = 60.0,
    ):
        if not isinstance(model_dir, (str, os.PathLike)):
            raise InvalidArgument(f"model_dir must be a path, got {type(model_dir).__name__}")
        for name, value in (("backend", backend), ("precision", precision), ("decode", decode)):
            if not isinstance(value, str):
                raise InvalidArgument(f"{name} must be a str, got {type(value).__name__}")
        if threads is not None:
            check_int(threads, "threads", lo=1)
        if providers is not None and (
            isinstance(providers, str) or not all(isinstance(p, str) for p in providers)
        ):
            raise InvalidArgument("providers must be a list of execution provider names")
        if limits is not None and not isinstance(limits, Limits):
            raise InvalidArgument(f"limits must be a facert Limits, got {type(limits).__name__}")
        self.limits = limits or Limits()
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        max_len = min(self.config.lm.seq_length, self.config.lm.max_positions)
        if num_slots is not None:
            check_int(num_slots, "num_slots", lo=1)
        budget = None if memory_budget is None else parse_bytes(memory_budget)
        prefill_budget = check_int(prefill_budget, "prefill_budget", lo=1)
        if step_timeout is not None:
            step_timeout = check_float(step_timeout, "step_timeout", 0.0)
        self.tokenizer = WordPieceTokenizer(self.model_dir / VOCAB_FILE)
        self.backend = create_backend(
            backend, self.model_dir, self.config, precision=precision,
            engine_dir=Path(engine_dir) if engine_dir else None, providers=providers,
            threads=threads, decode=decode, progress=progress,
        )  # fmt: skip
        self.templates = Templates(self.config, self.tokenizer)
        kv = kv_bytes_per_slot(self.config.lm, max_len, self.backend.cache_dtype.itemsize)
        # What the model holds: weights, one step's temporaries and the KV pool, which is
        # allocated once here and never grows.
        self.memory = plan_memory(
            self.backend.weight_bytes, activation_bytes(self.config, prefill_budget, max_len), kv,
            budget, num_slots if num_slots is not None or budget else DEFAULT_SLOTS,
        )  # fmt: skip
        _check_cache_fits(self.memory.slots, self.config, max_len)
        self.engine = Engine(self.backend, self.memory.slots, max_len)
        self.image_tokenizer = ImageTokenizer(self.engine, self.config, self.limits)
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            self.engine.prefixes,
            max_queue=check_int(max_queue, "max_queue", lo=1),
            prefill_budget=prefill_budget,
        )
        self._worker = Worker(self.engine, self.scheduler, self.metrics, step_timeout)
        weakref.finalize(self, self._worker.close)  # a dropped model stops its threads

    def __repr__(self) -> str:
        return f"FaceModel({str(self.model_dir)!r}, backend={self.backend.name!r})"

    def close(self) -> None:
        """Stop admitting requests, finish those admitted, stop the engine thread."""
        self._worker.close()

    def __enter__(self) -> FaceModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm_up(self) -> float:
        """Run each kind of work twice: a caption of a grey face (the VQGAN encoder, a prompt
        and its words) and a face drawn from codes (the decoder, whose time does not depend on
        them). The first round is cold (a graph's first run allocates; on a GPU, CUDA and cuDNN
        set up), so the scheduler's cost model forgets it and learns this machine's speed from
        the second: the first callers get warm latencies and deadlines priced from the start (a
        model that has run nothing admits every deadline, one priced from cold runs refuses
        what it could serve). Returns the seconds taken; `facert serve` calls it before it
        listens."""
        start = time.monotonic()
        size = self.config.vqgan.resolution
        grey = np.full((size, size, 3), 128, np.uint8)
        for cold in (True, False):
            self.caption(grey)
            self.image_tokenizer.decode(self._blank_codes()[None])  # (1, T)
            if cold:
                self.scheduler.cost.forget()
        return time.monotonic() - start

    def health(self) -> dict[str, Any]:
        """The engine thread: alive, busy, requests waiting, seconds since its last step."""
        return self._worker.health()

    def submit(self, task: str, *args: Any, **kwargs: Any) -> Future:
        """Start `task` ("generate_faces", "edit_face", "caption", "attributes" or "analyze", with
        its arguments) and return a concurrent.futures.Future of its result at once. Bad arguments
        and an unreadable image raise here; a full queue raises FacertOverloaded and a deadline
        the model cannot meet DeadlineExceeded. Cancelling the future frees the request's
        cache slots within one step."""
        if task not in TASKS:
            raise InvalidArgument(f"task must be one of {', '.join(TASKS)}, not {task!r}")
        return getattr(FaceModel, task).submit(self, *args, **kwargs)

    async def agenerate_faces(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        """Awaitable generate_faces (same arguments); cancelling the task cancels the request."""
        return await _awaited(functools.partial(self.submit, "generate_faces", *args, **kwargs))

    async def aedit_face(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        """Awaitable edit_face (same arguments)."""
        return await _awaited(functools.partial(self.submit, "edit_face", *args, **kwargs))

    async def acaption(self, *args: Any, **kwargs: Any) -> str:
        """Awaitable caption (same arguments)."""
        return await _awaited(functools.partial(self.submit, "caption", *args, **kwargs))

    async def aattributes(self, *args: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Awaitable attributes (same arguments)."""
        return await _awaited(functools.partial(self.submit, "attributes", *args, **kwargs))

    async def aanalyze(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Awaitable analyze (same arguments)."""
        return await _awaited(functools.partial(self.submit, "analyze", *args, **kwargs))

    def _request(
        self,
        task: str,
        seqs: list[Sequence],
        finish: Callable[[list[Sequence]], Any],
        priority: int,
        deadline: float | None,
        on_token: Callable[[int, int], None] | None = None,
        continuation: bool = False,
        images: np.ndarray | None = None,
        views: list[int] | None = None,
        draws: int = 0,
    ) -> Future:
        """Submit sequences as one request. `images` (V, 3, H, W), if given, are encoded on
        the engine thread just before the request starts, view `views[i]`'s codes (default:
        view 0's) written into `seqs[i]` (so admission, and a refusal, never wait for the VQGAN
        encoder). `draws`: the faces making its result decodes (what the finisher will take)."""
        req = Request(task, seqs, finish, priority=priority, deadline=deadline, on_token=on_token,
                      draws=draws)  # fmt: skip
        if images is not None:
            views = [0] * len(seqs) if views is None else views
            req.prepare, req.images = self._encoder(images, seqs, views), len(images)
        return self._worker.submit(req, continuation=continuation)

    def _encoder(
        self, images: np.ndarray, seqs: list[Sequence], views: list[int]
    ) -> Callable[[], None]:
        def prepare() -> None:
            codes = self.engine.encode_images(images)  # (V, T)
            for seq, v in zip(seqs, views):
                self.templates.place_codes(seq, codes[v])

        return prepare

    def _blank_codes(self, n: int | None = None, view: int = 0) -> np.ndarray:
        """Stand-in codes for a prompt built before its image is encoded: one value per view,
        so that until then the scheduler still sees each view's prefix as a prefix of its own."""
        return np.full(self.config.vqgan.num_codes_per_image if n is None else n, view, np.int64)

    def forward_logits(self, ids: Iterable[int], segs: Iterable[int]) -> np.ndarray:
        """Full prefix-LM forward, no cache: float32 [L, V]."""
        ids, segs = _int_array(ids, "ids"), _int_array(segs, "segs")
        lm = self.config.lm
        if ids.ndim != 1 or ids.shape != segs.shape or not 0 < len(ids) <= lm.max_positions:
            raise InvalidArgument(
                f"ids and segs must be equal-length 1-D, 1..{lm.max_positions} long"
            )
        if ids.min() < 0 or ids.max() >= lm.vocab_size or segs.min() < 0 or segs.max() > 2:
            raise InvalidArgument(f"ids must lie in [0, {lm.vocab_size}) and segs in {{0, 1, 2}}")
        return self.backend.forward_logits(ids, segs)

    @_task
    def generate_faces(
        self,
        text: str,
        n: int = 1,
        seed: int | None = None,
        top_k: int = TOP_K,
        top_p: float = 0.0,
        temperature: float = 1.0,
        candidates: int | None = None,
        on_step: Callable[[int], None] | None = None,
        priority: int | None = None,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Draw n faces for a description -> n uint8 [H, W, 3]. Face i of a given seed is the
        same whatever n is, and whatever else the model is doing.

        With `candidates` > 1 (default: the model's `image_candidates`) each face is the best
        of that many drawings: the one under which the model's own caption template finds
        the text most likely, log p(text | face). The model reads faces more reliably than it
        draws them, so this follows the text more often than one sample, for `candidates`
        times the drawing work plus a teacher-forced caption pass per drawing. `on_step(k)`
        reports k tokens drawn or scored, generation_steps() in all (from the engine thread).
        `priority`: lower runs first (default: after analysis requests); `deadline_s`: seconds
        from now by which the faces are due (refused at once if impossible, cancelled if
        overrun)."""
        return self._draw(
            text, n, seed, top_k, top_p, temperature, candidates, on_step, priority, deadline_s
        )

    @_task
    def edit_face(
        self,
        image: ImageLike,
        text: str,
        keep_rows: int,
        n: int = 1,
        seed: int | None = None,
        top_k: int = TOP_K,
        top_p: float = 0.0,
        temperature: float = 1.0,
        candidates: int | None = None,
        on_step: Callable[[int], None] | None = None,
        priority: int | None = None,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Redraw a face from a new text, keeping its first `keep_rows` rows of codes (GPTFace's
        editing: keep the upper face, draw a new expression below it) -> n uint8 [H, W, 3].
        The kept codes follow the drawing prompt as if the model had drawn them; the other
        arguments are generate_faces's, best of `candidates` included."""
        side = self.config.vqgan.latent_size
        keep_rows = check_int(keep_rows, "keep_rows", 0, side - 1)
        x = self.image_tokenizer.model_input([image])  # (1, 3, H, W)
        return self._draw(
            text, n, seed, top_k, top_p, temperature, candidates, on_step, priority, deadline_s,
            (x, keep_rows * side),
        )  # fmt: skip

    def _draw(
        self,
        text: str,
        n: int,
        seed: int | None,
        top_k: int,
        top_p: float,
        temperature: float,
        candidates: int | None,
        on_step: Callable[[int], None] | None,
        priority: int | None,
        deadline_s: float | None,
        kept: tuple[np.ndarray, int] | None = None,
    ) -> Future:
        """n faces, each the best of `candidates` drawings (candidate k of face i samples with
        Philox stream i * candidates + k, so face i of a seed is the same whatever n is).
        `kept`: an edit's face (1, 3, H, W) and how many of its first codes every drawing keeps."""
        text = check_text(text, "text", self.limits.max_text_chars)
        n = check_limit(n, "n", self.limits.max_faces, "max_faces")
        candidates = self._candidates(candidates)
        params = _params(seed, top_k, top_p, temperature)
        if on_step is not None and not callable(on_step):
            raise InvalidArgument("on_step must be a callable or None")
        priority, deadline = _policy(priority, deadline_s, PRIORITY_GENERATION)
        face, keep = (None, 0) if kept is None else kept
        blank = None if kept is None else self._blank_codes(keep)
        drawings = [
            self.templates.to_image(text, params, stream=i * candidates + k, kept=blank)
            for i in range(n)
            for k in range(candidates)
        ]
        # on_step counts tokens: one per row a step runs
        on_token = None if on_step is None else (lambda _index, _token: on_step(1))
        drawn = self._request("generate", drawings, list, priority, deadline, on_token,
                              images=face, draws=n if candidates == 1 else 0)  # fmt: skip
        if candidates == 1:
            return then(drawn, self._faces)
        t = self.templates

        def score(drawings: list[Sequence]) -> Future:
            scores = [t.to_description_score(t.codes_of(d), t.described_words(d)) for d in drawings]

            def best(scores: list[Sequence]) -> list[Sequence]:
                matches = np.array([sum(s.logprobs) for s in scores]).reshape(n, candidates)
                return [drawings[i * candidates + k] for i, k in enumerate(matches.argmax(1))]

            return self._request(
                "score", scores, best, priority, deadline, on_token, continuation=True, draws=n
            )

        return then(then(drawn, score), self._faces)

    def _faces(self, drawings: list[Sequence]) -> list[np.ndarray]:
        """Drawn codes -> uint8 faces, one image per VQGAN call: batched convolutions round
        differently, and face i of a seed must be bit-identical however many were asked for."""
        return [
            to_uint8(self.image_tokenizer.decode(self.templates.codes_of(s)[None]))[0]
            for s in drawings
        ]

    def generation_steps(
        self, text: str, n: int = 1, candidates: int | None = None, keep_rows: int = 0
    ) -> int:
        """Tokens generate_faces(text, n, candidates=...) (or edit_face with keep_rows) reports
        to on_step: a progress total."""
        text = check_text(text, "text", self.limits.max_text_chars)
        n = check_limit(n, "n", self.limits.max_faces, "max_faces")
        candidates = self._candidates(candidates)
        side = self.config.vqgan.latent_size
        n_codes = side * side
        drawn = n_codes - side * check_int(keep_rows, "keep_rows", 0, side - 1)
        if candidates == 1:
            return n * drawn
        t = self.templates
        words = t.described_words(t.to_image(text, GREEDY, 0))
        scored = len(t.to_description_score(np.zeros(n_codes, np.int64), words).forced)
        return n * candidates * (drawn + scored)

    def _candidates(self, candidates: int | None) -> int:
        if candidates is None:
            return self.config.image_candidates
        return check_limit(candidates, "candidates", self.limits.max_candidates, "max_candidates")

    @_task
    def caption(
        self,
        image: ImageLike,
        seed: int | None = None,
        greedy: bool = True,
        top_k: int = TOP_K,
        top_p: float = 0.0,
        temperature: float = 1.0,
        priority: int | None = None,
        deadline_s: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """Describe a face in words. `on_text(caption so far)` is called after every token
        (from the engine thread), to show the caption as it is written; see stream_caption."""
        if not isinstance(greedy, bool):
            raise InvalidArgument(f"greedy must be True or False, got {greedy!r}")
        if on_text is not None and not callable(on_text):
            raise InvalidArgument("on_text must be a callable or None")
        params = GREEDY if greedy else _params(seed, top_k, top_p, temperature)
        priority, deadline = _policy(priority, deadline_s, PRIORITY_ANALYSIS)
        x = self.image_tokenizer.model_input([image])  # (1, 3, H, W)
        seq = self.templates.to_caption(self._blank_codes(), params)
        text_of = self.templates.text_of
        on_token = None if on_text is None else (lambda _index, _token: on_text(text_of(seq)))
        return self._request("caption", [seq], lambda seqs: text_of(seqs[0]), priority, deadline,
                             on_token, images=x)  # fmt: skip

    def stream_caption(self, image: ImageLike, **options: Any) -> Iterator[str]:
        """Caption a face, yielding the caption so far each time a token changes it (the last
        item is caption(image, **options)). Closing the generator early cancels the request."""
        texts: queue.SimpleQueue = queue.SimpleQueue()
        future = self.submit("caption", image, on_text=texts.put, **options)
        future.add_done_callback(lambda _: texts.put(None))
        shown = None
        try:
            while (text := texts.get()) is not None:
                if text != shown:  # a token may add no text (the closing [SEP], say)
                    yield text
                    shown = text
            future.result()  # the request's error, if it failed
        finally:
            future.cancel()

    @_task
    def attributes(
        self,
        image: ImageLike,
        names: str | Iterable[str],
        mode: str = "score",
        views: int | None = None,
        priority: int | None = None,
        deadline_s: float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Answer attribute questions about a face -> {name: {"value", "prob"}}.

        score: rank the model's candidate values (from facert.json) by the probability of each
        answer, normalised over the candidates; "candidates" holds every value's probability.
        With `views` > 1 (default: the model's reading_views) score mode reads the face that
        many ways (itself, mirrored, shifted a quarter code cell right and left) and multiplies
        each answer's probabilities over the views before normalising.
        generate: greedy free text; "prob" is the probability of the generated answer.
        Every question about the face is one request, its rows decoded together.
        """
        return self._read(image, names, mode, views, priority, deadline_s)

    @_task
    def analyze(
        self,
        image: ImageLike,
        names: str | Iterable[str],
        mode: str = "score",
        views: int | None = None,
        priority: int | None = None,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """attributes(image, names, ...) and reading_quality(image) of one face from a single
        VQGAN encode -> {"attributes": attributes' result, "reading": reading_quality's}. The
        reading redraws the codes the answers were read from (the face's own view), on the
        thread that makes results, never the engine's."""
        return self._read(image, names, mode, views, priority, deadline_s, with_reading=True)

    def _read(
        self,
        image: ImageLike,
        names: str | Iterable[str],
        mode: str,
        views: int | None,
        priority: int | None,
        deadline_s: float | None,
        with_reading: bool = False,
    ) -> Future:
        """The request behind attributes and analyze: every question about the face, its views
        encoded in one call; `with_reading` adds the reading of view 0's codes (the first rows
        of either mode hold view 0)."""
        names = self._names(names)
        if mode not in ("score", "generate"):
            raise InvalidArgument(f"mode must be 'score' or 'generate', not {mode!r}")
        known = self.config.attributes
        if mode == "score" and (unknown := [n for n in names if n not in known]):
            raise InvalidArgument(
                f"unknown attribute(s) {', '.join(unknown)}; this model knows "
                f"{', '.join(known) or 'none'} (mode='generate' asks any question)"
            )
        n_views = self._views(views) if mode == "score" else 1
        priority, deadline = _policy(priority, deadline_s, PRIORITY_ANALYSIS)
        vqgan = self.config.vqgan
        x = self.image_tokenizer.model_input([image])  # (1, 3, H, W)
        shift = max(1, vqgan.resolution // vqgan.latent_size // 4)  # a quarter code cell
        x = face_views(x, n_views, shift)  # (V, 3, H, W)
        t = self.templates
        if mode == "generate":
            seqs = [t.to_attribute(self._blank_codes(), n) for n in names]

            def answers(seqs: list[Sequence]) -> dict[str, dict[str, Any]]:
                return {
                    n: {"value": t.text_of(s), "prob": float(np.exp(sum(s.logprobs)))}
                    for n, s in zip(names, seqs)
                }

            row_views = None  # every row reads view 0
        else:
            seqs, row_views, answers = self._scored(names, n_views)
        if not with_reading:
            return self._request("attributes", seqs, answers, priority, deadline, images=x,
                                 views=row_views)  # fmt: skip

        def analysis(seqs: list[Sequence]) -> dict[str, Any]:
            reading = self._reading(x[:1], t.image_codes(seqs[0])[None])
            return {"attributes": answers(seqs), "reading": reading}

        return self._request("analyze", seqs, analysis, priority, deadline, images=x,
                             views=row_views, draws=1)  # fmt: skip

    def _scored(
        self, names: list[str], n_views: int
    ) -> tuple[list[Sequence], list[int], Callable[[list[Sequence]], dict[str, dict[str, Any]]]]:
        """Score mode's rows (every candidate answer to every question, view after view), the
        view each row reads, and how their log-probabilities become the answers."""
        t, known = self.templates, self.config.attributes
        questions = [(n, v) for n in names for v in known[n]]
        seqs = [
            t.to_attribute(self._blank_codes(view=view), n, forced=t.candidate_ids(v))
            for view in range(n_views)
            for n, v in questions
        ]
        row_views = [v for v in range(n_views) for _ in questions]

        def answers(seqs: list[Sequence]) -> dict[str, dict[str, Any]]:
            logprobs = np.array([sum(s.logprobs) for s in seqs]).reshape(n_views, len(questions))
            by_answer = logprobs.sum(0)  # each answer's log-probability summed over the views
            out, start = {}, 0
            for n in names:
                values = known[n]
                probs = np.exp(log_softmax(by_answer[start : start + len(values)]))
                best = int(np.argmax(probs))
                out[n] = {
                    "value": values[best],
                    "prob": float(probs[best]),
                    "candidates": {v: float(p) for v, p in zip(values, probs)},
                }
                start += len(values)
            return out

        return seqs, row_views, answers

    def _names(self, names: str | Iterable[str]) -> list[str]:
        """Attribute names as given: a comma-separated str or an iterable of str."""
        if isinstance(names, str):
            names = names.split(",")
        elif not isinstance(names, Iterable) or isinstance(names, (bytes, dict)):
            raise InvalidArgument(
                f"names must be a str or a list of str, got {type(names).__name__}"
            )
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise InvalidArgument("every attribute name must be a str")
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise InvalidArgument("no attribute names given")
        check_limit(len(names), "the number of attribute names", self.limits.max_questions,
                    "max_questions")  # fmt: skip
        for n in names:
            check_text(n, "an attribute name", self.limits.max_text_chars)
        return names

    def _views(self, views: int | None) -> int:
        return self.config.reading_views if views is None else check_views(views)

    def reading_quality(self, image: ImageLike) -> dict[str, Any]:
        """How far to trust what the model reads from a face -> {"score", "threshold",
        "reliable"}. score: PSNR in dB of the face (at the model's resolution) through the
        model's VQGAN, encoded and decoded; higher = more like the model's training faces.
        reliable: score >= threshold, the model's calibration on held-out faces (facert.json's
        reading_calibration); both None when the model has none. One VQGAN encode and decode."""
        x = self.image_tokenizer.model_input([image])  # (1, 3, H, W)
        return self._reading(x, self.engine.encode_images(x))

    def _reading(self, x: np.ndarray, codes: np.ndarray) -> dict[str, Any]:
        """One face (1, 3, H, W) and its codes (1, T) -> its reading (see reading_quality)."""
        from .reading_quality import reading, redrawn_psnr

        redrawn = self.engine.decode_images(codes)
        score = redrawn_psnr(x, self.config.image_scaling, redrawn)[0]
        return reading(score, self.config.reading_calibration)


# top_k at or above a window's size keeps every id; larger values mean the same.
_TOP_K_CAP = 2**31 - 1


def _params(seed: int | None, top_k: int, top_p: float, temperature: float) -> SamplingParams:
    temperature = check_float(temperature, "temperature", 0.0)
    top_p = check_float(top_p, "top_p", 0.0, 1.0)
    top_k = min(check_int(top_k, "top_k", lo=0), _TOP_K_CAP)
    seed = secrets.randbits(63) if seed is None else check_int(seed, "seed", 0, 2**64 - 1)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _int_array(values: Any, name: str) -> np.ndarray:
    """Integer ids or codes as int64; floats, bools and strings are refused, not truncated."""
    try:
        arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{name} must be a sequence of integers: {e}") from e
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"{name} must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _check_cache_fits(num_slots: int, config: ModelConfig, max_len: int) -> None:
    """Refuse a KV cache larger than this machine's memory before allocating it."""
    need = num_slots * kv_bytes_per_slot(config.lm, max_len)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise LimitExceeded(
            f"num_slots={num_slots} needs {need / 2**30:.1f} GiB of KV cache, more than this "
            f"machine's {have / 2**30:.1f} GiB"
        )


def _policy(priority: Any, deadline_s: Any, default_priority: int) -> tuple[int, float | None]:
    """A call's priority (lower first) and its deadline as a time.monotonic() instant."""
    priority = default_priority if priority is None else check_int(priority, "priority")
    if deadline_s is None:
        return priority, None
    return priority, time.monotonic() + check_float(deadline_s, "deadline_s", 0.0)


async def _awaited(submit: Callable[[], Future]) -> Any:
    """Validation and image encoding run off the event loop; then wait without blocking it.
    Cancelling the awaiting task cancels the request."""
    future = await asyncio.get_running_loop().run_in_executor(None, submit)
    return await asyncio.wrap_future(future)
