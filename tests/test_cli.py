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
    assert result[str(faces[0])]["gender"]["value"] in ("male", "female")
    assert main(["analyze", str(faces[0]), "-m", m, "--attributes", "gender", "--views", "2",
                 "--json"]) == 0  # fmt: skip
    two_views = json.loads(capsys.readouterr().out)[str(faces[0])]["gender"]
    assert two_views == facert.load(m).attributes(faces[0], "gender", views=2)["gender"]


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
