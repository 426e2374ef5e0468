"""`facert bench soak`: `facert serve` under minutes of mixed load, watched for leaks and for
answers it should not give.

C clients, each on its own keep-alive connection, send back to back a random mix of well-formed
calls (faces drawn as JSON or as a PNG, captions and attribute readings of faces the server drew
for that client, attribute readings of a photo the server has to find the face in) and a
steady trickle of malformed ones, each kind with the 4xx status it must get. No call carries a
deadline, so every well-formed call must succeed (or be refused with 429 when the queue is
full): any other answer, and any connection that fails, is counted and kept with its body.
Meanwhile the server process's resident memory, threads and open files are read from /proc
every few seconds; growth is measured from the end of the warm-up (the first 20 % of the run or
the first minute, whichever is longer: caches, pools and the allocator's arenas fill first) to
the end of the run.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from facert.runtime.errors import FacertError, InvalidArgument

from .machine import describe
from .report import machine_line, table, write
from .serve import BOUNDARY, ServerProcess, multipart
from .timing import summary_ms

GROWTH_TARGET_PCT = 5.0
WARMUP_SHARE, WARMUP_MIN_S = 0.2, 60.0
TEXTS = [
    "a smiling young woman with long blonde hair and glasses",
    "an old bald man with a grey beard",
    "a serious man with short black hair",
    "a young woman with curly red hair and a hat",
]
# Well-formed calls by weight; one call in about ten is malformed.
MIX = {"generate": 3, "caption": 3, "analyze face_crop=true": 2, "analyze face_crop=false": 2,
       "malformed": 1}  # fmt: skip
POOL = 16  # faces each client keeps from its drawings, to caption and read
TIMEOUT_S = 120.0
KEPT_BODIES = 20  # unexpected answers kept with their bodies (all are counted)


@dataclass
class Call:
    """One HTTP request and the status it must get (None: a 2xx, or 429 when overloaded)."""

    label: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expected: int | None = None

    def intended(self, status: int) -> bool:
        if self.expected is None:
            return 200 <= status < 300 or status == 429
        return status == self.expected


def _json(label: str, expected: int | None = None, accept: str = "application/json",
          **fields: object) -> Call:  # fmt: skip
    return Call(label, "POST", "/v1/generate", json.dumps(fields).encode(),
                {"Content-Type": "application/json", "Accept": accept}, expected)  # fmt: skip


def _upload(label: str, path: str, image: bytes, expected: int | None = None,
            **fields: str) -> Call:  # fmt: skip
    body, content_type = multipart(image, **fields)
    return Call(label, "POST", path, body, {"Content-Type": content_type}, expected)


def malformed(face: bytes) -> list[Call]:
    """Calls a client gets wrong, each with the status the README promises for it."""
    return [
        Call("bad: not JSON", "POST", "/v1/generate", b'{"text": ',
             {"Content-Type": "application/json"}, 400),
        _json("bad: wrong type", 422, text=TEXTS[0], n="two"),
        _json("bad: unknown field", 422, text=TEXTS[0], colour="red"),
        _json("bad: too many faces", 422, text=TEXTS[0], n=10**6),
        _json("bad: PNG of two faces", 406, "image/png", text=TEXTS[0], n=2, candidates=1),
        Call("bad: broken multipart", "POST", "/v1/caption", b"no boundary in sight",
             {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, 400),
        _upload("bad: not an image", "/v1/caption", b"GIF89a but not really", 422),
        _upload("bad: unknown attribute", "/v1/analyze", face, 422, attributes="shoe size",
                face_crop="true"),
        _upload("bad: views=0", "/v1/analyze", face, 422, views="0", face_crop="true"),
        Call("bad: JSON to caption", "POST", "/v1/caption", b"{}",
             {"Content-Type": "application/json"}, 415),
        Call("bad: body over the limit", "POST", "/v1/caption", None,
             {"Content-Type": "multipart/form-data", "Content-Length": str(2**30)}, 413),
        Call("bad: GET generate", "GET", "/v1/generate", expected=405),
        Call("bad: no such path", "POST", "/v1/nothing", b"{}",
             {"Content-Type": "application/json"}, 404),
    ]  # fmt: skip


def photos() -> list[bytes]:
    """A real photo with one face (scikit-image's astronaut), mirrored and cropped four ways so
    that the server's prefix cache sees new faces, as PNG."""
    import skimage.data

    photo = skimage.data.astronaut()
    variants = [photo, photo[:, ::-1], photo[16:, 16:], photo[:-16, ::-1]]
    out = []
    for v in variants:
        data = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(v)).save(data, "PNG")
        out.append(data.getvalue())
    return out


@dataclass
class Record:
    """One answer: its call's label, status (0: no answer), seconds and when it came."""

    label: str
    status: int
    seconds: float
    at_s: float


@dataclass
class Client:
    """One client on one keep-alive connection: a random mix of calls until `stop_at`."""

    index: int
    clients: int
    port: int
    start: float
    stop_at: float
    photos: list[bytes]
    bad: list[Call]
    faces: list[bytes]
    records: list[Record] = field(default_factory=list)
    unexpected: list[dict] = field(default_factory=list)

    def run(self) -> Client:
        rng = np.random.default_rng(self.index)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        kinds, weights = list(MIX), np.array(list(MIX.values()), dtype=float)
        # every malformed kind once at the start, shared out among the clients; then in turn
        first = self.bad[self.index :: self.clients]
        sent_bad = self.index
        while time.monotonic() < self.stop_at:
            kind = "first" if first else kinds[rng.choice(len(kinds), p=weights / weights.sum())]
            if kind == "first":
                call = first.pop(0)
            elif kind == "malformed":
                call = self.bad[sent_bad % len(self.bad)]
                sent_bad += 1
            else:
                call = self._call(kind, rng)
            status, body, seconds = _send(conn, call)
            self.records.append(Record(call.label, status, seconds, time.monotonic() - self.start))
            if not call.intended(status):
                self.unexpected.append({"label": call.label, "status": status,
                                        "expected": call.expected or "2xx or 429",
                                        "at_s": round(self.records[-1].at_s, 1),
                                        "body": body[:500].decode(errors="replace")})  # fmt: skip
            elif kind == "generate" and status == 200:
                self._keep(call, body, rng)
        conn.close()
        return self

    def _call(self, kind: str, rng: np.random.Generator) -> Call:
        face = self.faces[rng.integers(len(self.faces))]
        if kind == "generate":
            text, seed = TEXTS[rng.integers(len(TEXTS))], int(rng.integers(2**31))
            if rng.random() < 0.5:
                return _json(kind, accept="image/png", text=text, seed=seed, candidates=1)
            return _json(kind, text=text, seed=seed, n=int(rng.integers(1, 3)), candidates=1)
        if kind == "caption":
            if rng.random() < 0.5:
                return _upload(kind, "/v1/caption", face)
            return _upload(kind, "/v1/caption", face, greedy="false", seed=str(rng.integers(99)))
        if kind == "analyze face_crop=true":
            return _upload(kind, "/v1/analyze", face, face_crop="true", views="1")
        photo = self.photos[rng.integers(len(self.photos))]
        return _upload(kind, "/v1/analyze", photo, face_crop="false", views="1")

    def _keep(self, call: Call, body: bytes, rng: np.random.Generator) -> None:
        """Keep a drawn face to caption and read later (the pool's oldest or a random one goes)."""
        if call.headers["Accept"] == "image/png":
            faces = [body]
        else:
            faces = [base64.b64decode(i["png_base64"]) for i in json.loads(body)["images"]]
        for face in faces:
            if len(self.faces) < POOL:
                self.faces.append(face)
            else:
                self.faces[rng.integers(POOL)] = face


def _send(conn: http.client.HTTPConnection, call: Call) -> tuple[int, bytes, float]:
    """(status, body, seconds); status 0 and the error as the body when no answer came. The
    connection reopens by itself after an answer that closed it."""
    start = time.perf_counter()
    try:
        conn.request(call.method, call.path, call.body, call.headers)
        reply = conn.getresponse()
        body = reply.read()
        status = reply.status
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        status, body = 0, f"{type(e).__name__}: {e}".encode()
    return status, body, time.perf_counter() - start


def _first_face(port: int) -> bytes:
    """A face the server draws, for the clients' first uploads."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    status, body, _ = _send(conn, _json("generate", accept="image/png", text=TEXTS[0], seed=0,
                                        candidates=1))  # fmt: skip
    conn.close()
    if status != 200:
        raise FacertError(f"the server drew no face: {status} {body[:300]!r}")
    return body


def _process(pid: int) -> dict:
    """The process's resident memory (all, and anonymous: its heap), in MiB; threads; files."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()[0] if value.strip() else ""
    return {
        "rss_mib": int(fields["VmRSS"]) / 1024,
        "anon_mib": int(fields["RssAnon"]) / 1024,
        "threads": int(fields["Threads"]),
        "files": len(os.listdir(f"/proc/{pid}/fd")),
    }


def _sample(pid: int, start: float, interval: float, stop: threading.Event, out: list) -> None:
    while True:
        out.append({"t_s": time.monotonic() - start, **_process(pid),
                    "load": os.getloadavg()[0]})  # fmt: skip
        if stop.wait(interval):
            return


def _readyz(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    status, body, seconds = _send(conn, Call("readyz", "GET", "/readyz"))
    conn.close()
    return {"status": status, "ms": seconds * 1e3, "body": body[:500].decode(errors="replace")}


def measure(model: str | None, minutes: float, clients: int) -> dict:
    duration = minutes * 60
    warmup = max(WARMUP_SHARE * duration, WARMUP_MIN_S)
    interval = min(5.0, max(0.5, duration / 60))  # 60 samples in a short run, one per 5 s else
    images = photos()
    with ServerProcess(model) as server:
        face = _first_face(server.port)
        samples: list[dict] = []
        stop = threading.Event()
        start = time.monotonic()
        sampler = threading.Thread(
            target=_sample, args=(server.proc.pid, start, interval, stop, samples)
        )
        sampler.start()
        bad = malformed(face)
        team = [Client(i, clients, server.port, start, start + duration, images, bad, [face])
                for i in range(clients)]  # fmt: skip
        with ThreadPoolExecutor(clients) as pool:
            running = [pool.submit(c.run) for c in team]
            while wait(running, timeout=min(60.0, duration / 4)).not_done:
                done = sum(len(c.records) for c in team)
                print(f"soak: {time.monotonic() - start:.0f} s, {done} answers, RSS "
                      f"{samples[-1]['rss_mib']:.0f} MiB", file=sys.stderr)  # fmt: skip
            for f in running:
                f.result()
        stop.set()
        sampler.join()
        samples.append({"t_s": time.monotonic() - start, **_process(server.proc.pid),
                        "load": os.getloadavg()[0]})  # fmt: skip
        ready = _readyz(server.port)
        log = server.output()
    records = [r for c in team for r in c.records]
    unexpected = [u for c in team for u in c.unexpected]
    return {
        "model": model or "bundled",
        "duration_s": duration,
        "warmup_s": warmup,
        "sample_interval_s": interval,
        "endpoints": _endpoints(records, bad),
        "unexpected": {
            "count": len(unexpected),
            "outside_2xx_4xx": sum(not 200 <= u["status"] < 500 for u in unexpected),
            "kept": sorted(unexpected, key=lambda u: u["at_s"])[:KEPT_BODIES],
        },
        "memory": _memory(samples, warmup, duration),
        "samples": samples,
        "answers_per_10s": np.bincount([int(r.at_s // 10) for r in records
                                        if r.at_s < duration]).tolist(),  # fmt: skip
        "readyz_at_end": ready,
        "server_exit_code": server.proc.returncode,
        "server_log": [line for line in log.splitlines()
                       if "WARNING" in line or "ERROR" in line or "Traceback" in line],
    }  # fmt: skip


def _endpoints(records: list[Record], bad: list[Call]) -> dict:
    """Per call label: answers by status, latency, and the status a malformed kind must get."""
    expected = {c.label: c.expected for c in bad}
    out = {}
    for label in [*(k for k in MIX if k != "malformed"), *expected]:
        mine = [r for r in records if r.label == label]
        statuses: dict[str, int] = {}
        for r in mine:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        latency = summary_ms([r.seconds for r in mine]) if mine else {"n": 0}
        out[label] = {"expected": expected.get(label), "statuses": statuses, **latency}
    return out


def _memory(samples: list[dict], warmup: float, duration: float) -> dict:
    """The process at the start, after warm-up, at the end of the load and once its last calls
    are answered, and its growth under load from the warm-up mark to the end."""
    loaded = [s for s in samples[:-1] if s["t_s"] < duration]
    after = [s for s in loaded if s["t_s"] >= warmup]
    warm = after[0] if len(after) > 1 else None  # none when the run is no longer than warm-up
    out = {"start": samples[0], "warm": warm, "end": loaded[-1], "idle": samples[-1],
           "peak_rss_mib": max(s["rss_mib"] for s in samples), "growth_pct": None,
           "slope_mib_per_h": None}  # fmt: skip
    if warm is not None:
        out["growth_pct"] = (loaded[-1]["rss_mib"] / warm["rss_mib"] - 1) * 100
        t, rss = [s["t_s"] for s in after], [s["rss_mib"] for s in after]
        out["slope_mib_per_h"] = float(np.polyfit(t, rss, 1)[0] * 3600)
    return out


def markdown(result: dict) -> str:
    load = [s["load"] for s in result["samples"]]
    mem, minutes = result["memory"], result["duration_s"] / 60
    lines = [
        "### soak: `facert serve` under mixed load\n",
        machine_line(result["machine"]),
        "",
        f"Model {Path(result['model']).name}, {minutes:g} minutes, {result['clients']} clients "
        "sending back to back on keep-alive connections (each call drawn at random: "
        + ", ".join(f"{k} {v}" for k, v in MIX.items())
        + " in weight; a malformed call is the next kind in turn below). Generate draws one "
        "face (candidates=1) as a PNG, or one or two as JSON; caption and analyze with "
        "face_crop=true upload faces the server drew for that client; analyze with "
        "face_crop=false uploads a 512 px photo (scikit-image's astronaut, four variants) "
        "whose face the server finds; no call carries a deadline. The benchmark's clients "
        "share the machine's cores with the server, and so did other people's jobs: the load "
        f"average was {result['load_average'][0]:.1f} at the start, {np.mean(load):.1f} on "
        f"average over the run and {result['load_average'][1]:.1f} at the end, so latency "
        "is this machine's on that day.",
        "",
    ]
    rows = []
    for label, e in result["endpoints"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(e["statuses"].items()))
        want = "2xx / 429" if e["expected"] is None else e["expected"]
        rows.append([label, e["n"], want, statuses or "—", e.get("p50"), e.get("p99")])
    lines.append(table(["call", "requests", "intended", "answers", "p50 ms", "p99 ms"], rows))
    unexpected = result["unexpected"]
    lines += ["", f"Answers other than the intended one: {unexpected['count']}, of which outside "
              f"2xx / 4xx / 429 (or no answer): {unexpected['outside_2xx_4xx']}."]  # fmt: skip
    for u in unexpected["kept"]:
        lines.append(f"- {u['at_s']} s, {u['label']}: {u['status']} (intended {u['expected']}): "
                     f"`{u['body'][:200]}`")  # fmt: skip
    lines += ["", f"The server process, sampled every {result['sample_interval_s']:g} s from "
              f"/proc (warm-up: the first {result['warmup_s']:.0f} s):", ""]  # fmt: skip
    marks = [("start", mem["start"]), ("after warm-up", mem["warm"]), ("end", mem["end"]),
             ("after the last answers", mem["idle"])]  # fmt: skip
    rows = [[name, s["t_s"], s["rss_mib"], s["anon_mib"], s["threads"], s["files"]]
            if s is not None else [name, None, None, None, None, None]
            for name, s in marks]  # fmt: skip
    lines.append(table(["when", "s", "RSS MiB", "anonymous MiB", "threads", "open files"], rows))
    if mem["growth_pct"] is None:
        growth = "not measured: the run was no longer than its warm-up"
    else:
        met = "met" if mem["growth_pct"] < GROWTH_TARGET_PCT else "not met"
        growth = (f"{mem['growth_pct']:+.1f} % (target < {GROWTH_TARGET_PCT:g} %): {met}; "
                  f"fitted slope {mem['slope_mib_per_h']:+.0f} MiB/h")  # fmt: skip
    ready = result["readyz_at_end"]
    lines += [
        "",
        f"- RSS growth after warm-up: {growth}; peak RSS {mem['peak_rss_mib']:.0f} MiB",
        f"- /readyz at the end: {ready['status']} in {ready['ms']:.0f} ms",
        f"- the server drained and exited with status {result['server_exit_code']}; its log "
        f"had {len(result['server_log'])} warning or error lines",
    ]
    return "\n".join(lines)


def plot(result: dict, fig) -> None:
    memory, answers = fig.subplots(1, 2)
    t = [s["t_s"] / 60 for s in result["samples"]]
    memory.plot(t, [s["rss_mib"] for s in result["samples"]], label="RSS")
    memory.plot(t, [s["anon_mib"] for s in result["samples"]], label="anonymous")
    memory.axvline(result["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
    memory.set(xlabel="minutes", ylabel="MiB", title="server memory")
    memory.set_ylim(bottom=0)
    memory.legend()
    per_10s = result["answers_per_10s"]
    answers.plot(np.arange(len(per_10s)) / 6, np.array(per_10s) / 10)
    answers.set(xlabel="minutes", ylabel="answers/s", title="answers per second (10 s bins)")
    answers.set_ylim(bottom=0)


def run(model: str | None, minutes: float, clients: int, output: Path | None) -> None:
    """`facert bench soak`: run, print the tables, write soak.json / .md / .png."""
    if not minutes > 0 or clients < 1:
        raise InvalidArgument("--minutes must be positive and --clients at least 1")
    load_before = os.getloadavg()[0]
    machine = describe()
    machine["versions"].update({p: metadata.version(p) for p in ("fastapi", "uvicorn")})
    result = {"scenario": "soak", "machine": machine, "minutes": minutes, "clients": clients,
              **measure(model, minutes, clients)}  # fmt: skip
    result["load_average"] = [load_before, os.getloadavg()[0]]
    text = markdown(result)
    print(text)
    for line in write(output, "soak", result, text, plot):
        print(f"wrote {line}" if not line.startswith("no ") else line)
