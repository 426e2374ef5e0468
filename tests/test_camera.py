"""The camera pipeline on a video file built from real photos (two faces drifting over a photo,
then a cat photo with no face), read by the real bundled model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

import facert
from facert.bench.camera import make_video, matches
from facert.cli import main
from facert.runtime.camera import GREEN, ORANGE, Track, draw, run
from facert.runtime.faces import FaceBox

SECONDS, FPS = 4.0, 15.0
FRAMES = round(SECONDS * FPS)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, list]:
    path = tmp_path_factory.mktemp("camera") / "people.avi"
    return path, make_video(path, SECONDS, FPS)


@pytest.fixture(scope="module")
def model():
    with facert.load() as m:
        yield m


def _face_of(face: dict, truth: list) -> int | None:
    """Which true face (index) a detected face is, or None for a false detection."""
    hits = [k for k, box in enumerate(truth) if matches(tuple(face["box"]), box)]
    return hits[0] if len(hits) == 1 else None


def _starts(records: list[dict]) -> dict[int, list[dict]]:
    """Per track id, the records of the frames its readings started from."""
    starts = defaultdict(list)
    for r in records:
        for face in r["faces"]:
            if face["reading_started"]:
                starts[face["id"]].append(r)
    return starts


def test_every_frame_finds_tracks_and_reads_each_face_once_per_interval(video, model):
    path, truth = video
    records: list[dict] = []
    interval = 0.5
    stats = run(path, model, "age,expression", interval, every_frame=True, views=1,
                on_frame=records.append)  # fmt: skip
    # every frame processed once, in order
    assert stats.frames_read == stats.frames_processed == FRAMES and stats.frames_dropped == 0
    assert [r["frame"] for r in records] == list(range(FRAMES))
    # faces where they are, none elsewhere, and each true face keeps one id
    ids: dict[int, set[int]] = defaultdict(set)
    found = 0
    for r, boxes in zip(records, truth):
        if not boxes:
            assert r["faces"] == [], f"frame {r['frame']} has no face"
        for face in r["faces"]:
            k = _face_of(face, boxes)
            assert k is not None, f"false face {face['box']} in frame {r['frame']}"
            ids[k].add(face["id"])
        found += len(r["faces"])
    assert found >= 0.95 * sum(map(len, truth))
    assert len(ids) == 2 and all(len(v) == 1 for v in ids.values())
    assert ids[0] != ids[1] and stats.tracks == 2
    # readings: at most one per face per interval of video time, one at a time, and each
    # finished reading follows its face in the later frames
    starts = _starts(records)
    assert set(starts) == {1, 2}
    for tid, started in starts.items():
        frames = [r["frame"] for r in started]
        assert len(frames) == len(set(frames))
        times = [r["t"] for r in started]
        assert all(b - a >= interval - 1e-9 for a, b in zip(times, times[1:]))
        assert len(times) <= SECONDS * 0.6 / interval + 1
        for before, after in zip(started, started[1:]):  # the previous one had finished
            face = next(f for f in after["faces"] if f["id"] == tid)
            assert face["reading"]["frame"] == before["frame"]
    assert stats.readings_started == sum(map(len, starts.values()))
    assert stats.readings_done >= 2 and stats.readings_failed == 0
    read = [f["reading"] for r in records for f in r["faces"] if f["reading"]]
    assert read and all(set(x["attributes"]) == {"age", "expression"} for x in read)
    assert all(x["reliable"] in (True, False, None) and x["quality_db"] > 0 for x in read)
    values = {x["attributes"]["age"]["value"] for x in read}
    assert values <= set(model.config.attributes["age"])
    json.dumps(records)  # what --jsonl writes


def test_real_time_latest_frame_wins_with_a_slow_consumer(video, model):
    """A file played at its frame rate into a consumer slower than the camera: frames are
    dropped, never queued, so each frame drawn is recent and the last drawn is near the end."""
    path, _ = video
    records: list[dict] = []

    def slow_display(record: dict) -> None:
        records.append(record)
        time.sleep(0.2)  # 3 frame periods at 15 frames/s

    stats = run(path, model, "age", interval=0.1, views=1, on_frame=slow_display)
    assert stats.frames_read == FRAMES
    assert stats.frames_processed + stats.frames_dropped == FRAMES
    assert stats.frames_dropped > FRAMES / 2
    assert stats.seconds >= SECONDS - 0.1  # played in real time
    frames = [r["frame"] for r in records]
    assert frames == sorted(set(frames)) and frames[-1] >= FRAMES - 5
    # a queue would make latency grow frame after frame; the newest frame keeps it bounded
    assert max(r["latency_ms"] for r in records) < 800
    # readings go on beside it, at most one per face shown in a processed frame
    assert 2 <= stats.readings_started <= sum(len(r["faces"]) for r in records)


def test_overlay_marks_unreliable_readings():
    canvas = np.zeros((200, 200, 3), np.uint8)
    reading = {"frame": 0, "t": 0.0, "attributes": {"age": {"value": "old", "prob": 0.9}}}
    good = Track(1, FaceBox(20, 20, 60, 60, 1.0), 0.0, last={**reading, "reliable": True})
    bad = Track(2, FaceBox(110, 20, 60, 60, 1.0), 0.0, last={**reading, "reliable": False})
    draw(canvas, [good, bad])
    assert (canvas[20, 20:80] == GREEN).all()
    assert (canvas[20, 110:170] == ORANGE).all()


def test_cli_writes_json_lines_and_an_annotated_video(tmp_path, capsys):
    path, out, jsonl = tmp_path / "short.avi", tmp_path / "annotated.avi", tmp_path / "faces.jsonl"
    truth = make_video(path, seconds=2.0, fps=FPS)
    code = main(["camera", "--source", str(path), "--every-frame", "--attributes", "age",
                 "--views", "1", "--out", str(out), "--jsonl", str(jsonl)])  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(len(truth)))
    counts = [(len(r["faces"]), len(boxes)) for r, boxes in zip(lines, truth)]
    assert all(n == 0 for n, want in counts if want == 0)
    assert sum(n == want for n, want in counts if want) >= 0.9 * sum(1 for _, w in counts if w)
    assert "processed" in capsys.readouterr().out
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(truth)
    ok, first = cap.read()
    assert ok and first.shape == (360, 480, 3)


def test_cli_says_what_is_wrong_in_one_line(video, tmp_path, capsys):
    path, _ = video
    assert main(["camera", "--source", str(tmp_path / "missing.avi")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.avi does not exist")
    assert main(["camera", "--source", str(path), "--attributes", "shoe size"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facert: error: unknown attribute(s) shoe size") and "\n" not in err


def test_kiosk_example_greets_the_people_in_a_video(video):
    path, _ = video
    kiosk = Path(__file__).parents[1] / "examples" / "kiosk.py"
    done = subprocess.run([sys.executable, str(kiosk), str(path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Hello! You look" in done.stdout and f"{FRAMES} frames" in done.stdout
