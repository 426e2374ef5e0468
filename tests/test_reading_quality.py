"""Honest readings: every reading carries an in-distribution score, judged by a threshold that
was measured on held-out faces (the bundled model's, or `facert convert --calibration-faces`),
and a model without one says so instead of guessing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

import facert
from facert.cli import main
from facert.export.convert import convert
from facert.export.synthetic import make_face
from facert.export.train.build_bundled import CALIBRATION_FACES, held_out_scores
from facert.export.train.data import EVAL_SEED, faces
from facert.runtime import reading_quality
from facert.runtime.config import (
    CONFIG_FILE,
    IMAGE_SCALINGS,
    ModelConfig,
    ReadingCalibration,
    load_config,
    model_hash,
    write_config,
)
from facert.runtime.images import scale_pixels
from facert.runtime.reading_quality import (
    CALIBRATION_PERCENTILE,
    MIN_CALIBRATION_FACES,
    calibrate,
    vqgan_psnr,
)

from .conftest import T2F, VOCAB, VQ, convert_args

PHOTOS = ("astronaut", "camera", "coffee", "chelsea")  # in the scikit-image wheel: no download
# The bundled model was calibrated on EVAL_SEED faces 0..999; these it has never been judged by.
UNSEEN = range(1000, 1200)


@pytest.fixture(scope="module")
def bundled():
    return facert.load(progress=False)


def noise_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "uniform noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "uniform noise 256 px": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "gaussian noise": np.clip(rng.normal(128, 30, (64, 64, 3)), 0, 255).astype(np.uint8),
    }


@pytest.mark.parametrize("scaling", IMAGE_SCALINGS)
def test_score_is_the_psnr_of_the_redrawn_face(scaling):
    """Against scikit-image's PSNR: the encoder input is unscaled back to the pixels, whichever
    scaling the model feeds its encoder, and compared with the decoder's output."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    redrawn = rng.uniform(-1.2, 1.2, (2, 3, 16, 16)).astype(np.float32)  # clipped to [-1, 1]
    codes = np.arange(2)
    scores = vqgan_psnr(
        scale_pixels(pixels, scaling), scaling, lambda x: codes, lambda c: redrawn[c]
    )
    for face, redrawn_face, score in zip(pixels, redrawn, scores):
        expected = peak_signal_noise_ratio(
            face / 255.0, (np.clip(redrawn_face, -1, 1).transpose(1, 2, 0) + 1) / 2, data_range=1
        )
        assert score == pytest.approx(expected, abs=1e-4)


def test_bundled_model_is_calibrated_on_its_held_out_faces(bundled):
    """The threshold in facert.json is what calibrate measures on the held-out faces now: the
    recorded number is reproducible, not typed in."""
    recorded = bundled.config.reading_calibration
    assert recorded.faces == CALIBRATION_FACES and recorded.percentile == CALIBRATION_PERCENTILE
    assert calibrate(held_out_scores(bundled)) == recorded


def test_unseen_held_out_faces_read_reliable(bundled):
    """Faces like the training faces that calibration never saw pass as often as the
    threshold's percentile says (99 %; at least 97 % of these 200)."""
    images, _ = faces(EVAL_SEED, UNSEEN, bundled.config.vqgan.resolution)
    readings = [bundled.reading_quality(face) for face in images]
    threshold = bundled.config.reading_calibration.threshold
    assert all(r["threshold"] == threshold for r in readings)
    assert all(r["reliable"] == (r["score"] >= threshold) for r in readings)
    assert np.mean([r["reliable"] for r in readings]) >= 1 - 3 * CALIBRATION_PERCENTILE / 100


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_read_unreliable(bundled, name):
    reading = bundled.reading_quality(getattr(skimage.data, name)())
    assert reading["reliable"] is False
    assert reading["score"] < reading["threshold"] - 1.0  # by more than a dB: not a near miss


def test_noise_reads_unreliable(bundled):
    for name, image in noise_images().items():
        assert bundled.reading_quality(image)["reliable"] is False, name


def test_reading_is_the_same_whatever_form_the_image_comes_in(bundled, tmp_path):
    face = make_face(EVAL_SEED, 1000, 64).image
    Image.fromarray(face).save(tmp_path / "face.png")
    from_array = bundled.reading_quality(face)
    assert bundled.reading_quality(tmp_path / "face.png") == from_array
    assert bundled.reading_quality(Image.fromarray(face)) == from_array
    json.dumps(from_array)  # plain Python values: the CLI and a server print them as they are


def test_bad_image_is_an_image_error(bundled):
    with pytest.raises(facert.ImageError):
        bundled.reading_quality(b"not an image")


def test_model_without_calibration_reports_none(tiny_model_dir, tiny_model):
    """Converted without held-out faces: the field is absent, readings score but do not judge."""
    assert "reading_calibration" not in json.loads((tiny_model_dir / CONFIG_FILE).read_text())
    assert tiny_model.config.reading_calibration is None
    reading = tiny_model.reading_quality(make_face(EVAL_SEED, 0, 64).image)
    assert reading["threshold"] is None and reading["reliable"] is None
    assert isinstance(reading["score"], float) and np.isfinite(reading["score"])


def write_faces(directory, n: int) -> list:
    directory.mkdir()
    paths = [directory / f"face-{i:03d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.fromarray(make_face(EVAL_SEED, i, 64).image).save(path)
    return paths


def test_convert_calibration_faces_round_trips(tmp_path, capsys, monkeypatch):
    """`facert convert --calibration-faces GLOB` records the 1st percentile of the faces'
    scores (the same scores the converted model's readings give them), and facert.json reads
    back through its validation to the same calibration, and writes back byte for byte. (Ten
    faces, not MIN_CALIBRATION_FACES: the fixture's 256 px VQGAN takes a second a face here.)"""
    monkeypatch.setattr(reading_quality, "MIN_CALIBRATION_FACES", 10)
    paths = write_faces(tmp_path / "held-out", 10)
    out = tmp_path / "model"
    assert main([*convert_args(out), "--calibration-faces", str(tmp_path / "held-out/*.png")]) == 0
    assert "reading threshold" in capsys.readouterr().out
    recorded = load_config(out).reading_calibration
    doc = json.loads((out / CONFIG_FILE).read_text())
    assert ModelConfig.from_dict(doc).reading_calibration == recorded
    assert doc["reading_calibration"] == dataclasses.asdict(recorded)
    model_hash(out)  # the weights still match the sha256 facert.json records
    before = (out / CONFIG_FILE).read_bytes()
    write_config(out, load_config(out))
    assert (out / CONFIG_FILE).read_bytes() == before

    m = facert.load(out, backend="torch")
    scores = [m.reading_quality(p)["score"] for p in paths]
    assert recorded.faces == len(paths) and recorded.percentile == CALIBRATION_PERCENTILE
    assert recorded.threshold == pytest.approx(np.percentile(scores, 1), abs=0.01)
    reading = m.reading_quality(paths[0])
    assert reading["threshold"] == recorded.threshold
    assert reading["reliable"] == (reading["score"] >= recorded.threshold)


def test_convert_refuses_too_few_or_unreadable_calibration_faces(tmp_path, capsys, monkeypatch):
    """Checked before anything is written: too few faces for the percentile, a bad image."""
    paths = write_faces(tmp_path / "few", 5)
    out = tmp_path / "model"
    assert main([*convert_args(out), "--calibration-faces", str(tmp_path / "few")]) == 2
    assert f"at least {MIN_CALIBRATION_FACES}" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(reading_quality, "MIN_CALIBRATION_FACES", 6)
    broken = tmp_path / "few" / "broken.png"
    broken.write_bytes(b"not a png")
    checkpoints = (T2F / "talk2face.bin", T2F / "config.json", VOCAB, VQ / "last.ckpt")
    with pytest.raises(facert.ImageError, match="broken.png"):
        convert(*checkpoints, VQ / "vqgan.yaml", out, calibration_faces=[*paths, broken])
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"reading_calibration": None}, "reading_calibration must be an object"),
        ({"measure": "latent_distance"}, "reading_calibration.measure must be"),
        ({"percentile": 100}, "reading_calibration.percentile must lie in"),
        ({"threshold": "20"}, "reading_calibration.threshold must be float"),
        ({"faces": 0}, "reading_calibration.faces must be at least 1"),
        ({"median": 24.0}, "unknown key reading_calibration.median"),
    ],
)
def test_malformed_calibration_is_refused(change, message):
    calibration = dataclasses.asdict(ReadingCalibration("vqgan_psnr_db", 20.7, 1.0, 1000))
    doc = json.loads(json.dumps(dataclasses.asdict(ModelConfig())))
    if "reading_calibration" in change:
        doc |= change
    else:
        doc["reading_calibration"] = calibration | change
    with pytest.raises(facert.ModelFileError, match=message):
        ModelConfig.from_dict(doc)


def test_analyze_reports_the_reading_of_each_image(tmp_path, capsys):
    face, photo = tmp_path / "face.png", tmp_path / "photo.png"
    Image.fromarray(make_face(EVAL_SEED, 1000, 64).image).save(face)
    Image.fromarray(skimage.data.astronaut()).save(photo)
    assert main(["analyze", str(face), str(photo), "--attributes", "age", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["image"], x["reading"]["reliable"]) for x in lines] == [
        (str(face), True),
        (str(photo), False),
    ]
    assert set(lines[0]["reading"]) == {"score", "threshold", "reliable"}
    assert main(["analyze", str(face), str(photo), "--attributes", "age"]) == 0
    out = capsys.readouterr().out
    assert f"{photo}\tUNRELIABLE" in out and f"{face}\tUNRELIABLE" not in out
    assert f"{face}\tage: " in out and f"{photo}\tage: " in out
