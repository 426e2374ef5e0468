"""`facert serve`: a FaceModel over HTTP (FastAPI on uvicorn), one process, one model.

The model's scheduler already batches every caller's requests, so the server only translates.
It never blocks its event loop: admission (`model.submit`, which checks the arguments and the
upload) and image decoding run on threads, results are awaited as futures, and a client that
disconnects cancels its request, which frees its cache slots.

Safe by default: loopback only unless told; with an API key, every /v1 call and /metrics need
`Authorization: Bearer KEY` (compared in constant time); a body over the limit is refused
before it is read; decoded pixels, text, faces and drawings are bounded by the model's Limits;
every error is `{"error": {"code", "message"}}` (http_errors.py), never a traceback. The first
SIGTERM or Ctrl-C drains: new calls get 503 and /readyz fails, running calls get `grace`
seconds to finish, then the process exits 0.

`/` is a kiosk page (static/: HTML, one script, one style sheet; nothing from elsewhere) that
reads faces from the browser's camera or a photo and draws faces from a sentence, its progress
bar fed by /v1/generate's event stream.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import check_views
from .errors import FacertError, InvalidArgument
from .faces import FaceDetector, crop_face
from .http_errors import (
    API_ERRORS,
    INTERNAL_MESSAGE,
    SHUTDOWN_MESSAGE,
    ClientGone,
    ShuttingDown,
    error_body,
    error_response,
    facert_status,
    install_error_handlers,
)
from .images import load_rgb
from .metrics import TIME_BUCKETS
from .model import FaceModel
from .sequence import TOP_K

DEFAULT_MAX_BODY_MB = 32
API = "/v1/"
# The body each endpoint takes, checked before any of it is read (415 otherwise).
BODY_TYPES = {
    "/v1/generate": "application/json",
    "/v1/caption": "multipart/form-data",
    "/v1/analyze": "multipart/form-data",
}
# Route labels of the HTTP metrics; any other path counts as "other" (404 scans stay one label).
ROUTES = frozenset([*BODY_TYPES, "/", "/healthz", "/readyz", "/metrics"])
STATIC = Path(__file__).parent / "static"
# The kiosk page may load only what this server serves; its drawings arrive as data: URLs, its
# photos as blob: URLs (a camera's stream needs no source).
KIOSK_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"
EVENT_STREAM = "text/event-stream"
# A drawing reports every token (thousands a second): the stream sends its count at most this
# often, and only when it has moved.
PROGRESS_EVERY_S = 0.1
PROTECTED = "/metrics"  # besides /v1: the load it shows is the operator's business

Upload = Annotated[UploadFile, File(description="PNG, JPEG, BMP, GIF, TIFF, WebP or PPM/PGM")]
ATTRIBUTES_HELP = "comma-separated attribute names (default: all the model knows)"
VIEWS_HELP = "views read per face (default: the model's reading_views)"
FACE_CROP_HELP = "true: the image is one face; false (default): find the faces in it first"


class Gate:
    """The API calls in flight, whether the server is draining for a signal, and whether the
    drain's grace has run out (`aborted`: the calls still waiting give up)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.aborted = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def drained(self, grace: float) -> bool:
        """Whether no call is in flight, waiting up to `grace` seconds for it."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            return False
        return True


class HttpStats:
    """The server's own numbers (the model's come from its snapshot, see ModelCollector)."""

    def __init__(self, registry: CollectorRegistry, gate: Gate):
        self.answers = Counter("facert_http_responses", "HTTP answers by route and status",
                               ["route", "status"], registry=registry)  # fmt: skip
        self.errors = Counter("facert_http_errors", "error answers by error code", ["code"],
                              registry=registry)  # fmt: skip
        self.seconds = Histogram("facert_http_request_seconds",
                                 "seconds from a request's arrival to its answer, by route",
                                 ["route"], buckets=TIME_BUCKETS, registry=registry)  # fmt: skip
        in_flight = Gauge("facert_http_in_flight", "API calls being answered", registry=registry)
        in_flight.set_function(lambda: gate.in_flight)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.answers.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()


class ModelCollector(Collector):
    """Prometheus families made from the model's Metrics.snapshot() and health() at each scrape,
    so the numbers exist once, in the model."""

    COUNTERS = {  # Metrics counter -> its label, help
        "requests": ("task", "requests admitted, by task"),
        "tokens": ("task", "tokens drawn, written or scored, by task (rate() = tokens/s)"),
        "rejected": ("reason", "requests refused at submission, by error"),
        "cancelled": ("reason", "requests dropped unfinished: by their caller, or at a deadline"),
        "failed": ("reason", "backend failures while running a step, by error"),
    }
    GAUGES = {
        "queue_depth": "requests waiting to start",
        "slots_in_use": "KV-cache slots held by running sequences",
        "prefix_cache_slots": "KV-cache slots holding recent face prefixes (taken back on need)",
    }
    GROWING = {  # gauges of Metrics that only grow: counters to Prometheus
        "prefix_cache_hits": "face prefixes found in the prefix cache",
        "prefix_cache_misses": "face prefixes computed afresh",
    }
    HISTOGRAMS = {
        "queue_wait_seconds": "seconds from submission to the first prefill, by task",
        "time_to_first_token_seconds": "seconds from submission to the first token, by task",
        "request_seconds": "seconds from submission to the result, by task",
        "step_seconds": "seconds per engine step (prefills and one decode)",
        "rows_per_step": "sequences decoded per engine step",
    }

    def __init__(self, model: FaceModel):
        self.model = model

    def collect(self) -> Iterator[Any]:
        snap = self.model.metrics.snapshot()
        counters = snap["counters"]
        for name in {**dict.fromkeys(self.COUNTERS), **counters}:
            label, doc = self.COUNTERS.get(name, ("label", f"facert counter {name}"))
            family = CounterMetricFamily(f"facert_{name}", doc, labels=[label])
            for value, n in counters.get(name, {}).items():
                family.add_metric([value], n)
            yield family
        for name, value in snap["gauges"].items():
            if name in self.GROWING:
                yield CounterMetricFamily(f"facert_{name}", self.GROWING[name], value=value)
            else:
                doc = self.GAUGES.get(name, f"facert gauge {name}")
                yield GaugeMetricFamily(f"facert_{name}", doc, value=value)
        for name, by_task in snap["histograms"].items():
            labels = ["task"] if any(by_task) else []
            doc = self.HISTOGRAMS.get(name, f"facert histogram {name}")
            family = HistogramMetricFamily(f"facert_{name}", doc, labels=labels)
            for task, h in by_task.items():
                buckets = [(floatToGoString(b), n) for b, n in h["buckets"].items()]
                family.add_metric([task] if labels else [], [*buckets, ("+Inf", h["count"])],
                                  h["sum"])  # fmt: skip
            yield family
        health = self.model.health()
        yield GaugeMetricFamily("facert_engine_stuck",
                                "1 while one step has run past the model's step_timeout",
                                value=float(health["stuck"]))  # fmt: skip
        yield GaugeMetricFamily("facert_engine_alive", "1 while the engine thread runs",
                                value=float(health["alive"]))  # fmt: skip
        yield GaugeMetricFamily("facert_engine_seconds_since_step",
                                "seconds since the engine's last step (a stuck step grows it)",
                                value=health["seconds_since_step"])  # fmt: skip
        yield GaugeMetricFamily("facert_slots", "KV-cache slots in all",
                                value=self.model.engine.pool.num_slots)  # fmt: skip


class FrontDoor:
    """What a request passes before any route reads its body: the API key (401), draining
    (503), the body's media type (415) and declared size (413); then its size is counted as it
    streams in (413 past the limit, the rest never read). Counts the API calls in flight (for
    draining) and records every answer's route, status and time."""

    def __init__(
        self, app: ASGIApp, gate: Gate, stats: HttpStats, api_key: str | None, max_body: int
    ):
        self.app, self.gate, self.stats, self.max_body = app, gate, stats, max_body
        self.key = None if api_key is None else api_key.encode()
        self.too_large = f"the request body is over this server's limit of {max_body:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = scope["facert.arrival"] = time.monotonic()
        path = scope["path"]
        status = 0

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_status)
            elif path.startswith(API):
                self.gate.enter()
                try:
                    await self.app(scope, self._limited(receive), send_status)
                finally:
                    self.gate.leave()
            else:
                await self.app(scope, self._limited(receive), send_status)
        finally:
            route = path if path in ROUTES else "other"
            self.stats.answered(route, status or 500, time.monotonic() - start)

    def _refusal(self, scope: Scope) -> Response | None:
        path, headers = scope["path"], Headers(scope=scope)
        api = path.startswith(API)
        close = {"Connection": "close"}  # the body, if any, is never read
        if self.key is not None and (api or path == PROTECTED) and not self._authorized(headers):
            message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
            return self._error(
                401, "unauthorized", message, {"WWW-Authenticate": "Bearer", **close}
            )
        if api and self.gate.draining:
            return self._error(503, "shutting_down", "the server is shutting down", close)
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:  # uvicorn refuses such a request before it gets here
            declared = 0
        if declared > self.max_body:
            return self._error(413, "payload_too_large", self.too_large, close)
        wanted = BODY_TYPES.get(path)
        if wanted is not None and scope["method"] == "POST":
            given = headers.get("content-type", "").split(";")[0].strip().lower()
            if given != wanted:
                return self._error(415, "unsupported_media_type",
                                   f"{path} takes {wanted}, not {given or 'no Content-Type'}",
                                   close)  # fmt: skip
        return None

    def _limited(self, receive: Receive) -> Receive:
        """receive(), refusing the body once more than max_body bytes of it have come."""
        size = 0

        async def limited() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.max_body:
                raise HTTPException(413, self.too_large)  # the error handlers answer it
            return message

        return limited

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # headers arrive as latin-1 text
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.key)

    def _error(self, status: int, code: str, message: str, headers: dict) -> Response:
        self.stats.error(code)
        return error_response(status, code, message, headers)


class GenerateBody(BaseModel):
    """POST /v1/generate. Types are strict (2.0 faces is a client's bug, as in the Python
    API); ranges and limits are the model's own checks."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(description="what to draw")
    n: int = Field(1, description="faces to draw")
    seed: int | None = Field(
        None, description="sampling seed (default: a random one, returned); face i of a seed is "
        "the same whatever n is",
    )  # fmt: skip
    top_k: int = TOP_K
    top_p: float = 0.0
    temperature: float = 1.0
    candidates: int | None = Field(
        None, description="drawings per face, the one that fits the text best kept (default: "
        "the model's image_candidates; 1 is fastest)",
    )  # fmt: skip


def create_app(
    model: FaceModel,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
) -> FastAPI:
    """The FastAPI app serving `model`; its `state.gate` drains it (see GracefulServer)."""
    from facert import __version__

    app = FastAPIOffline(  # FastAPI whose /docs loads Swagger UI from its package, not a CDN
        title="facert", version=__version__,
        description="Talk2Face face models: draw faces from text, caption faces, read their "
        "attributes. Errors are {\"error\": {\"code\", \"message\"}}.",
    )  # fmt: skip
    gate = app.state.gate = Gate()
    registry = CollectorRegistry()
    registry.register(ModelCollector(model))
    stats = HttpStats(registry, gate)
    app.add_middleware(FrontDoor, gate=gate, stats=stats, api_key=api_key, max_body=max_body_bytes)
    install_error_handlers(app, lambda: model.health()["alive"], stats.error)
    detector = FaceDetector()

    async def run(request: Request, task: str, *args: Any, **kwargs: Any) -> Any:
        future = await _submit(model, task, *args, deadline_s=_deadline_s(request), **kwargs)
        return (await _results(request, [future]))[0]

    @app.get("/", include_in_schema=False)
    async def kiosk() -> FileResponse:
        """The kiosk page (README, Serving); its script and style sheet are under /kiosk/."""
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": KIOSK_CSP})

    app.mount("/kiosk", StaticFiles(directory=STATIC), name="kiosk")

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up (no model call)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready, or draining"}})
    async def readyz() -> Any:
        """The model is loaded, its engine thread is alive and the server is not draining."""
        health = model.health()
        if gate.draining:
            return error_response(503, "shutting_down", "the server is shutting down")
        if not health["alive"]:
            return error_response(503, "not_ready", "the model's engine thread has stopped")
        keys = ("alive", "busy", "waiting", "seconds_since_step")
        return {"ready": True, "engine": {k: health[k] for k in keys}}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text: the model's counters and histograms, and the server's."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/generate",
        responses={200: {"content": {"image/png": {}, EVENT_STREAM: {}},
                         "description": "JSON; one PNG under Accept: image/png; progress "
                         "events then the JSON under Accept: text/event-stream"},
                   406: API_ERRORS[415] | {"description": "a PNG asked for several faces"},
                   **API_ERRORS},
    )  # fmt: skip
    async def generate(body: GenerateBody, request: Request) -> Any:
        """Draw faces for a description: {"seed", "images": [{"png_base64", "width",
        "height"}]}, or with `Accept: image/png` and n=1 the PNG itself (seed in X-Facert-Seed).
        With `Accept: text/event-stream`, server-sent events: `progress` {"done", "total"}
        (tokens drawn and scored) as the drawing goes, then `result` (the JSON answer) or
        `error` ({"error": {"code", "message"}}, for a failure after the stream began).
        """
        media = _answer_type(request.headers.get("accept"))
        if media == "image/png" and body.n != 1:
            raise HTTPException(406, "Accept: image/png answers one face: ask for n=1, or "
                                "accept application/json")  # fmt: skip
        seed = secrets.randbits(63) if body.seed is None else body.seed
        options = body.model_dump(exclude={"text", "seed"})
        if media == EVENT_STREAM:
            return await drawing_events(request, body.text, seed, options)
        faces = await run(request, "generate_faces", body.text, seed=seed, **options)
        encoded = await asyncio.to_thread(lambda: [_png(f) for f in faces])
        if media == "image/png":
            return Response(encoded[0], media_type="image/png",
                            headers={"X-Facert-Seed": str(seed)})  # fmt: skip
        return {"seed": seed, "images": _images(encoded, faces)}

    async def drawing_events(
        request: Request, text: str, seed: int, options: dict
    ) -> StreamingResponse:
        """Admit the drawing first, so that a refusal is an ordinary JSON error; then stream."""
        total = model.generation_steps(text, options["n"], options["candidates"])
        progress = _Progress()
        future = await _submit(model, "generate_faces", text, seed=seed, on_step=progress.step,
                               deadline_s=_deadline_s(request), **options)  # fmt: skip
        events = _drawing_events(request, future, progress, total, seed, stats.error,
                                 lambda: model.health()["alive"])  # fmt: skip
        headers = {"Cache-Control": "no-store", "X-Facert-Seed": str(seed)}
        return StreamingResponse(events, media_type=EVENT_STREAM, headers=headers)

    @app.post("/v1/caption", responses=API_ERRORS)
    async def caption(
        request: Request,
        image: Upload,
        greedy: Annotated[bool, Form(description="greedy (default) or sampled")] = True,
        seed: Annotated[int | None, Form()] = None,
        top_k: Annotated[int, Form()] = TOP_K,
        top_p: Annotated[float, Form()] = 0.0,
        temperature: Annotated[float, Form()] = 1.0,
    ) -> dict:
        """Describe a face in words: {"text"}."""
        data = await image.read()
        text = await run(request, "caption", data, seed=seed, greedy=greedy, top_k=top_k,
                         top_p=top_p, temperature=temperature)  # fmt: skip
        return {"text": text}

    @app.post("/v1/analyze", responses=API_ERRORS)
    async def analyze(
        request: Request,
        image: Upload,
        attributes: Annotated[str | None, Form(description=ATTRIBUTES_HELP)] = None,
        views: Annotated[int | None, Form(description=VIEWS_HELP)] = None,
        face_crop: Annotated[bool, Form(description=FACE_CROP_HELP)] = False,
    ) -> dict:
        """Read the attributes of every face: {"width", "height", "faces": [{"box": {"x",
        "y", "w", "h", "score"}, "attributes": {name: {"value", "prob", "candidates"}},
        "reading": {"score", "threshold", "reliable"}}]}, best-detected face first, at most the
        model's max_faces of them. "reading" says how far to trust the answers (the face's
        likeness to the model's training faces: FaceModel.reading_quality)."""
        names = _attribute_names(model, attributes)
        if views is not None:
            check_views(views)
        data = await image.read()
        rgb, faces = await asyncio.to_thread(_find_faces, model, detector, data, face_crop)
        futures: list[Future] = []
        try:
            for _box, face in faces:  # one VQGAN encode per face: its answers and its reading
                options = {"views": views, "deadline_s": _deadline_s(request)}
                futures.append(await _submit(model, "analyze", face, names, **options))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        analyses = await _results(request, futures)
        return {
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "faces": [
                {"box": box, "attributes": a["attributes"], "reading": a["reading"]}
                for (box, _), a in zip(faces, analyses)
            ],
        }

    return app


class _Progress:
    """Tokens a drawing has produced: the engine thread adds, the event stream reads."""

    def __init__(self) -> None:
        self.done = 0

    def step(self, k: int) -> None:
        self.done += k


async def _drawing_events(
    request: Request,
    future: Future,
    progress: _Progress,
    total: int,
    seed: int,
    count_error: Callable[[str], None],
    engine_alive: Callable[[], bool],
) -> AsyncIterator[str]:
    """A drawing's server-sent events. Whatever ends the stream early (the client leaving, on
    which Starlette cancels or closes this generator, or the drain's grace running out) cancels
    the drawing, freeing its cache slots."""
    drawn = asyncio.wrap_future(future)
    aborted = asyncio.ensure_future(request.app.state.gate.aborted.wait())
    sent = -1
    try:
        while True:
            finished = drawn.done() or aborted.done()  # before reading the count: none is lost
            if progress.done != sent:
                sent = progress.done
                yield _event("progress", {"done": sent, "total": total})
            if finished:
                break
            await asyncio.wait((drawn, aborted), timeout=PROGRESS_EVERY_S,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if not drawn.done():
            count_error("shutting_down")
            yield _event("error", error_body("shutting_down", SHUTDOWN_MESSAGE))
            return
        try:
            faces = drawn.result()
        except FacertError as e:
            code = facert_status(e, engine_alive())[1]
            count_error(code)
            yield _event("error", error_body(code, str(e)))
            return
        except Exception:
            logging.getLogger("uvicorn.error").exception("a streamed drawing failed")
            count_error("internal_error")
            yield _event("error", error_body("internal_error", INTERNAL_MESSAGE))
            return
        encoded = await asyncio.to_thread(lambda: [_png(f) for f in faces])
        yield _event("result", {"seed": seed, "images": _images(encoded, faces)})
    finally:
        aborted.cancel()
        future.cancel()  # a no-op once it is done


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _images(encoded: list[bytes], faces: list[np.ndarray]) -> list[dict]:
    return [{"png_base64": base64.b64encode(data).decode("ascii"), "width": f.shape[1],
             "height": f.shape[0]} for data, f in zip(encoded, faces)]  # fmt: skip


def _find_faces(
    model: FaceModel, detector: FaceDetector, data: bytes, face_crop: bool
) -> tuple[np.ndarray, list[tuple[dict, np.ndarray]]]:
    """An upload -> its RGB pixels (within the model's pixel limit) and (box, face) pairs: the
    detector's faces, best first, cut out as the model wants them; or the whole image."""
    rgb = load_rgb(data, None, model.limits.max_image_pixels)
    height, width = rgb.shape[:2]
    if face_crop:
        return rgb, [({"x": 0, "y": 0, "w": width, "h": height, "score": None}, rgb)]
    boxes = detector.detect(rgb)[: model.limits.max_faces]
    return rgb, [(asdict(b), crop_face(rgb, b)) for b in boxes]


def _attribute_names(model: FaceModel, names: str | None) -> list[str]:
    """Checked here too, so that a photo without faces still refuses a bad name."""
    known = model.config.attributes
    if names is None:
        return list(known)
    names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        what = f"unknown attribute(s) {', '.join(unknown)}" if unknown else "no attribute named"
        raise InvalidArgument(f"{what}; this model knows {', '.join(known) or 'none'}")
    return names


async def _submit(model: FaceModel, task: str, *args: Any, **kwargs: Any) -> Future:
    """model.submit on a thread (it checks the arguments and reads the image). Should this
    coroutine be cancelled meanwhile, the request is cancelled as soon as it exists."""
    submit = functools.partial(model.submit, task, *args, **kwargs)
    pending = asyncio.get_running_loop().run_in_executor(None, submit)
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        pending.add_done_callback(_cancel_submitted)
        raise


def _cancel_submitted(pending: asyncio.Future) -> None:
    if not pending.cancelled() and pending.exception() is None:
        pending.result().cancel()


async def _results(request: Request, futures: list[Future]) -> list:
    """The futures' results. Whatever ends the wait first (a request failing, the client
    disconnecting, the drain's grace running out, this coroutine being cancelled) cancels the
    requests still running, which frees their cache slots."""
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    gone = asyncio.ensure_future(_disconnected(request))
    aborted = asyncio.ensure_future(request.app.state.gate.aborted.wait())
    try:
        done, _ = await asyncio.wait((waiting, gone, aborted), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (gone, aborted, waiting, *futures):
            f.cancel()  # a no-op on those done
        waiting.add_done_callback(_retrieved)
    if waiting in done:
        return waiting.result()
    raise ClientGone() if gone in done else ShuttingDown()


def _retrieved(gathered: asyncio.Future) -> None:
    """Mark a gather's outcome seen: once cancelled it holds a CancelledError that asyncio
    would otherwise log as never retrieved."""
    if not gathered.cancelled():
        gathered.exception()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _deadline_s(request: Request) -> float | None:
    """X-Deadline-Ms, counted from the request's arrival -> the seconds left, for the model."""
    raw = request.headers.get("x-deadline-ms")
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms) or ms <= 0:
        raise InvalidArgument(f"X-Deadline-Ms must be a positive number of milliseconds: {raw!r}")
    return max(0.0, ms / 1000 - (time.monotonic() - request.scope["facert.arrival"]))


def _answer_type(accept: str | None) -> str:
    """The answer an Accept header ranks highest of image/png, text/event-stream and
    application/json (JSON wins ties and */*)."""
    weights: dict[str, float] = {}
    for item in (accept or "").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        weights[media.lower()] = max(q, weights.get(media.lower(), 0.0))
    offers = {
        "application/json": weights.get(
            "application/json", weights.get("application/*", weights.get("*/*", 0.0))
        ),
        "image/png": weights.get("image/png", weights.get("image/*", 0.0)),
        EVENT_STREAM: weights.get(EVENT_STREAM, weights.get("text/*", 0.0)),
    }
    return max(offers, key=offers.__getitem__)  # the first of equals: JSON


def _png(face: np.ndarray) -> bytes:
    """Lossless, compressed for speed (a 64 px face: 0.3 ms instead of PIL's default 0.8 ms,
    for 12 % more bytes)."""
    out = io.BytesIO()
    Image.fromarray(face).save(out, format="PNG", compress_level=1)
    return out.getvalue()


class GracefulServer(uvicorn.Server):
    """uvicorn with facert's shutdown. uvicorn's own handler stops at once and raises the
    signal again afterwards (the process dies of it); here the first SIGTERM or SIGINT drains
    (new API calls get 503, /readyz fails), waits up to `grace` seconds for the calls in flight,
    then stops, and the process exits 0. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, gate: Gate, grace: float):
        super().__init__(config)
        self.gate, self.grace = gate, grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.gate.draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self.gate.draining = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        async def stop_when_drained() -> None:
            if not await self.gate.drained(self.grace):
                self.gate.aborted.set()  # the calls still running answer 503, freeing slots
                await self.gate.drained(5.0)
            self.should_exit = True

        self._draining = asyncio.ensure_future(stop_when_drained())


def serve(
    model: FaceModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    grace: float = 30.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
    access_log: bool = True,
) -> None:
    """Serve `model` until SIGTERM or Ctrl-C (drained as GracefulServer says)."""
    app = create_app(model, api_key, max_body_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, access_log=access_log, server_header=False, lifespan="off",
        timeout_graceful_shutdown=1,  # after the drain, for any answer still being sent
    )  # fmt: skip
    GracefulServer(config, app.state.gate, grace).run()
