"""Finding faces in photos and camera frames, and cutting them out as the model wants them.

The model reads one face filling a square picture (its training faces fill about half of the
frame's width, with hair, ears and shoulders around them), so a camera frame is read face by face:
`FaceDetector.detect` finds the faces and `crop_face` cuts each one out with a margin.

The detector is OpenCV's Viola-Jones cascade for frontal faces (`haarcascade_frontalface_alt`,
shipped inside the opencv-contrib-python-headless wheel: nothing is downloaded at run time). In
the comparison in bench/results/detectors.md (`facert bench detectors`) it found as many faces
in real photos as any detector that can be installed beside facert, and was the only one with no
false detection, for about 1.3-1.5x the time of OpenCV's default cascade.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FacertError, ImageError, InvalidArgument
from .limits import check_float, check_int

CASCADE = "haarcascade_frontalface_alt.xml"
# Margin on each side of the detector's box, as a fraction of its side: the box spans brows to
# mouth, and twice its side frames the whole head as the model's training faces are framed.
DEFAULT_MARGIN = 0.5
DEFAULT_MIN_SIZE = 40
# Viola-Jones settings: a 10 % step between scales, and a face must be found by at least
# MIN_NEIGHBORS overlapping windows (fewer finds more faces and more false ones; see the
# comparison in bench/results/detectors.md).
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5


@dataclass(frozen=True)
class FaceBox:
    """One face: its box in the image's pixels (x, y top-left; w, h size) and the detector's
    confidence (higher is surer; comparable only between boxes of one detector)."""

    x: int
    y: int
    w: int
    h: int
    score: float


# OpenCV's package bootstraps its native module in place, so a second thread importing it at
# the same moment can see it half loaded (a server's first concurrent detections did).
_IMPORT_LOCK = threading.Lock()


def opencv():
    """OpenCV with its object-detection cascades: the camera extra's opencv-contrib build (the
    plain opencv-python 5 wheels dropped the cascades)."""
    try:
        with _IMPORT_LOCK:
            import cv2
    except ImportError as e:
        raise FacertError(
            'face detection needs OpenCV: pip install "facert[camera]" '
            "(opencv-contrib-python-headless)"
        ) from e
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise FacertError(
            f"this OpenCV ({cv2.__version__}) has no face cascades: OpenCV 5's plain wheels "
            "dropped them; pip install opencv-contrib-python-headless (facert[camera])"
        )
    return cv2


def check_image(image: np.ndarray) -> np.ndarray:
    """A frame must be a uint8 RGB [H, W, 3] array with pixels: say so rather than fail in C."""
    if not isinstance(image, np.ndarray):
        raise InvalidArgument(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            f"image must be uint8 RGB [H, W, 3], got {image.dtype} {list(image.shape)}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
    return image


class FaceDetector:
    """Frontal faces in RGB frames, at least `min_size` pixels wide. One detector may be shared
    by threads: each thread gets its own OpenCV cascade (one cascade keeps the image it scans in
    itself, so two threads must not share it).

    `cascade` (a file name in OpenCV's cascade folder, or a path to an OpenCV cascade XML) and
    `min_neighbors` exist for the detector comparison (`facert bench detectors`); the defaults
    are its winner."""

    def __init__(
        self,
        min_size: int = DEFAULT_MIN_SIZE,
        *,
        cascade: str | Path = CASCADE,
        min_neighbors: int = MIN_NEIGHBORS,
    ):
        self.min_size = check_int(min_size, "min_size", lo=20)
        self.min_neighbors = check_int(min_neighbors, "min_neighbors", lo=1)
        if not isinstance(cascade, (str, Path)):
            raise InvalidArgument(f"cascade must be a path, got {type(cascade).__name__}")
        self.cascade_file = cascade
        self._local = threading.local()

    def _cascade(self):
        """This thread's cascade, loaded on first use (importing this module needs no OpenCV)."""
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cv2 = opencv()
            path = Path(cv2.data.haarcascades) / self.cascade_file
            cascade = cv2.CascadeClassifier(str(path))
            if cascade.empty():
                raise FacertError(f"OpenCV's face cascade {path} is missing or unreadable")
            self._local.cascade = cascade
        return cascade

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in a uint8 RGB [H, W, 3] frame, best first (highest score; ties: larger)."""
        cv2 = opencv()
        gray = cv2.cvtColor(check_image(image), cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)  # the cascade was trained on normalised windows
        rects, _levels, weights = self._cascade().detectMultiScale3(
            gray, scaleFactor=SCALE_FACTOR, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size), outputRejectLevels=True,
        )  # fmt: skip
        boxes = [
            FaceBox(int(x), int(y), int(w), int(h), float(score))
            for (x, y, w, h), score in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))
        ]
        return sorted(boxes, key=lambda b: (-b.score, -b.w * b.h))


def crop_face(image: np.ndarray, box: FaceBox, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The square around `box`, `margin` of its side wider on every side, as a uint8 RGB
    [S, S, 3] array (the model's input resizes it). Parts outside the frame repeat its edge
    pixels, so a face at the border keeps the framing the model was trained on without a black
    band the model never saw."""
    check_image(image)
    if not isinstance(box, FaceBox):
        raise InvalidArgument(f"box must be a FaceBox, got {type(box).__name__}")
    if box.w <= 0 or box.h <= 0:
        raise InvalidArgument(f"box must have a positive size, got {box.w}x{box.h}")
    margin = check_float(margin, "margin", lo=0.0)
    side = max(1, round(max(box.w, box.h) * (1 + 2 * margin)))
    x0 = round(box.x + box.w / 2 - side / 2)
    y0 = round(box.y + box.h / 2 - side / 2)
    height, width = image.shape[:2]
    inside = image[max(y0, 0) : min(y0 + side, height), max(x0, 0) : min(x0 + side, width)]
    if inside.size == 0:
        raise InvalidArgument(f"box {box} lies outside the {width}x{height} image")
    pad = (
        (max(-y0, 0), max(y0 + side - height, 0)),
        (max(-x0, 0), max(x0 + side - width, 0)),
        (0, 0),
    )
    return np.ascontiguousarray(np.pad(inside, pad, mode="edge"))
