"""`facert serve` as its users run it: real server processes on loopback, real HTTP, answers
compared with the Python API in this process (same model, same seeds, same pixels)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import facert
from facert.runtime.faces import FaceDetector, crop_face

KEY = "s3cret-key-for-tests"
TEXT = "a smiling young woman with long blonde hair"
BOUNDARY = "facert-test-boundary"
MAX_BODY_MB = 2


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Server:
    """`facert serve` in a child process on a free loopback port."""

    def __init__(self, log: Path, *options: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "facert.cli", "serve", "--port", str(self.port), *options],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 90) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"server died:\n{self.log.read_text()}"
            try:
                if self.request("GET", "/readyz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log.read_text()}")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        timeout: float = 120,
    ) -> Reply:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def generate(self, headers: dict | None = None, **body) -> Reply:
        headers = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", "/v1/generate", json.dumps(body).encode(), headers)

    def upload(self, path: str, file: bytes | None, headers: dict | None = None, **fields):
        body, content_type = form(file, **fields)
        return self.request("POST", path, body, {"Content-Type": content_type, **(headers or {})})

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        reply = self.request("GET", "/metrics", headers=headers)
        assert reply.status == 200, reply.body
        return parse_metrics(reply.body.decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def form(file: bytes | None, filename: str = "face.png", **fields) -> tuple[bytes, str]:
    """multipart/form-data: text fields (str or raw bytes) and an optional file as `image`."""
    parts = []
    for name, value in fields.items():
        value = value if isinstance(value, bytes) else str(value).encode()
        parts.append(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value)
    if file is not None:
        head = (f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
        parts.append(head.encode() + file)
    sep = f"--{BOUNDARY}\r\n".encode()
    body = b"".join(sep + p + b"\r\n" for p in parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost none: a decompression bomb's
    header, refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(bytes(1 + 3 * 64))  # one short row: the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_error(reply: Reply, status: int, code: str) -> None:
    """The documented error: status, JSON {"error": {"code", "message"}}, no traceback."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]


def events(body: bytes) -> list[tuple[str, dict]]:
    """Server-sent events -> (name, data) pairs (facert's: one `event:` and one `data:` line)."""
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            out.append((name[7:], json.loads(data[6:])))
    return out


def read_events(reply: http.client.HTTPResponse, until: str) -> list[tuple[str, dict]]:
    """Events from a streaming answer, read as they come until the first one named `until`."""
    got: list[tuple[str, dict]] = []
    block = b""
    while not got or got[-1][0] != until:
        line = reply.readline()
        assert line, f"the stream ended before a {until!r} event: {got}"
        block += line
        if line == b"\n":
            got += events(block)
            block = b""
    return got


STREAM = {"Accept": "text/event-stream"}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The plain server (a small body limit) and a guarded one (API key, a queue of one),
    started side by side."""
    logs = tmp_path_factory.mktemp("server-logs")
    plain = Server(logs / "plain.log", "--max-body-mb", str(MAX_BODY_MB))
    guarded = Server(logs / "guarded.log", "--api-key", KEY, "--max-queue", "1",
                     "--no-access-log")  # fmt: skip
    try:
        yield plain.wait_ready(), guarded.wait_ready()
    finally:
        plain.stop()
        guarded.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def guarded(servers) -> Server:
    return servers[1]


@pytest.fixture(scope="module")
def model():
    with facert.load() as m:
        yield m


@pytest.fixture(scope="module")
def face(model) -> np.ndarray:
    return model.generate_faces(TEXT, seed=0, candidates=1)[0]


@pytest.fixture(scope="module")
def face_png(face) -> bytes:
    return encode(face)


AUTH = {"Authorization": f"Bearer {KEY}"}


# -- the documented answers, equal to the Python API ----------------------------------------------


def test_listens_on_loopback_by_default(server):
    assert f"http://127.0.0.1:{server.port}" in server.log.read_text()


def test_generate_equals_the_python_api(server, model):
    reply = server.generate(text=TEXT, n=2, seed=5, candidates=1)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["seed"] == 5
    expected = model.generate_faces(TEXT, n=2, seed=5, candidates=1)
    for image, want in zip(body["images"], expected, strict=True):
        assert (image["width"], image["height"]) == (want.shape[1], want.shape[0])
        np.testing.assert_array_equal(png_pixels(base64.b64decode(image["png_base64"])), want)


def test_generate_one_png_under_accept_image_png(server, model):
    reply = server.generate({"Accept": "image/png"}, text=TEXT, seed=6, candidates=2)
    assert reply.status == 200 and reply.headers["content-type"] == "image/png"
    assert reply.headers["x-facert-seed"] == "6"
    want = model.generate_faces(TEXT, seed=6, candidates=2)[0]
    np.testing.assert_array_equal(png_pixels(reply.body), want)


def test_generate_without_a_seed_returns_the_seed_it_drew(server, model):
    body = server.generate(text=TEXT, candidates=1).json()
    want = model.generate_faces(TEXT, seed=body["seed"], candidates=1)[0]
    np.testing.assert_array_equal(
        png_pixels(base64.b64decode(body["images"][0]["png_base64"])), want
    )


def test_generate_streams_progress_then_the_result(server, model):
    """Accept: text/event-stream: progress events counting up to generation_steps() (the
    drawings, then the scoring that picks the best of 4), then the JSON answer's faces."""
    reply = server.generate(STREAM, text=TEXT, n=2, seed=7, candidates=4)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["x-facert-seed"] == "7"
    *progress, (last, result) = events(reply.body)
    assert last == "result" and result["seed"] == 7
    total = model.generation_steps(TEXT, n=2, candidates=4)
    assert {name for name, _ in progress} == {"progress"}
    done = [data["done"] for _, data in progress]
    # counts only grow, and end at the total (how many come first depends on the machine's
    # speed: progress is sampled every 0.1 s)
    assert done[-1] == total and done == sorted(set(done))
    assert all(data["total"] == total for _, data in progress)
    expected = model.generate_faces(TEXT, n=2, seed=7, candidates=4)
    for image, want in zip(result["images"], expected, strict=True):
        np.testing.assert_array_equal(png_pixels(base64.b64decode(image["png_base64"])), want)


def test_a_refused_stream_is_a_json_error_not_a_stream(server):
    """Admission comes before the stream: a bad request gets its usual status and JSON body."""
    assert_error(server.generate(STREAM, text=TEXT, n=0), 422, "invalid_argument")
    assert_error(server.generate({**STREAM, "X-Deadline-Ms": "1"}, text=TEXT, n=4,
                                 candidates=32), 504, "deadline_exceeded")  # fmt: skip


def test_caption_equals_the_python_api(server, model, face_png):
    reply = server.upload("/v1/caption", face_png)
    assert reply.status == 200, reply.body
    assert reply.json() == {"text": model.caption(face_png)}


def test_analyze_one_face_equals_the_python_api(server, model, face_png):
    reply = server.upload("/v1/analyze", face_png, face_crop="true", views=2,
                          attributes="age, beard")  # fmt: skip
    assert reply.status == 200, reply.body
    body = reply.json()
    assert (body["width"], body["height"]) == (64, 64)
    (found,) = body["faces"]
    assert found["box"] == {"x": 0, "y": 0, "w": 64, "h": 64, "score": None}
    want = model.attributes(face_png, ["age", "beard"], views=2)
    assert found["attributes"].keys() == want.keys()
    for name, answer in want.items():
        got = found["attributes"][name]
        assert got["value"] == answer["value"]
        assert got["candidates"] == pytest.approx(answer["candidates"], abs=1e-5)
    assert found["reading"] == pytest.approx(model.reading_quality(face_png))


def test_analyze_finds_the_faces_in_a_photo(server, model):
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.astronaut()  # a real photo with one face
    reply = server.upload("/v1/analyze", encode(photo), attributes="age", views=1)
    assert reply.status == 200, reply.body
    body = reply.json()
    (box,) = FaceDetector().detect(photo)
    (found,) = body["faces"]
    assert found["box"] == {"x": box.x, "y": box.y, "w": box.w, "h": box.h, "score": box.score}
    want = model.attributes(crop_face(photo, box), ["age"], views=1)
    assert found["attributes"]["age"]["value"] == want["age"]["value"]
    assert found["attributes"]["age"]["prob"] == pytest.approx(want["age"]["prob"], abs=1e-5)
    # every attribute the model knows, by default; none for a picture without a face
    blank = server.upload("/v1/analyze", encode(np.full((120, 160, 3), 128, np.uint8)))
    assert blank.status == 200 and blank.json()["faces"] == []


@pytest.mark.parametrize(
    "make",
    [
        lambda rgb: Image.fromarray(rgb).convert("L"),
        lambda rgb: Image.fromarray(rgb).convert("RGBA"),
        lambda rgb: Image.fromarray(rgb).convert("P"),
        lambda rgb: Image.fromarray(rgb).convert("1"),
        lambda rgb: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),  # I;16
        lambda rgb: Image.fromarray(rgb).convert("CMYK"),
    ],
    ids=["gray", "rgba", "palette", "1-bit", "16-bit-gray", "cmyk-jpeg"],
)
def test_every_valid_image_kind_is_read(server, model, face, make):
    """Odd but valid images answer 200, exactly as the Python API reads the same bytes."""
    image = make(face)
    data = encode(image, "JPEG" if image.mode == "CMYK" else "PNG")
    reply = server.upload("/v1/caption", data)
    assert reply.status == 200, reply.body
    assert reply.json()["text"] == model.caption(data)


# -- bad input: each a 4xx of the documented shape, the server healthy after it ------------------


def _json(body: bytes, **headers) -> tuple:
    return ("POST", "/v1/generate", body, {"Content-Type": "application/json", **headers})


def _gen(**fields) -> tuple:
    return _json(json.dumps({"text": TEXT, "candidates": 1, **fields}).encode())


def _upload(path: str, file: bytes | None, **fields) -> tuple:
    body, content_type = form(file, **fields)
    return ("POST", path, body, {"Content-Type": content_type})


def _caption(image: bytes) -> tuple:
    return _upload("/v1/caption", image)


BAD_INPUTS = {
    # images
    "corrupt": (lambda png: _caption(png[:60] + bytes(range(256)) * 2 + png[572:]), 422,
                "image_error"),
    "truncated": (lambda png: _caption(png[: len(png) // 2]), 422, "image_error"),
    "zero-byte": (lambda png: _caption(b""), 422, "image_error"),
    "not an image": (lambda png: _caption(b"just some text, not a picture\n" * 20), 422,
                     "image_error"),
    "postscript": (lambda png: _caption(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"),
                   422, "image_error"),
    "decompression bomb": (lambda png: _caption(png_header(30000, 30000)), 422, "limit_exceeded"),
    "over the pixel limit": (lambda png: _caption(png_header(8000, 6000)), 422, "limit_exceeded"),
    # JSON bodies
    "invalid utf-8": (lambda png: _json(b'{"text": "caf\xe9 \xff"}'), 400, "bad_request"),
    "invalid json": (lambda png: _json(b'{"text": "a man",'), 400, "bad_request"),
    "json not an object": (lambda png: _json(b'["a man"]'), 422, "validation_error"),
    "missing text": (lambda png: _json(b'{"n": 1}'), 422, "validation_error"),
    "unknown field": (lambda png: _gen(seeds=3), 422, "validation_error"),
    "empty text": (lambda png: _gen(text=""), 422, "invalid_argument"),
    "blank text": (lambda png: _gen(text=" \n\t "), 422, "invalid_argument"),
    "overlong text": (lambda png: _gen(text="a" * 2001), 422, "limit_exceeded"),
    "text not a string": (lambda png: _gen(text=["a", "man"]), 422, "validation_error"),
    "n zero": (lambda png: _gen(n=0), 422, "invalid_argument"),
    "n over the limit": (lambda png: _gen(n=65), 422, "limit_exceeded"),
    "n a string": (lambda png: _gen(n="2"), 422, "validation_error"),
    "n a float": (lambda png: _gen(n=2.0), 422, "validation_error"),
    "n a bool": (lambda png: _gen(n=True), 422, "validation_error"),
    "candidates over the limit": (lambda png: _gen(candidates=129), 422, "limit_exceeded"),
    "negative seed": (lambda png: _gen(seed=-1), 422, "invalid_argument"),
    "negative temperature": (lambda png: _gen(temperature=-1), 422, "invalid_argument"),
    "top_p over 1": (lambda png: _gen(top_p=1.5), 422, "invalid_argument"),
    "deadline not a number": (lambda png: _json(json.dumps({"text": TEXT}).encode(),
                                                **{"X-Deadline-Ms": "soon"}), 422,
                              "invalid_argument"),
    "png for many faces": (lambda png: _json(json.dumps({"text": TEXT, "n": 2}).encode(),
                                             Accept="image/png"), 406, "not_acceptable"),
    # multipart bodies
    "unknown attribute": (lambda png: _upload("/v1/analyze", png, attributes="nose", face_crop=1),
                          422, "invalid_argument"),
    "views out of range": (lambda png: _upload("/v1/analyze", png, views=9), 422,
                           "invalid_argument"),
    "views not a number": (lambda png: _upload("/v1/analyze", png, views="many"), 422,
                           "validation_error"),
    "face_crop not a bool": (lambda png: _upload("/v1/analyze", png, face_crop="perhaps"), 422,
                             "validation_error"),
    "greedy not a bool": (lambda png: _upload("/v1/caption", png, greedy="sometimes"), 422,
                          "validation_error"),
    "missing image": (lambda png: _upload("/v1/caption", None, greedy="true"), 422,
                      "validation_error"),
    "image as a text field": (lambda png: _upload("/v1/caption", None, image="face.png"), 422,
                              "validation_error"),
    "invalid utf-8 field": (lambda png: _upload("/v1/analyze", png, attributes=b"\xff\xfeage"),
                            422, "invalid_argument"),  # read as latin-1: no such attribute
    "broken multipart": (lambda png: ("POST", "/v1/caption", b"--nope\r\ngarbage",
                                      {"Content-Type": "multipart/form-data"}), 400,
                         "bad_request"),
    # the wrong kind of request
    "json to an upload route": (lambda png: ("POST", "/v1/caption", b"{}",
                                             {"Content-Type": "application/json"}), 415,
                                "unsupported_media_type"),
    "form to the json route": (lambda png: _upload("/v1/generate", png), 415,
                               "unsupported_media_type"),
    "no content type": (lambda png: ("POST", "/v1/generate", b'{"text": "a man"}', {}), 415,
                        "unsupported_media_type"),
    "unknown route": (lambda png: ("GET", "/v2/faces", None, {}), 404, "not_found"),
    "unknown api route": (lambda png: ("POST", "/v1/draw", b"{}", {}), 404, "not_found"),
    "wrong method": (lambda png: ("GET", "/v1/caption", None, {}), 405, "method_not_allowed"),
    "wrong method on a probe": (lambda png: ("DELETE", "/healthz", None, {}), 405,
                                "method_not_allowed"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_and_the_server_stays_healthy(server, face_png, case):
    make, status, code = BAD_INPUTS[case]
    method, path, body, headers = make(face_png)
    assert_error(server.request(method, path, body, headers), status, code)
    assert server.request("GET", "/readyz").status == 200


def test_wrong_method_names_the_allowed_one(server):
    assert server.request("GET", "/v1/generate").headers["allow"] == "POST"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
     {"Authorization": f"Bearer {KEY}x"}],
    ids=["no key", "wrong key", "wrong scheme", "longer key"],
)  # fmt: skip
def test_api_key_is_required_on_the_api_and_metrics(guarded, face_png, headers):
    reply = guarded.upload("/v1/caption", face_png, headers)
    assert_error(reply, 401, "unauthorized")
    assert reply.headers["www-authenticate"] == "Bearer"
    assert_error(guarded.request("GET", "/metrics", headers=headers), 401, "unauthorized")
    assert guarded.request("GET", "/healthz").status == 200  # probes stay open
    assert guarded.request("GET", "/readyz").status == 200


def test_the_right_key_is_let_in(guarded, model, face_png):
    reply = guarded.upload("/v1/caption", face_png, AUTH)
    assert reply.status == 200 and reply.json()["text"] == model.caption(face_png)


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    """A declared Content-Length over the limit: 413 with no body byte read."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/caption HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert_error(Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()},
                           reply.read()), 413, "payload_too_large")  # fmt: skip
    assert server.request("GET", "/readyz").status == 200


def test_streamed_body_is_cut_off_at_the_limit(server):
    """No Content-Length (chunked): the server counts as it reads and answers 413 long before
    the client has sent everything."""
    chunk = b"x" * 2**16
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/caption HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        while sent < 20 * MAX_BODY_MB * 2**20 and not select.select([sock], [], [], 0.001)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        body = reply.read()
    assert_error(Reply(reply.status, {"content-type": reply.getheader("content-type")}, body),
                 413, "payload_too_large")  # fmt: skip
    assert MAX_BODY_MB * 2**20 <= sent < 4 * MAX_BODY_MB * 2**20
    assert server.request("GET", "/readyz").status == 200


def test_a_deadline_that_cannot_be_met_is_504(server):
    reply = server.generate({"X-Deadline-Ms": "1"}, text=TEXT, n=4, candidates=32)
    assert_error(reply, 504, "deadline_exceeded")


# -- load, overload, metrics, disconnects, shutdown -----------------------------------------------


def test_fifty_concurrent_mixed_requests(server, face_png):
    def one(i: int) -> int:
        if i % 3 == 0:
            return server.generate(text=TEXT, seed=i, candidates=1).status
        if i % 3 == 1:
            return server.upload("/v1/caption", face_png).status
        return server.upload("/v1/analyze", face_png, face_crop="true", views=1,
                             attributes="age,eyewear").status  # fmt: skip

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(one, range(50)))
    assert statuses == [200] * 50


def test_overload_is_429_with_retry_after(guarded):
    """--max-queue 1: a burst of drawings fills the queue, and the rest are refused at once."""

    def draw(i: int) -> Reply:
        return guarded.generate(AUTH, text=TEXT, seed=i, n=2, candidates=16)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(draw, range(8)))
    refused = [r for r in replies if r.status == 429]
    assert refused and all(r.status in (200, 429) for r in replies)
    for r in refused:
        assert_error(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
    metrics = guarded.metrics(AUTH)
    assert metrics['facert_rejected_total{reason="FacertOverloaded"}'] == len(refused)
    assert metrics['facert_http_errors_total{code="overloaded"}'] == len(refused)


def test_metrics_change_as_requests_run(server, face_png):
    before = server.metrics()
    assert server.upload("/v1/caption", face_png).status == 200
    assert_error(server.upload("/v1/caption", b""), 422, "image_error")
    after = server.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('facert_requests_total{task="caption"}') == 1
    assert grew('facert_request_seconds_count{task="caption"}') == 1
    assert grew('facert_tokens_total{task="caption"}') > 5
    assert grew('facert_http_responses_total{route="/v1/caption",status="200"}') == 1
    assert grew('facert_http_errors_total{code="image_error"}') == 1
    assert after["facert_engine_alive"] == 1 and after["facert_slots"] >= 1
    for family in ("facert_queue_depth", "facert_slots_in_use", "facert_step_seconds_count",
                   "facert_time_to_first_token_seconds_count{task=\"caption\"}"):  # fmt: skip
        assert family in after


def test_a_client_that_leaves_cancels_its_request(server):
    """Closing the connection mid-drawing cancels the request (its slots are freed)."""
    cancelled = 'facert_cancelled_total{reason="caller"}'
    before = server.metrics().get(cancelled, 0)
    body = json.dumps({"text": TEXT, "n": 4, "candidates": 32}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        end = time.monotonic() + 20
        while server.metrics()["facert_http_in_flight"] < 1 and time.monotonic() < end:
            time.sleep(0.02)
    end = time.monotonic() + 20
    while server.metrics().get(cancelled, 0) == before and time.monotonic() < end:
        time.sleep(0.05)
    assert server.metrics().get(cancelled, 0) == before + 1
    assert server.metrics()["facert_http_in_flight"] == 0


def test_a_client_that_leaves_a_stream_cancels_its_drawing(server):
    cancelled = 'facert_cancelled_total{reason="caller"}'
    before = server.metrics().get(cancelled, 0)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"text": TEXT, "n": 4, "candidates": 32}).encode()
    conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json", **STREAM})
    reply = conn.getresponse()
    assert reply.status == 200
    read_events(reply, until="progress")
    conn.close()  # mid-drawing: 4 x 32 drawings take far longer than this
    end = time.monotonic() + 20
    while server.metrics().get(cancelled, 0) == before and time.monotonic() < end:
        time.sleep(0.05)
    assert server.metrics().get(cancelled, 0) == before + 1
    assert server.metrics()["facert_http_in_flight"] == 0


def test_the_kiosk_page_is_served_by_facert_alone(server):
    """The page and what it loads come from the package (tests/test_kiosk_page.py runs it)."""
    page = server.request("GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page.body)
    assert sorted(assets) == [b"kiosk/kiosk.css", b"kiosk/kiosk.js"]  # relative: proxy-safe
    for asset in assets:
        reply = server.request("GET", "/" + asset.decode())
        assert reply.status == 200 and reply.body


def test_docs_are_served_without_a_cdn(server):
    page = server.request("GET", "/docs")
    assert page.status == 200 and b"swagger-ui" in page.body
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page.body)
    assert assets and all(a.startswith(b"/") for a in assets), assets
    for asset in assets:
        assert server.request("GET", asset.decode()).status == 200
    schema = server.request("GET", "/openapi.json").json()
    assert {"/v1/generate", "/v1/caption", "/v1/analyze", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )


def _drawing_during_sigterm(tmp_path: Path, grace: str, n: int) -> tuple[Reply, float]:
    """A server drawing n best-of-32 faces when it gets SIGTERM: the drawing's reply, and the
    seconds from the signal to the process's exit (with status 0)."""
    server = Server(tmp_path / "draining.log", "--grace", grace).wait_ready()
    try:
        replies: list[Reply] = []
        client = threading.Thread(
            target=lambda: replies.append(server.generate(text=TEXT, n=n, seed=9, candidates=32))
        )
        client.start()
        end = time.monotonic() + 20
        while server.metrics()["facert_http_in_flight"] < 1 and time.monotonic() < end:
            time.sleep(0.02)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert client.is_alive()  # still drawing: the server drains
        assert_error(server.generate(text=TEXT, candidates=1), 503, "shutting_down")
        assert_error(server.request("GET", "/readyz"), 503, "shutting_down")
        client.join(60)
        assert server.proc.wait(30) == 0
        (reply,) = replies
        return reply, time.monotonic() - signalled
    finally:
        server.stop()


def test_sigterm_lets_a_running_drawing_finish_then_exits_0(tmp_path):
    reply, _ = _drawing_during_sigterm(tmp_path, "30", n=1)
    assert reply.status == 200, reply.body
    face = png_pixels(base64.b64decode(reply.json()["images"][0]["png_base64"]))
    assert face.shape == (64, 64, 3)


def test_sigterm_past_the_grace_cancels_with_503(tmp_path):
    reply, seconds = _drawing_during_sigterm(tmp_path, "0.5", n=8)
    assert_error(reply, 503, "shutting_down")
    assert seconds < 5  # the 8 drawings alone take far longer


def test_sigterm_past_the_grace_ends_a_stream_with_an_error_event(tmp_path):
    """The stream has begun (status 200), so the drain's 503 comes as its last event."""
    server = Server(tmp_path / "draining.log", "--grace", "0.5").wait_ready()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"text": TEXT, "n": 8, "candidates": 32}).encode()
        conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json", **STREAM})
        reply = conn.getresponse()
        assert reply.status == 200
        read_events(reply, until="progress")
        server.proc.send_signal(signal.SIGTERM)
        *progress, (name, data) = read_events(reply, until="error")
        assert {n for n, _ in progress} <= {"progress"}
        assert data["error"]["code"] == "shutting_down" and data["error"]["message"]
        assert reply.read() == b""  # and the stream ends there
        conn.close()
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_bench_serve_writes_its_results(tmp_path, capsys):
    """`facert bench serve`, small: every endpoint at 1 and 2 clients both ways, the overhead."""
    from facert.cli import main

    args = ["bench", "serve", "--concurrency", "1,2", "--requests", "2", "--pairs", "2"]
    assert main([*args, "-o", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    runs = {(r["endpoint"], r["clients"], r["via"]) for r in result["rows"]}
    assert runs == {(e, c, via) for e in ("generate", "caption", "analyze") for c in (1, 2)
                    for via in ("http", "api")}  # fmt: skip
    assert all(r["rps"] > 0 and r["p99"] >= r["p50"] > 0 for r in result["rows"])
    assert set(result["overhead"]) == {"generate", "caption", "analyze"}
    markdown = (tmp_path / "serve.md").read_text()
    assert "overhead p50 ms" in markdown and markdown in capsys.readouterr().out
