"""`facert bench serve`: the HTTP server beside the Python API, the same work on the same machine.

A `facert serve` process on a loopback port, and the same model loaded here. Per endpoint
(one face drawn as one drawing, a caption, one face's attributes with its reading score) and
per number of concurrent clients, each client sends its requests back to back over one
keep-alive connection, then the same calls go through the Python API from as many threads:
requests/s and latency p50/p99 both ways. The server's overhead per request is measured apart,
at one client: HTTP and API calls of identical work alternate, and the median of the paired
differences is the overhead (HTTP parsing, the upload, JSON and PNG encoding, the event loop),
robust to the drift of a shared machine.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

import facert
from facert.runtime.errors import FacertError, InvalidArgument

from .machine import describe
from .report import machine_line, table, write
from .timing import SETTLE_S, summary_ms

TEXT = "a smiling young woman with long blonde hair and glasses"
BOUNDARY = "facert-bench"
OVERHEAD_TARGET_MS = 5.0


class ServerProcess:
    """`facert serve` on a free loopback port, stopped (SIGINT: drained) on exit."""

    def __init__(self, model: str | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()
        args = ["serve", "--port", str(self.port), "--no-access-log", "--max-queue", "4096"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "facert.cli", *args, *([model] if model else [])],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def __enter__(self) -> ServerProcess:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise FacertError(f"facert serve exited: {self.log.read().decode()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise FacertError("facert serve did not get ready in 120 s")

    def output(self) -> str:
        """What the server has printed so far, read without moving the file offset that the
        running child writes at."""
        fd = self.log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)  # drain and exit
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def multipart(image: bytes, **fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body with these fields and the image as its `image` file, and its
    Content-Type (the two upload endpoints take this form)."""
    sep = f"--{BOUNDARY}\r\n".encode()
    parts = [f'Content-Disposition: form-data; name="{k}"\r\n\r\n{v}'.encode()
             for k, v in fields.items()]  # fmt: skip
    parts.append(b'Content-Disposition: form-data; name="image"; filename="face.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n" + image)  # fmt: skip
    body = b"".join(sep + p + b"\r\n" for p in parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def _endpoints(m: facert.FaceModel, face_png: bytes) -> dict[str, tuple]:
    """name -> (path, body, content type, the same work through the Python API)."""
    names = list(m.config.attributes)
    analyze, analyze_type = multipart(face_png, face_crop="true", views="1")
    caption, caption_type = multipart(face_png)

    def read(png: bytes) -> tuple:
        """What the server does for one face: its reading score while the engine reads it."""
        answers = m.submit("attributes", png, names, views=1)
        return m.reading_quality(png), answers.result()

    generate = json.dumps({"text": TEXT, "seed": 1, "candidates": 1}).encode()
    return {
        "generate": ("/v1/generate", generate, "application/json",
                     lambda: m.generate_faces(TEXT, seed=1, candidates=1)),
        "caption": ("/v1/caption", caption, caption_type, lambda: m.caption(face_png)),
        "analyze": ("/v1/analyze", analyze, analyze_type, lambda: read(face_png)),
    }  # fmt: skip


class HttpClient:
    """One client on one keep-alive connection; each call sends the same request."""

    def __init__(self, port: int, path: str, body: bytes, content_type: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.path, self.body, self.headers = path, body, {"Content-Type": content_type}

    def __call__(self) -> None:
        self.conn.request("POST", self.path, self.body, self.headers)
        reply = self.conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise FacertError(f"{self.path} answered {reply.status}: {data[:300]!r}")


def _clients(calls: list[Callable[[], object]], requests: int) -> dict:
    """Each call (a client) run back to back, `requests` in all: req/s and latency."""
    per_client = max(1, requests // len(calls))

    def client(call: Callable[[], object]) -> list[float]:
        times = []
        for _ in range(per_client):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return times

    time.sleep(SETTLE_S)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(calls)) as pool:
        latencies = [t for times in pool.map(client, calls) for t in times]
    wall = time.perf_counter() - start
    return {"requests": len(latencies), "rps": len(latencies) / wall, **summary_ms(latencies)}


def _server_model_seconds(port: int) -> float:
    """The server's model's request_seconds, summed over its tasks (from /metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("facert_request_seconds_sum"))  # fmt: skip


def _model_seconds(m: facert.FaceModel) -> float:
    """This process's model's request_seconds, summed over its tasks."""
    by_task = m.metrics.snapshot()["histograms"].get("request_seconds", {})
    return sum(h["sum"] for h in by_task.values())


def _timed(call: Callable[[], object], model_seconds: Callable[[], float]) -> tuple[float, float]:
    """(seconds the call took, seconds of it outside the model's requests), started on an idle
    machine: the other process's thread pools spin for a while after their work (SETTLE_S)."""
    time.sleep(SETTLE_S)
    before = model_seconds()
    start = time.perf_counter()
    call()
    took = time.perf_counter() - start
    return took, took - (model_seconds() - before)


def _overhead(
    port: int,
    m: facert.FaceModel,
    http_call: Callable[[], None],
    api_call: Callable[[], object],
    pairs: int,
) -> dict:
    """What HTTP adds per request at one client, in ms: alternating HTTP and API calls of
    identical work, each call's time less the time its model spent on its requests (the
    model's request_seconds, read around the call), so that the load other users put on a
    shared machine cancels out of the model's part; then the median (and quartiles) of the
    pairs' differences. What an API caller pays too (decoding the image, checking the
    arguments) cancels the same way."""
    https, apis, diffs = [], [], []
    for _ in range(pairs):
        api, api_outside = _timed(api_call, lambda: _model_seconds(m))
        http, http_outside = _timed(http_call, lambda: _server_model_seconds(port))
        apis.append(api)
        https.append(http)
        diffs.append(http_outside - api_outside)
    diffs_ms = np.array(diffs) * 1e3
    return {
        "pairs": pairs,
        "http_p50_ms": float(np.median(https) * 1e3),
        "api_p50_ms": float(np.median(apis) * 1e3),
        "overhead_p50_ms": float(np.median(diffs_ms)),
        "overhead_p25_ms": float(np.percentile(diffs_ms, 25)),
        "overhead_p75_ms": float(np.percentile(diffs_ms, 75)),
    }


def measure(model: str | None, concurrency: list[int], requests: int, pairs: int) -> dict:
    m = facert.load(model)
    face_png = io.BytesIO()
    Image.fromarray(m.generate_faces(TEXT, seed=0, candidates=1)[0]).save(face_png, "PNG")
    endpoints = _endpoints(m, face_png.getvalue())
    rows, overheads = [], {}
    with ServerProcess(model) as server:
        for name, (path, body, content_type, api) in endpoints.items():
            http = HttpClient(server.port, path, body, content_type)
            for _ in range(3):  # warm both: first calls build caches and pools
                http(), api()
            overheads[name] = _overhead(server.port, m, http, api, pairs)
            http.conn.close()
            for c in concurrency:
                total = max(requests, c)
                clients = [HttpClient(server.port, path, body, content_type) for _ in range(c)]
                rows.append({"endpoint": name, "clients": c, "via": "http",
                             **_clients(clients, total)})  # fmt: skip
                for client in clients:
                    client.conn.close()
                rows.append({"endpoint": name, "clients": c, "via": "api",
                             **_clients([api] * c, total)})  # fmt: skip
    m.close()
    return {"model": str(m.model_dir), "rows": rows, "overhead": overheads}


def markdown(result: dict) -> str:
    start_load, end_load = result["load_average"]
    lines = [
        "### serve: the HTTP server beside the Python API\n",
        machine_line(result["machine"]),
        "",
        f"Model {Path(result['model']).name}. Each endpoint's work: `generate` one face as one "
        "drawing (candidates=1), `caption` one 64 px face, `analyze` all attributes of one "
        "face (face_crop, views=1) with its reading score; the API column runs the same calls "
        "from as many threads. Clients send back to back, one keep-alive connection each; the "
        "HTTP run comes first, then the API run. The server and the benchmark share the "
        "machine's cores (one idles while the other works), and so did other people's jobs: "
        f"the load average was {start_load:.1f} at the start and {end_load:.1f} at the end, "
        "so a single cell can be off by a factor of two; the overhead below is measured so "
        "as to cancel that.",
        "",
    ]
    head = ["endpoint", "clients", "HTTP req/s", "HTTP p50 ms", "HTTP p99 ms", "API req/s",
            "API p50 ms", "API p99 ms"]  # fmt: skip
    by = {(r["endpoint"], r["clients"], r["via"]): r for r in result["rows"]}
    body = []
    for (endpoint, clients, via), r in by.items():
        if via == "http":
            a = by[(endpoint, clients, "api")]
            body.append([endpoint, clients, r["rps"], r["p50"], r["p99"], a["rps"], a["p50"],
                         a["p99"]])  # fmt: skip
    lines.append(table(head, body))
    lines += [
        "",
        f"What the server adds per request at one client: {result['pairs']} alternating HTTP "
        "and API calls of identical work per endpoint, each started on an idle machine; each "
        "call's time less what its model spent on its requests (request_seconds, read around "
        "the call), so that the load other users put on the machine cancels out of the "
        "model's part; the median of the pairs' differences (target < "
        f"{OVERHEAD_TARGET_MS:g} ms) and their quartiles.",
        "",
    ]
    rows = [[name, o["http_p50_ms"], o["api_p50_ms"], o["overhead_p50_ms"],
             f"{o['overhead_p25_ms']:.1f} to {o['overhead_p75_ms']:.1f}",
             "met" if o["overhead_p50_ms"] < OVERHEAD_TARGET_MS else "not met"]
            for name, o in result["overhead"].items()]  # fmt: skip
    head = ["endpoint", "HTTP p50 ms", "API p50 ms", "overhead p50 ms", "quartiles ms", "target"]
    lines.append(table(head, rows))
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    axes = fig.subplots(1, len(result["overhead"]))
    for ax, name in zip(np.atleast_1d(axes), result["overhead"]):
        for via in ("http", "api"):
            rows = [r for r in result["rows"] if r["endpoint"] == name and r["via"] == via]
            ax.plot([r["clients"] for r in rows], [r["rps"] for r in rows], "o-", label=via)
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title=name)
        ax.set_ylim(bottom=0)
        ax.legend()


def run(
    model: str | None, concurrency: str, requests: int, pairs: int, output: Path | None
) -> None:
    """`facert bench serve`: measure, print the tables, write serve.json / .md / .png."""
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError as e:
        raise InvalidArgument(
            f"--concurrency: comma-separated client counts, got {concurrency!r}"
        ) from e
    if not levels or min(levels) < 1 or requests < 1 or pairs < 1:
        raise InvalidArgument("--concurrency, --requests and --pairs must be positive")
    load_before = os.getloadavg()[0]  # other jobs on the machine: the noise in the tables
    machine = describe()
    machine["versions"].update({p: metadata.version(p) for p in ("fastapi", "uvicorn")})
    result = {"scenario": "serve", "machine": machine, "concurrency": levels,
              "requests": requests, "pairs": pairs,
              **measure(model, levels, requests, pairs)}  # fmt: skip
    result["load_average"] = [load_before, os.getloadavg()[0]]
    text = markdown(result)
    print(text)
    for line in write(output, "serve", result, text, plot):
        print(f"wrote {line}" if not line.startswith("no ") else line)
