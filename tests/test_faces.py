"""The face detector and crop on real photos (scikit-image's bundled photos and LFW faces)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from facert import ImageError, InvalidArgument
from facert.bench.camera import lfw, matches, photo
from facert.runtime.faces import DEFAULT_MARGIN, FaceBox, FaceDetector, crop_face

ASTRONAUT_FACE = (177, 75, 93, 93)  # brows to chin, found by eye
NO_FACE_PHOTOS = ("coffee", "chelsea", "rocket", "coins", "moon", "brick", "grass", "page", "text")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _box(b: FaceBox) -> tuple[int, int, int, int]:
    return b.x, b.y, b.w, b.h


def test_finds_the_face_in_a_portrait_and_nothing_else(detector):
    boxes = detector.detect(photo("astronaut"))
    assert len(boxes) == 1
    assert matches(_box(boxes[0]), ASTRONAUT_FACE)
    x, y, w, h = _box(boxes[0])
    assert abs(x + w / 2 - 223.5) < 10 and abs(y + h / 2 - 121.5) < 15 and 80 <= w <= 120


def test_finds_lfw_faces_and_no_face_in_lfw_non_faces(detector):
    faces, non_faces = lfw()
    assert len(faces) == len(non_faces) == 100
    found = sum(any(matches(_box(b), f) for b in detector.detect(image)) for image, f in faces)
    assert found >= 95  # 98 when measured (bench/results/detectors.md)
    assert sum(len(detector.detect(image)) for image in non_faces) == 0


@pytest.mark.parametrize("name", NO_FACE_PHOTOS)
def test_no_face_in_photos_of_other_things(detector, name):
    assert detector.detect(photo(name)) == []


def test_two_faces_best_first_in_their_own_coordinates(detector):
    portrait = photo("astronaut")
    canvas = np.zeros((512, 1100, 3), np.uint8)
    canvas[:, :512] = portrait
    canvas[:, 588:] = portrait[:, ::-1]  # her mirror image, 76 px to the right
    boxes = detector.detect(canvas)
    assert len(boxes) == 2
    assert boxes[0].score >= boxes[1].score
    mirrored = (588 + 512 - ASTRONAUT_FACE[0] - ASTRONAUT_FACE[2], *ASTRONAUT_FACE[1:])
    assert sorted(matches(_box(b), ASTRONAUT_FACE) for b in boxes) == [False, True]
    assert sorted(matches(_box(b), mirrored) for b in boxes) == [False, True]


def test_min_size_skips_smaller_faces():
    portrait = photo("astronaut")
    assert FaceDetector(min_size=80).detect(portrait)  # her face is 93 px
    assert FaceDetector(min_size=130).detect(portrait) == []


def test_crop_is_the_square_around_the_box_with_its_margin():
    image = photo("astronaut")
    box = FaceBox(200, 100, 60, 50, 1.0)
    crop = crop_face(image, box, margin=0.5)
    # side 60 * 2 = 120 centred on (230, 125): rows 65..185, columns 170..290
    assert crop.shape == (120, 120, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, image[65:185, 170:290])
    assert crop_face(image, box).shape == (round(60 * (1 + 2 * DEFAULT_MARGIN)),) * 2 + (3,)


def test_crop_at_the_border_repeats_the_edge_pixels():
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    crop = crop_face(image, FaceBox(0, 0, 10, 10, 1.0), margin=0.5)  # rows/cols -5..15
    assert crop.shape == (20, 20, 3)
    np.testing.assert_array_equal(crop[5:, 5:], image[:15, :15])
    np.testing.assert_array_equal(crop[:5, 5:], np.broadcast_to(image[0, :15], (5, 15, 3)))
    np.testing.assert_array_equal(crop[5:, :5], np.repeat(image[:15, :1], 5, axis=1))
    np.testing.assert_array_equal(crop[:5, :5], np.broadcast_to(image[0, 0], (5, 5, 3)))


def test_bad_inputs_say_what_is_wrong(detector):
    with pytest.raises(ImageError, match="uint8 RGB"):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageError, match="uint8 RGB"):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageError, match="empty"):
        detector.detect(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InvalidArgument, match="numpy array"):
        detector.detect([[0]])
    with pytest.raises(InvalidArgument, match="min_size"):
        FaceDetector(min_size=5)
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(InvalidArgument, match="outside"):
        crop_face(image, FaceBox(50, 50, 5, 5, 1.0), margin=0.1)
    with pytest.raises(InvalidArgument, match="positive size"):
        crop_face(image, FaceBox(0, 0, 0, 5, 1.0))
    with pytest.raises(InvalidArgument, match="margin"):
        crop_face(image, FaceBox(0, 0, 5, 5, 1.0), margin=float("nan"))


def test_one_detector_shared_by_threads_finds_what_it_finds_alone(detector):
    faces, non_faces = lfw()
    images = [image for image, _ in faces[:12]] + non_faces[:4] + [photo("astronaut")]
    alone = [detector.detect(image) for image in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(detector.detect, images)) == alone


def test_the_first_detections_of_a_fresh_process_may_come_at_once():
    """A server's first requests import OpenCV from several threads at the same moment; each
    must get the whole module (a half-loaded one once made them fail)."""
    import subprocess
    import sys

    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "import numpy as np\n"
        "from facert.runtime.faces import FaceDetector\n"
        "frame = np.zeros((120, 160, 3), np.uint8)\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    print(sum(len(b) for b in pool.map(lambda _: FaceDetector().detect(frame), "
        "range(8))))\n"
    )
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "0"
