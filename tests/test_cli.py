"""The `facert` command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

import facert
from facert.cli import main

from .conftest import convert_args


def test_convert_then_info(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(convert_args(out)) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "2 layers x 64 hidden" in info and "31546 = 30522 text + 1024 codes" in info
    assert "attribute    gender: male, female" in info
    assert "drawing      best of 1 per face" in info  # converted checkpoints sample plainly
    assert "reading      1 view(s) per face" in info  # and read the face alone


def test_generate_caption_analyze(tiny_model_dir, tmp_path, capsys):
    m = str(tiny_model_dir)
    assert (
        main(
            [
                "generate",
                "a smiling woman",
                "-m",
                m,
                "-n",
                "2",
                "-o",
                str(tmp_path),
                "-q",
                "--seed",
                "1",
                "--candidates",
                "2",
            ]
        )
        == 0
    )
    faces = sorted(tmp_path.glob("face-*.png"))
    assert [f.name for f in faces] == ["face-0.png", "face-1.png"]
    assert np.asarray(Image.open(faces[0])).shape == (256, 256, 3)
    capsys.readouterr()
    assert main(["caption", str(faces[0]), "-m", m]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(faces[0]) + "\t") and len(line.split("\t")[1]) > 0
    assert main(["analyze", str(faces[0]), "-m", m, "--attributes", "gender", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == str(faces[0])
    assert result["attributes"]["gender"]["value"] in ("male", "female")
    assert main(["analyze", str(faces[0]), "-m", m, "--attributes", "gender", "--views", "2",
                 "--json"]) == 0  # fmt: skip
    two_views = json.loads(capsys.readouterr().out)["attributes"]["gender"]
    assert two_views == facert.load(m).attributes(faces[0], "gender", views=2)["gender"]


def test_analyze_a_folder_and_a_pattern_as_json_lines(tiny_model_dir, tmp_path, capsys):
    """Many images go through the scheduler together; lines come out in input order, an
    unreadable image is its own error line and the others are still answered."""
    m = facert.load(tiny_model_dir, progress=False)
    faces = m.generate_faces("a smiling woman", n=5, seed=4, candidates=1)
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"face-{i}.png")
    (folder / "face-9.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("skipped: not an image file")
    argv = ["analyze", str(folder), "-m", str(tiny_model_dir), "--json", "--views", "2"]
    assert main(argv) == 2  # one image could not be read
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [
        str(folder / f"face-{i}.png") for i in (0, 1, 2, 3, 4, 9)
    ]
    for face, line in zip(faces, lines):
        assert line["attributes"] == m.attributes(face, "gender", views=2)
    assert "cannot read image" in lines[-1]["error"]
    pattern = str(folder / "face-[0-1].png")
    assert main(["analyze", pattern, "-m", str(tiny_model_dir), "--json", "--views", "2"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines[:2]


def test_errors_are_one_line_without_traceback(tiny_model_dir, tmp_path):
    cases = [
        ["caption", str(tmp_path / "missing.png"), "-m", str(tiny_model_dir)],
        ["info", str(tmp_path)],
        ["generate", "a face", "-m", str(tiny_model_dir), "--candidates", "0", "-o", str(tmp_path)],
        ["analyze", str(tmp_path / "x.png"), "-m", str(tiny_model_dir), "--attributes", "hair"],
        ["analyze", str(tmp_path / "x.png"), "-m", str(tiny_model_dir), "--views", "0"],
    ]
    (tmp_path / "x.png").write_bytes(b"junk")
    for argv in cases:
        r = subprocess.run(
            [sys.executable, "-m", "facert.cli", *argv], capture_output=True, text=True
        )
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("facert: error: ") and "Traceback" not in r.stderr
