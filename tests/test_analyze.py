"""FaceModel.analyze: a face's attributes and its reading from one VQGAN encode, equal to what
attributes() and reading_quality() give separately (two encodes); the camera pipeline reads
each face through it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import skimage.data

import facert
from facert.export.synthetic import make_face
from facert.runtime.camera import Frame, Pipeline
from facert.runtime.faces import FaceBox, crop_face


@pytest.fixture(scope="module")
def model():
    with facert.load() as m:
        yield m


@pytest.fixture
def encodes(model, monkeypatch) -> list[int]:
    """The number of images of each VQGAN encoder call the model makes."""
    calls: list[int] = []
    encode = model.backend.encode_images

    def counted(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(model.backend, "encode_images", counted)
    return calls


FACES = [make_face(11, i, 64).image for i in range(3)] + [skimage.data.astronaut()]


@pytest.mark.parametrize(("mode", "views"), [("score", None), ("score", 1), ("generate", None)])
def test_analyze_encodes_once_and_equals_attributes_and_reading(model, encodes, mode, views):
    names = list(model.config.attributes)
    for face in FACES:
        expected = {
            "attributes": model.attributes(face, names, mode=mode, views=views),
            "reading": model.reading_quality(face),
        }
        assert len(encodes) == 2  # the separate calls: one encode each
        encodes.clear()
        assert model.analyze(face, names, mode=mode, views=views) == expected
        assert len(encodes) == 1
        encodes.clear()
    assert expected["reading"]["reliable"] is False  # the photo: unlike the faces it learned


def test_analyze_forms(model, encodes):
    face = FACES[0]
    expected = model.analyze(face, "age")
    assert model.submit("analyze", face, "age").result() == expected
    assert asyncio.run(model.aanalyze(face, "age")) == expected
    assert len(encodes) == 3


class OneFace:
    """A detector that finds the same box in every frame."""

    def __init__(self, box: FaceBox):
        self.box = box

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        return [self.box]


def test_camera_reading_encodes_each_face_once(model, encodes):
    image = np.full((200, 240, 3), 90, np.uint8)
    image[40:168, 60:188] = make_face(11, 0, 128).image
    box = FaceBox(60, 40, 128, 128, 1.0)
    pipeline = Pipeline(model, "age,expression", interval=0.0, detector=OneFace(box), views=1)
    record, _ = pipeline.process(Frame(0, 0.0, time.monotonic(), image))
    assert record["faces"][0]["reading_started"]
    track = next(iter(pipeline.tracker.tracks.values()))
    track.reading.analysis.result(timeout=60)
    record, _ = pipeline.process(Frame(1, 0.1, time.monotonic(), image))
    pipeline.close()
    assert pipeline.stats.readings_done == 1 and len(encodes) == 1
    crop = crop_face(image, box)
    answers = model.attributes(crop, "age,expression", views=1)
    quality = model.reading_quality(crop)
    reading = record["faces"][0]["reading"]
    assert reading["attributes"] == {
        n: {"value": a["value"], "prob": round(a["prob"], 4)} for n, a in answers.items()
    }
    assert reading["quality_db"] == round(quality["score"], 2)
    assert reading["reliable"] == quality["reliable"]
