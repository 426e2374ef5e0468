"""A kiosk that greets the person in front of its camera, built on facert's Python API.

    python examples/kiosk.py            # camera 0
    python examples/kiosk.py video.mp4  # a video file, as fast as it decodes

The capture loop never waits for the model: a reading is a Future from `m.submit`, checked
once per frame, and a new one starts only when the last is done and READ_EVERY_S has passed.
(`facert camera` is the full pipeline: many faces, tracking, overlay, statistics.)
"""

from __future__ import annotations

import sys
import time

import cv2

import facert
from facert.runtime.faces import FaceDetector, crop_face

READ_EVERY_S = 2.0
ATTRIBUTES = ["age", "expression"]


def greeting(answers: dict) -> str:
    """What the kiosk says for one reading (the bundled model learned drawn faces, so on real
    photos its answers are a demonstration, not a measurement)."""
    age, mood = answers["age"]["value"], answers["expression"]["value"]
    return f"Hello! You look {age} and {mood} (p={answers['age']['prob']:.2f})."


def main(source: str | int = 0) -> None:
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        sys.exit(f"kiosk: cannot open {source}")
    detector = FaceDetector(min_size=60)  # the visitor stands close
    pending, last_start, frames = None, -READ_EVERY_S, 0
    with facert.load() as m:  # the bundled model; facert.load("models/talk2face") for yours
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames += 1
            frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if pending is not None and pending.done():
                try:
                    print(f"frame {frames}: {greeting(pending.result())}", flush=True)
                except facert.FacertError as e:  # overloaded, unreadable face...
                    print(f"frame {frames}: could not read the face ({e})", flush=True)
                pending = None
            faces = detector.detect(frame)
            if faces and pending is None and time.monotonic() - last_start >= READ_EVERY_S:
                visitor = max(faces, key=lambda box: box.w * box.h)  # the nearest person
                pending = m.submit("attributes", crop_face(frame, visitor), ATTRIBUTES)
                last_start = time.monotonic()
        if pending is not None:
            print(f"last reading: {greeting(pending.result())}")
    capture.release()
    print(f"{frames} frames")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else 0)
