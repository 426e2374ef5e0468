"""`facert camera`: read the faces in front of a camera (or in a video file or stream), live.

One thread captures frames and keeps only the newest (latest frame wins: when the rest of the
pipeline is slower than the camera, older frames are dropped instead of queueing, so what is
drawn is never stale). The caller's thread takes the newest frame, finds the faces in it,
follows each face from frame to frame with an id (boxes matched by overlap), and starts an
attribute reading of a face through the model's scheduler (a Future: capture and drawing never
wait for the model) when the face has none running and its last one started at least
`interval` seconds earlier. A reading, once done, follows its face in every later frame until
the next one replaces it. Each processed frame is drawn (boxes, ids, answers) for a window or a
video file, and written as one JSON line.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .config import check_views
from .errors import FacertError, FacertOverloaded, InvalidArgument
from .faces import FaceBox, FaceDetector, crop_face, opencv
from .limits import check_float

MATCH_IOU = 0.3  # a face's box in the next frame overlaps its last box at least this much
FORGET_S = 1.0  # a face unseen this long (source seconds) is gone; its id is not reused
LIVE_FPS = 30.0  # pacing for a video file that states no frame rate


@dataclass
class Frame:
    """One captured frame. index: its position in the source (every frame read counts, dropped
    or not); t: seconds on the source's clock (video time for a file, since the start for a
    camera or stream); captured: time.monotonic() when it was read."""

    index: int
    t: float
    captured: float
    image: np.ndarray  # uint8 RGB [H, W, 3]


class LatestFrame:
    """A one-frame mailbox between the capture thread and the pipeline: a new frame replaces
    one not yet taken (counted in `dropped`), unless the writer asked to wait for the reader."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame, wait: bool = False) -> None:
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: self._frame is None or self._closed)
            self.dropped += self._frame is not None
            self._frame = frame
            self._cond.notify_all()

    def take(self) -> Frame | None:
        """The newest frame, waiting for one; None once the source has ended and all is taken."""
        with self._cond:
            self._cond.wait_for(lambda: self._frame is not None or self._closed)
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Capture:
    """Frames from a camera index ("0"), a video file or a stream URL (rtsp://, http://), read
    on a thread into a LatestFrame. A file is read in real time, paced by its frame rate, unless
    `every_frame` asks for each of its frames as fast as the pipeline takes them."""

    def __init__(self, source: str | int, every_frame: bool = False):
        cv2 = opencv()
        source = str(source)
        self.live = source.isdigit() or "://" in source
        if every_frame and self.live:
            raise InvalidArgument("every_frame is for video files; a camera or stream runs live")
        if not self.live and not Path(source).is_file():
            raise FacertError(f"video file {source} does not exist")
        self._cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
        if not self._cap.isOpened():
            kind = "camera" if source.isdigit() else "stream" if self.live else "video file"
            raise FacertError(f"cannot open {kind} {source} (OpenCV could not read it)")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else LIVE_FPS
        self.every_frame = every_frame
        self.frames = LatestFrame()
        self.read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="facert-capture", daemon=True)

    def start(self) -> Capture:
        self._thread.start()
        return self

    def _run(self) -> None:
        cv2 = opencv()
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                ok, bgr = self._cap.read()
                if not ok:
                    break  # the file's end, or a stream that broke
                now = time.monotonic()
                t = now - start if self.live else self.read / self.fps
                if not self.live and not self.every_frame and t > now - start:
                    time.sleep(t - (now - start))  # a file plays at its own speed
                    now = time.monotonic()
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                self.frames.put(Frame(self.read, t, now, rgb), wait=self.every_frame)
                self.read += 1
        finally:
            self._cap.release()
            self.frames.close()

    def close(self) -> None:
        self._stop.set()
        self.frames.close()  # releases a capture thread waiting for the reader
        if self._thread.is_alive():
            self._thread.join(timeout=5)  # a stalled stream may hold read() longer: it is a daemon
        elif self._thread.ident is None:  # never started: the thread would have released it
            self._cap.release()


def iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes."""
    w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    inter = max(w, 0) * max(h, 0)
    return inter / (a.w * a.h + b.w * b.h - inter)


@dataclass
class Reading:
    """One attribute reading of a tracked face, from frame `frame` (source time t)."""

    frame: int
    t: float
    started: float  # time.monotonic() when submitted
    analysis: Future  # FaceModel.analyze's: the answers and the reading's quality


@dataclass
class Track:
    """A face followed from frame to frame."""

    id: int
    box: FaceBox
    seen_t: float
    reading: Reading | None = None  # the one running, if any
    last: dict[str, Any] | None = None  # the latest finished reading, as written to JSON
    started_t: float | None = None  # source time of the frame the last reading started from
    readings: int = 0


class Tracker:
    """Ids for faces: each box takes the free track whose last box it overlaps most (IoU at
    least MATCH_IOU, greedily from the largest overlap); a box with none starts a track."""

    def __init__(self) -> None:
        self.tracks: dict[int, Track] = {}
        self.next_id = 1

    def update(self, boxes: list[FaceBox], t: float) -> tuple[list[Track], list[Track]]:
        """(the tracks seen in this frame, in the order of `boxes`; the tracks forgotten)."""
        tracks = list(self.tracks.values())
        pairs = sorted(
            ((iou(b, tr.box), i, tr.id) for i, b in enumerate(boxes) for tr in tracks), reverse=True
        )
        matched: dict[int, int] = {}  # box index -> track id
        for overlap, i, tid in pairs:
            if overlap < MATCH_IOU:
                break
            if i not in matched and tid not in matched.values():
                matched[i] = tid
        seen = []
        for i, box in enumerate(boxes):
            if i in matched:
                track = self.tracks[matched[i]]
                track.box, track.seen_t = box, t
            else:
                track = self.tracks[self.next_id] = Track(self.next_id, box, t)
                self.next_id += 1
            seen.append(track)
        gone = [tr for tr in self.tracks.values() if t - tr.seen_t > FORGET_S]
        for track in gone:
            del self.tracks[track.id]
        return seen, gone


@dataclass
class Stats:
    """What a run did: counts, and latencies in seconds."""

    frames_read: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    seconds: float = 0.0
    latency: list[float] = field(default_factory=list)  # capture -> overlay, per processed frame
    detect: list[float] = field(default_factory=list)  # detector time per processed frame
    readings_started: int = 0
    readings_done: int = 0
    readings_failed: int = 0
    readings_cancelled: int = 0
    readings_refused: int = 0  # the model's queue was full: tried again on the next frame
    reading_latency: list[float] = field(default_factory=list)  # submit -> answers
    tracks: int = 0

    def summary(self) -> dict[str, Any]:
        """The numbers a person or a benchmark reads (milliseconds, frames per second)."""

        def ms(values: list[float], q: float) -> float | None:
            return round(1000 * float(np.quantile(values, q)), 1) if values else None

        per_s = self.frames_processed / self.seconds if self.seconds else 0.0
        return {
            "frames_read": self.frames_read,
            "frames_processed": self.frames_processed,
            "frames_dropped": self.frames_dropped,
            "seconds": round(self.seconds, 3),
            "read_fps": round(self.frames_read / self.seconds, 2) if self.seconds else 0.0,
            "processed_fps": round(per_s, 2),
            "latency_p50_ms": ms(self.latency, 0.5),
            "latency_p95_ms": ms(self.latency, 0.95),
            "latency_max_ms": ms(self.latency, 1.0),
            "detect_p50_ms": ms(self.detect, 0.5),
            "readings_started": self.readings_started,
            "readings_done": self.readings_done,
            "readings_failed": self.readings_failed,
            "readings_cancelled": self.readings_cancelled,
            "readings_refused": self.readings_refused,
            "reading_p50_ms": ms(self.reading_latency, 0.5),
            "reading_p95_ms": ms(self.reading_latency, 0.95),
            "tracks": self.tracks,
        }

    def text(self) -> str:
        s = self.summary()
        return "\n".join([
            f"frames    {s['frames_read']} read, {s['frames_processed']} processed "
            f"({s['frames_dropped']} dropped: latest frame wins) in {s['seconds']:.2f} s: "
            f"{s['read_fps']:.1f} read/s, {s['processed_fps']:.1f} processed/s",
            f"latency   capture to overlay p50 {s['latency_p50_ms']} ms, p95 "
            f"{s['latency_p95_ms']} ms, max {s['latency_max_ms']} ms; detector p50 "
            f"{s['detect_p50_ms']} ms",
            f"readings  {s['readings_started']} started, {s['readings_done']} done, "
            f"{s['readings_failed']} failed, {s['readings_cancelled']} cancelled, "
            f"{s['readings_refused']} refused (queue full); start to answer p50 "
            f"{s['reading_p50_ms']} ms, p95 {s['reading_p95_ms']} ms",
            f"faces     {s['tracks']} tracked",
        ])  # fmt: skip


def attribute_names(model: Any, names: Iterable[str] | str | None) -> list[str]:
    """The attributes to read ("a,b" or a list; None: all the model knows), checked before the
    first frame rather than failing on the first face."""
    known = list(model.config.attributes)
    if names is None:
        return known
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise InvalidArgument(
            f"unknown attribute(s) {', '.join(unknown) or '(none given)'}; this model reads "
            f"{', '.join(known)}"
        )
    return names


class Pipeline:
    """Detection, tracking and readings for one stream of frames. `model` None: the detector
    alone (no readings). Each reading is the model's `analyze` (one VQGAN encode of the face
    for both), so it says whether the model can be trusted on that face."""

    def __init__(
        self,
        model: Any | None,
        names: Iterable[str] | str | None = None,
        interval: float = 1.0,
        detector: FaceDetector | None = None,
        views: int | None = None,
    ):
        self.model = model
        self.interval = check_float(interval, "interval", lo=0.0)
        self.detector = detector or FaceDetector()
        self.views = None if views is None else check_views(views)
        self.names = [] if model is None else attribute_names(model, names)
        self.tracker = Tracker()
        self.stats = Stats()

    def process(self, frame: Frame) -> tuple[dict[str, Any], list[Track]]:
        """One frame -> (its JSON record, the tracks seen in it). Starts readings that are due
        and collects those that finished; never waits for the model."""
        start = time.perf_counter()
        boxes = self.detector.detect(frame.image)
        self.stats.detect.append(time.perf_counter() - start)
        seen, gone = self.tracker.update(boxes, frame.t)
        self.stats.tracks = self.tracker.next_id - 1
        for track in gone:
            if track.reading is not None:
                self._cancel(track.reading)
        for track in self.tracker.tracks.values():
            self._collect(track)
        started = {track.id for track in seen if self._start(track, frame)}
        faces = [
            {
                "id": track.id,
                "box": [track.box.x, track.box.y, track.box.w, track.box.h],
                "score": round(track.box.score, 3),
                "reading_started": track.id in started,
                "reading": track.last,
            }
            for track in seen
        ]
        self.stats.frames_processed += 1
        return {"frame": frame.index, "t": round(frame.t, 4), "faces": faces}, seen

    def _start(self, track: Track, frame: Frame) -> bool:
        """Start a reading of this face from this frame when one is due."""
        if self.model is None or track.reading is not None:
            return False
        if track.started_t is not None and frame.t - track.started_t < self.interval:
            return False
        crop = crop_face(frame.image, track.box)
        try:
            analysis = self.model.submit("analyze", crop, self.names, views=self.views)
        except FacertOverloaded:
            self.stats.readings_refused += 1
            return False
        track.reading = Reading(frame.index, frame.t, time.monotonic(), analysis)
        track.started_t = frame.t
        track.readings += 1
        self.stats.readings_started += 1
        return True

    def _collect(self, track: Track) -> None:
        reading = track.reading
        if reading is None or not reading.analysis.done():
            return
        track.reading = None
        try:
            analysis = reading.analysis.result()
        except FacertError as e:
            self.stats.readings_failed += 1
            track.last = {"frame": reading.frame, "t": round(reading.t, 4), "error": str(e)}
            return
        self.stats.readings_done += 1
        self.stats.reading_latency.append(time.monotonic() - reading.started)
        answers, quality = analysis["attributes"], analysis["reading"]
        track.last = {
            "frame": reading.frame,
            "t": round(reading.t, 4),
            "attributes": {
                n: {"value": a["value"], "prob": round(a["prob"], 4)} for n, a in answers.items()
            },  # fmt: skip
            "quality_db": None if quality["score"] is None else round(quality["score"], 2),
            "reliable": quality["reliable"],
        }

    def _cancel(self, reading: Reading) -> None:
        reading.analysis.cancel()
        self.stats.readings_cancelled += 1

    def close(self) -> None:
        """Cancel the readings still running (their faces are not drawn again)."""
        for track in self.tracker.tracks.values():
            if track.reading is not None:
                self._cancel(track.reading)
                track.reading = None


GREEN, ORANGE, GREY = (60, 200, 60), (0, 150, 255), (200, 200, 200)  # BGR
WINDOW = "facert camera"


def draw(bgr: np.ndarray, tracks: list[Track]) -> np.ndarray:
    """Boxes, ids and the latest answers on a BGR frame (in place). Orange: the model's reading
    of this face is unreliable (the face is unlike the faces it learned); grey: not read yet."""
    cv2 = opencv()
    for track in tracks:
        b, last = track.box, track.last
        unreliable = last is not None and last.get("reliable") is False
        color = GREY if last is None else ORANGE if unreliable else GREEN
        cv2.rectangle(bgr, (b.x, b.y), (b.x + b.w, b.y + b.h), color, 2)
        lines = [f"#{track.id}" + (" (unreliable)" if unreliable else "")]
        if last is None:
            lines.append("reading..." if track.reading is not None else "")
        elif "error" in last:
            lines.append(last["error"][:40])
        else:
            lines += [f"{n}: {a['value']} {a['prob']:.2f}" for n, a in last["attributes"].items()]
        y = b.y + b.h + 14
        for line in filter(None, lines):
            (w, h), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            cv2.rectangle(bgr, (b.x, y - h - 3), (b.x + w + 4, y + 3), (0, 0, 0), -1)
            cv2.putText(bgr, line, (b.x + 2, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1,
                        cv2.LINE_AA)  # fmt: skip
            y += h + 6
    return bgr


class Sinks:
    """Where processed frames go: a window, an annotated video file, JSON lines."""

    def __init__(self, display: bool, out: Path | None, jsonl: IO[str] | None, fps: float):
        self.display, self.out, self.jsonl, self.fps = display, out, jsonl, fps
        self._writer = None
        if display:
            cv2 = opencv()
            try:
                cv2.namedWindow(WINDOW)
            except cv2.error as e:
                raise FacertError(
                    "--display needs an OpenCV build with windows (pip install "
                    "opencv-contrib-python, not -headless); use --out or --jsonl here"
                ) from e

    @property
    def draws(self) -> bool:
        return self.display or self.out is not None

    def write(self, bgr: np.ndarray | None, record: dict[str, Any]) -> bool:
        """Hand one frame on; False when the person closed the window (q or Esc)."""
        cv2 = opencv()
        if self.out is not None:
            if self._writer is None:
                fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.out.suffix == ".avi" else "mp4v"))
                size = (bgr.shape[1], bgr.shape[0])
                self._writer = cv2.VideoWriter(str(self.out), fourcc, self.fps, size)
                if not self._writer.isOpened():
                    raise FacertError(f"cannot write video {self.out} (use .mp4 or .avi)")
            self._writer.write(bgr)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.display:
            cv2.imshow(WINDOW, bgr)
            return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
        if self.display:
            opencv().destroyAllWindows()


def run(
    source: str | int,
    model: Any | None,
    names: Iterable[str] | str | None = None,
    interval: float = 1.0,
    display: bool = False,
    out: str | Path | None = None,
    jsonl: IO[str] | None = None,
    every_frame: bool = False,
    detector: FaceDetector | None = None,
    views: int | None = None,
    on_frame: Callable[[dict[str, Any]], None] | None = None,
) -> Stats:
    """Run the pipeline on a source until it ends (or Ctrl-C, or q in the window) -> Stats.
    Each processed frame's record also goes to `on_frame` (after the sinks): with
    `jsonl`, one JSON line per processed frame, with each face's id, box and latest reading."""
    cv2 = opencv()
    pipeline = Pipeline(model, names, interval, detector, views=views)
    capture = Capture(source, every_frame)
    try:
        sinks = Sinks(display, Path(out) if out is not None else None, jsonl, capture.fps)
    except BaseException:
        capture.close()
        raise
    stats = pipeline.stats
    start = time.monotonic()
    capture.start()
    try:
        while (frame := capture.frames.take()) is not None:
            record, seen = pipeline.process(frame)
            bgr = draw(cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), seen) if sinks.draws else None
            latency = time.monotonic() - frame.captured  # the overlay is ready to show
            stats.latency.append(latency)
            record["latency_ms"] = round(1000 * latency, 1)
            keep_going = sinks.write(bgr, record)
            if on_frame is not None:
                on_frame(record)
            if not keep_going:
                break
    except KeyboardInterrupt:
        pass  # a live camera stops with Ctrl-C: still report what it did
    finally:
        capture.close()
        pipeline.close()
        sinks.close()
        stats.seconds = time.monotonic() - start
        stats.frames_read = capture.read
        stats.frames_dropped = capture.frames.dropped
    return stats
