"""`facert bench detectors` and `facert bench camera`.

detectors: which face detector facert's camera pipeline uses, chosen on real photos that PyPI
packages ship (nothing here can be downloaded): scikit-image's bundled photos and its LFW subset,
and matplotlib's portrait of Grace Hopper. Each candidate that is installed runs on the same
photos; one that is missing is listed with the reason.

camera: the capture pipeline (runtime/camera.py) on a video file built from those photos, as fast
as it can go: frames per second captured and analysed, and the latency from a frame's capture to
its overlay, with the detector alone and with the model's attribute answers.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facert.bench.machine import describe
from facert.bench.report import machine_line, table

Box = tuple[int, int, int, int]  # x, y, w, h
MIN_SIZE = 40
# Photos with faces and where each face is (x, y, w, h: brows to chin, found by eye).
FACES: dict[str, list[Box]] = {
    "astronaut": [(177, 75, 93, 93)],
    "camera": [(180, 122, 84, 84)],
    "grace_hopper": [(175, 142, 190, 190)],
}
# scikit-image photos (all in its wheel) with no face in them.
NO_FACES = (
    "brick", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
    "rocket", "text",
)  # fmt: skip
LFW_SIDE = 100  # LFW's 25-pixel faces are enlarged to this and framed with their edge pixels


def rgb(image: np.ndarray) -> np.ndarray:
    """Any scikit-image photo (bool, gray, RGBA) -> uint8 RGB [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def photo(name: str) -> np.ndarray:
    """A real photo by name, from the wheel of the package that ships it."""
    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return rgb(np.asarray(Image.open(f).convert("RGB")))
    import skimage.data

    return rgb(getattr(skimage.data, name)())


def _half(image: np.ndarray, boxes: list[Box]) -> tuple[np.ndarray, list[Box]]:
    import cv2

    small = cv2.resize(
        image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA
    )
    return small, [tuple(v // 2 for v in b) for b in boxes]


def _lfw(patch: np.ndarray) -> np.ndarray:
    """A 25x25 LFW patch (float gray) enlarged to LFW_SIDE and framed by half that on each side."""
    import cv2

    big = cv2.resize(rgb(patch), (LFW_SIDE, LFW_SIDE), interpolation=cv2.INTER_CUBIC)
    return np.pad(big, ((LFW_SIDE // 2,) * 2, (LFW_SIDE // 2,) * 2, (0, 0)), mode="edge")


def lfw() -> tuple[list[tuple[np.ndarray, Box]], list[np.ndarray]]:
    """scikit-image's LFW subset, framed: ([(face image, its box)] x 100, [non-face] x 100)."""
    import skimage.data

    patches = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces
    edge = LFW_SIDE // 2
    faces = [(_lfw(p), (edge, edge, LFW_SIDE, LFW_SIDE)) for p in patches[:100]]
    return faces, [_lfw(p) for p in patches[100:]]


def photos() -> tuple[list[tuple[str, np.ndarray, list[Box]]], list[tuple[str, np.ndarray]]]:
    """(with faces: name, image, face boxes), (without faces: name, image). Faces: the three
    portraits at full and half size (small faces, as a camera across a room sees them), and
    scikit-image's 100 LFW faces; no faces: its photos of other things and LFW's 100 patches of
    non-faces, framed the same way."""
    with_faces, without = [], []
    for name, boxes in FACES.items():
        try:
            image = photo(name)
        except ImportError:  # matplotlib is only in the bench extra
            continue
        with_faces.append((name, image, boxes))
        with_faces.append((f"{name} (half size)", *_half(image, boxes)))
    faces, non_faces = lfw()
    with_faces += [(f"lfw {i}", image, [box]) for i, (image, box) in enumerate(faces)]
    without += [(name, photo(name)) for name in NO_FACES]
    without += [(f"lfw non-face {i}", image) for i, image in enumerate(non_faces)]
    return with_faces, without


def matches(found: Box, face: Box) -> bool:
    """A detection is of a face when its centre lies in the face's box and its side is within
    0.4-2.5x the face's (detectors frame faces differently: Haar boxes are wider than LFW's)."""
    x, y, w, h = found
    cx, cy = x + w / 2, y + h / 2
    fx, fy, fw, fh = face
    return fx <= cx <= fx + fw and fy <= cy <= fy + fh and 0.4 <= w / fw <= 2.5


Detect = Callable[[np.ndarray], list[Box]]


def _facert(cascade: str, neighbors: int) -> Detect:
    from facert.runtime.faces import FaceDetector

    detector = FaceDetector(MIN_SIZE, cascade=cascade, min_neighbors=neighbors)
    detector.detect(np.zeros((64, 64, 3), np.uint8))  # loads the cascade (or says why not)
    return lambda image: [(b.x, b.y, b.w, b.h) for b in detector.detect(image)]


def _skimage_lbp() -> Detect:
    import skimage.data
    import skimage.feature

    cascade = skimage.feature.Cascade(skimage.data.lbp_frontal_face_cascade_filename())

    def detect(image: np.ndarray) -> list[Box]:
        gray = image.mean(axis=2) / 255
        found = cascade.detect_multi_scale(
            gray, scale_factor=1.1, step_ratio=1, min_size=(MIN_SIZE, MIN_SIZE),
            max_size=gray.shape,
        )  # fmt: skip
        return [(d["c"], d["r"], d["width"], d["height"]) for d in found]

    return detect


def _dlib(upsample: int) -> Detect:
    import dlib

    hog = dlib.get_frontal_face_detector()
    return lambda image: [(r.left(), r.top(), r.width(), r.height()) for r in hog(image, upsample)]


def _mediapipe() -> Detect:
    import mediapipe as mp

    blaze = mp.solutions.face_detection.FaceDetection(model_selection=0)

    def detect(image: np.ndarray) -> list[Box]:
        height, width = image.shape[:2]
        boxes = []
        for d in blaze.process(image).detections or []:
            b = d.location_data.relative_bounding_box
            boxes.append((round(b.xmin * width), round(b.ymin * height), round(b.width * width),
                          round(b.height * height)))  # fmt: skip
        return boxes

    return detect


def candidates() -> list[tuple[str, str, Callable[[], Detect]]]:
    """(name, where its weights come from, make): every detector compared."""
    haar = "opencv-contrib-python-headless (cv2.data)"
    rows = []
    for variant in ("default", "alt", "alt2"):
        cascade = f"haarcascade_frontalface_{variant}.xml"
        rows += [
            (f"OpenCV Haar {variant} n={n}", haar, lambda c=cascade, n=n: _facert(c, n))
            for n in (3, 5)
        ]
    rows += [
        ("scikit-image LBP Cascade", "scikit-image", _skimage_lbp),
        ("dlib HOG", "dlib-bin (built in)", lambda: _dlib(0)),
        ("dlib HOG, 2x upsampled", "dlib-bin (built in)", lambda: _dlib(1)),
        ("MediaPipe BlazeFace short", "mediapipe 0.10.21 (wheel's tflite)", _mediapipe),
    ]
    return rows


def _frame() -> np.ndarray:
    """A 640x480 frame with one face: the astronaut photo enlarged and cut, for timing."""
    import cv2

    return cv2.resize(photo("astronaut"), (640, 640))[80:560]


def evaluate(detect: Detect, with_faces: list, without: list) -> dict:
    """Recall and false detections of one detector on the photos."""
    found, missed, false = 0, [], {}
    for name, image, faces in with_faces:
        boxes = detect(image)
        hits = [any(matches(b, f) for b in boxes) for f in faces]
        found += sum(hits)
        missed += [name] * (len(hits) - sum(hits))
        if extra := [b for b in boxes if not any(matches(b, f) for f in faces)]:
            false[name] = len(extra)
    for name, image in without:
        if boxes := detect(image):
            false[name] = len(boxes)
    return {
        "faces": found + len(missed),
        "found": found,
        "recall": found / (found + len(missed)),
        "false_detections": sum(false.values()),
        "images_with_false_detections": len(false),
        "images": len(with_faces) + len(without),
        "missed": missed,
        "false_in": false,
    }


def timings(detectors: dict[str, Detect], rounds: int = 10) -> dict[str, list[float]]:
    """Seconds per 640x480 frame, each detector once per round in turn, so that other work
    on the machine slows them all alike."""
    frame = _frame()
    times: dict[str, list[float]] = {name: [] for name in detectors}
    for _ in range(rounds + 1):  # the first round warms up
        for name, detect in detectors.items():
            start = time.perf_counter()
            detect(frame)
            times[name].append(time.perf_counter() - start)
    return {name: t[1:] for name, t in times.items()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("opencv-contrib-python-headless", "opencv-python-headless", "scikit-image",
                "dlib-bin", "mediapipe", "matplotlib"):  # fmt: skip
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_detectors(output: Path | None, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Compare every installed candidate; write detectors.json/md into output."""
    with_faces, without = photos()
    rows, detectors = [], {}
    for name, weights, make in candidates():
        progress(name)
        try:
            detectors[name] = make()
        except Exception as e:  # a missing package, or one that cannot load its model here
            rows.append(
                {"detector": name, "weights": weights, "skipped": f"{type(e).__name__}: {e}"}
            )
            continue
        rows.append(
            {"detector": name, "weights": weights, **evaluate(detectors[name], with_faces, without)}
        )
    progress("timing")
    times = timings(detectors)
    for row in rows:
        if (t := times.get(row["detector"])) is not None:
            row["ms_per_640x480"] = 1000 * min(t)
            row["ms_per_640x480_median"] = 1000 * statistics.median(t)
    machine = describe()
    machine["versions"].update(_versions())
    result = {
        "machine": machine,
        "photos_with_faces": [n for n, *_ in with_faces],
        "photos_without_faces": [n for n, _ in without],
        "min_size": MIN_SIZE,
        "rows": rows,
    }
    result["markdown"] = markdown(result)
    _write(output, "detectors", result, result["markdown"])
    return result


def _write(output: Path | None, name: str, result: dict, text: str) -> None:
    """NAME.json and NAME.md (no plot: the tables are the result)."""
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (output / f"{name}.md").write_text(text + "\n")


def markdown(result: dict) -> str:
    done = [r for r in result["rows"] if "skipped" not in r]
    faces = done[0]["faces"] if done else 0
    n_without = len(result["photos_without_faces"])
    lines = [
        "### detectors: faces in real photos",
        "",
        machine_line(result["machine"]),
        "",
        f"{len(result['photos_with_faces'])} photos with {faces} faces (astronaut, cameraman and "
        "Grace Hopper at full and half size, and scikit-image's 100 LFW faces enlarged 4x), "
        f"{n_without} without (scikit-image's photos of other things and LFW's 100 non-face "
        f"patches). Faces at least {result['min_size']} px. A detection counts when its centre "
        "is in the face's box and its side is 0.4-2.5x the face's; every other detection is "
        "false. Time: the best of 10 runs on one 640x480 frame, the detectors taking turns (the 2 "
        "cores were shared with other work; the medians are in detectors.json).",
        "",
        table(
            [
                "detector",
                "weights from",
                "faces found",
                "recall",
                "false detections",
                "images with false",
                "ms / 640x480",
            ],  # fmt: skip
            [
                [
                    r["detector"],
                    r["weights"],
                    f"{r['found']}/{r['faces']}",
                    f"{r['recall']:.0%}",
                    r["false_detections"],
                    f"{r['images_with_false_detections']}/{r['images']}",
                    r["ms_per_640x480"],
                ]  # fmt: skip
                for r in done
            ],
        ),
    ]
    skipped = [r for r in result["rows"] if "skipped" in r]
    if skipped:
        lines += ["", "Not run here:"] + [f"- {r['detector']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines)


# The test and benchmark video: two people (the astronaut portrait and its mirror image) drifting
# towards each other over a photo of a coffee cup, then the cat photo moving, with no face.
PORTRAIT = (103, 1, 240)  # x, y, side of the square around the astronaut's face in her photo


def make_video(
    path: Path, seconds: float = 4.0, fps: float = 15.0, size: tuple[int, int] = (480, 360)
) -> list[list[Box]]:
    """Write an MJPG .avi of real photos -> the faces' boxes in each frame. The first 60 % of
    the frames show two faces that move one pixel a frame (per 480 px of width) so tracking has
    to follow them; the rest show no face."""
    import cv2

    width, height = size
    frames = round(seconds * fps)
    with_faces = round(frames * 0.6)
    side = round(height * 0.42)  # each portrait, about a 58 px face at 360 px of height
    x, y, crop = PORTRAIT
    person = cv2.resize(photo("astronaut")[y : y + crop, x : x + crop], (side, side))
    people = (person, person[:, ::-1])
    (fx, fy, fw, fh), scale = FACES["astronaut"][0], side / crop
    face = (round((fx - x) * scale), round((fy - y) * scale), round(fw * scale), round(fh * scale))
    background = cv2.resize(photo("coffee"), size, interpolation=cv2.INTER_AREA)
    cat = cv2.resize(photo("chelsea"), (round(height * 0.9 * 451 / 300), round(height * 0.9)))
    step = width / 480
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    truth = []
    for i in range(frames):
        image = background.copy()
        boxes = []
        if i < with_faces:
            for k, (px, py) in enumerate(
                [(round(width * 0.08 + i * step), round(height * 0.2)),
                 (round(width * 0.92 - side - i * step), round(height * 0.28 + i * step / 2))]
            ):  # fmt: skip
                image[py : py + side, px : px + side] = people[k]
                mirrored = face[0] if k == 0 else side - face[0] - face[2]
                boxes.append((px + mirrored, py + face[1], face[2], face[3]))
        else:
            cx = round((i - with_faces) * step)
            image[: cat.shape[0], cx : cx + min(cat.shape[1], width - cx)] = cat[:, : width - cx]
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        truth.append(boxes)
    writer.release()
    return truth


def run_camera(
    output: Path | None,
    seconds: float = 10.0,
    fps: float = 30.0,
    interval: float = 1.0,
    rounds: int = 2,
) -> dict:
    """facert camera on a 640x480 video of `seconds` at `fps`: the detector alone and with the
    bundled model's readings, each frame as fast as possible and in real time; of each
    configuration's `rounds` tries, the one that processed most frames per second."""
    import tempfile

    import facert
    from facert.runtime import camera

    configs = (
        ("detector alone, every frame", False, True),
        ("detector + readings, every frame", True, True),
        ("detector + readings, real time", True, False),
    )
    tries: dict[str, list[dict]] = {label: [] for label, *_ in configs}
    with tempfile.TemporaryDirectory() as tmp, facert.load() as model:
        video = Path(tmp) / "people.avi"
        make_video(video, seconds, fps, (640, 480))
        for _ in range(rounds):  # the configurations take turns, so other work slows them alike
            for label, reads, every in configs:
                stats = camera.run(video, model if reads else None, interval=interval,
                                   every_frame=every, out=Path(tmp) / "annotated.mp4")  # fmt: skip
                tries[label].append(stats.summary())
    runs = [{"run": label, **max(t, key=lambda s: s["processed_fps"]), "tries": t}
            for label, t in tries.items()]  # fmt: skip
    result = {"machine": describe(), "seconds": seconds, "fps": fps, "interval": interval,
              "size": [640, 480], "rounds": rounds, "runs": runs}  # fmt: skip
    text = camera_markdown(result)
    _write(output, "camera", result, text)
    result["markdown"] = text
    return result


def camera_markdown(result: dict) -> str:
    return "\n".join([
        "### camera: facert camera on a video file",
        "",
        machine_line(result["machine"]),
        "",
        f"A {result['size'][0]}x{result['size'][1]} MJPG video of {result['seconds']:g} s at "
        f"{result['fps']:g} frames/s (two faces drifting over a photo for 60 % of it, then a cat "
        "photo), annotated into an mp4 as `facert camera --out` does. Readings: every attribute "
        f"of the bundled model, {result['interval']:g} s apart per face. Every frame: the file "
        "as fast as the pipeline takes it; real time: paced by its frame rate, the newest frame "
        "wins. Latency: from a frame's capture to its overlay. The 2 cores were shared with other "
        f"work while this ran: of {result['rounds']} tries of each, taking turns, the one that "
        "processed most frames per second (every try is in camera.json).",
        "",
        table(
            ["run", "frames read", "processed", "dropped", "read/s", "processed/s",
             "latency p50 ms", "p95 ms", "detector p50 ms", "readings done", "reading p50 ms"],
            [[r["run"], r["frames_read"], r["frames_processed"], r["frames_dropped"], r["read_fps"],
              r["processed_fps"], r["latency_p50_ms"], r["latency_p95_ms"], r["detect_p50_ms"],
              r["readings_done"], r["reading_p50_ms"]] for r in result["runs"]],
        ),  # fmt: skip
    ])  # fmt: skip
