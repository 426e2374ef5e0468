"""Face editing: keep the top rows of a face's codes and draw the rest from a new text."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import facert
from facert.cli import main
from facert.runtime.errors import InvalidArgument
from facert.runtime.sequence import GREEDY

TEXT = "a smiling old man with glasses"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_kept_codes_continue_as_if_the_model_had_drawn_them(tiny_model_dir, backend):
    """Greedy: a face whose first rows are kept from the model's own greedy drawing of the same
    text is that drawing again (the kept codes are in the prompt as segment 2, exactly where the
    model's own codes would be)."""
    m = facert.load(tiny_model_dir, backend=backend, progress=False)
    t, side = m.templates, m.config.vqgan.latent_size
    drawn = t.to_image(TEXT, GREEDY, 0)
    m.engine.run([drawn])
    codes = t.codes_of(drawn)
    for rows in (1, side // 2, side - 1):
        edit = t.to_image(TEXT, GREEDY, 0, kept=codes[: rows * side])
        m.engine.run([edit])
        assert len(edit.generated) == (side - rows) * side
        np.testing.assert_array_equal(t.codes_of(edit), codes)
        assert t.described_words(edit) == t.described_words(drawn)


def test_edit_face_keeps_rows_and_is_reproducible(tiny_model_dir, tmp_path, capsys):
    m = facert.load(tiny_model_dir, progress=False)
    face = m.generate_faces("a young woman", n=1, seed=1, candidates=1)[0]
    side = m.config.vqgan.latent_size
    kept = m.image_tokenizer.encode([face])[0][: 4 * side]
    edits = m.edit_face(face, TEXT, keep_rows=4, n=3, seed=7, candidates=2)
    assert len(edits) == 3 and all(e.shape == face.shape for e in edits)
    assert not np.array_equal(edits[0], edits[1])
    again = m.edit_face(face, TEXT, keep_rows=4, n=1, seed=7, candidates=2)
    np.testing.assert_array_equal(again[0], edits[0])  # face i of a seed, whatever n
    steps = []
    m.edit_face(face, TEXT, keep_rows=4, n=1, seed=7, candidates=1, on_step=steps.append)
    assert sum(steps) == m.generation_steps(TEXT, 1, 1, keep_rows=4) == (side - 4) * side
    drawing = m.templates.to_image(TEXT, GREEDY, 0, kept=kept)
    np.testing.assert_array_equal(m.templates.codes_of(drawing), kept)  # before drawing
    for bad in (-1, side, 2.0, None):
        with pytest.raises(InvalidArgument, match="keep_rows"):
            m.edit_face(face, TEXT, keep_rows=bad)

    Image.fromarray(face).save(tmp_path / "face.png")
    out = tmp_path / "edited"
    argv = ["edit", str(tmp_path / "face.png"), TEXT, "--keep-rows", "4", "-n", "2"]
    assert main([*argv, "-m", str(tiny_model_dir), "-o", str(out), "-q", "--seed", "7"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "face-0.png"), str(out / "face-1.png")]
    assert np.array_equal(np.asarray(Image.open(out / "face-0.png")), m.edit_face(
        tmp_path / "face.png", TEXT, keep_rows=4, n=1, seed=7)[0])  # fmt: skip
