"""The bundled model (facert/models/talk2face-synth): it loads with no path and without torch,
ships a current ONNX engine, really does its three tasks on unseen faces, and `facert demo` and
`facert bench quality` write what they promise."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import facert
from facert.bench.mentions import mentioned, recall
from facert.bench.quality import Judge, evaluate, held_out, judge_accuracy
from facert.cli import main
from facert.export.synthetic import ATTRIBUTES, caption, sample_attributes
from facert.runtime.tokenizer import WordPieceTokenizer

MODEL = facert.BUNDLED_MODEL
N_EVAL = 40


@pytest.fixture(scope="module")
def bundled():
    return facert.load(progress=False)


@pytest.fixture(scope="module")
def small_eval(bundled):
    return evaluate(bundled, Judge(MODEL), N_EVAL, quiet=True)


def test_loads_with_no_path_from_its_shipped_engine(monkeypatch):
    from facert.export import onnx_export

    assert onnx_export.staleness(MODEL / "onnx" / "fp32", MODEL, "fp32") is None

    def no_export(*args, **kwargs):
        raise AssertionError("the bundled model must not be exported at load")

    monkeypatch.setattr(onnx_export, "export_engine", no_export)
    m = facert.load(progress=False)
    assert m.backend.name == "onnxruntime" and m.model_dir == MODEL
    assert m.config.attributes == {k: list(v) for k, v in ATTRIBUTES.items()}


def test_ships_within_30_mb():
    """What ships: the model files, the evaluation kit and the fp32 graphs (other precisions are
    exported on first use into MODEL/onnx/ or the cache, and are not part of the package)."""
    exported = [MODEL / "onnx" / p for p in ("int8", "int4", "fp16")]
    shipped = [f for f in MODEL.rglob("*") if f.is_file()
               and not any(d in f.parents for d in exported)]  # fmt: skip
    assert {f.name for f in shipped} >= {"facert.json", "lm.safetensors", "lm_weights.bin"}
    assert sum(f.stat().st_size for f in shipped) <= 30_000_000


def test_runs_without_torch(tmp_path):
    face = held_out(1, 64)[0][0]
    Image.fromarray(face).save(tmp_path / "face.png")
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import facert\n"
        "m = facert.load(progress=False)\n"
        f"print(m.caption({str(tmp_path / 'face.png')!r}))\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 5


def test_vocabulary_covers_every_caption():
    tokenizer = WordPieceTokenizer(MODEL / "vocab.txt")
    unk = tokenizer.token_to_id("[UNK]")
    rng = np.random.default_rng(123)
    for _ in range(2000):
        text = caption(sample_attributes(rng), rng)
        assert unk not in tokenizer.encode(text), text


def test_mentions_read_back_the_generators_captions():
    rng = np.random.default_rng(321)
    for _ in range(500):
        attributes = sample_attributes(rng)
        assert all(recall(caption(attributes, rng), attributes).values())
    assert not any(mentioned("a person").values())
    wrong = recall("A smiling person with short black hair.", {"expression": "neutral"})
    assert wrong == {"expression": False}


def _above_chance(per_attribute: dict[str, float]) -> dict[str, float]:
    return {k: v - 1 / len(ATTRIBUTES[k]) for k, v in per_attribute.items()}


def test_attributes_beat_chance_by_a_wide_margin(bundled, small_eval):
    # Chance averages 34% over the eight attributes; the model reads 93% of them on 1000 faces
    # (bench/results/quality-talk2face-synth.json) from the face alone, expression and age least
    # well (83-87%).
    one_view = small_eval["attributes_one_view"]
    margin = _above_chance(one_view["per_attribute"])
    assert one_view["mean"] >= 0.85, margin
    assert min(margin.values()) > 0.3, margin
    # By default it reads four views of each face (itself, mirrored, shifted right and left):
    # 95.2% on the 1000 faces, expression and age 90%. That must not read worse than one view.
    assert small_eval["views"] == bundled.config.reading_views == 4
    assert small_eval["attributes"]["mean"] >= one_view["mean"], (
        small_eval["attributes"],
        one_view,
    )


def test_captions_name_the_attributes(small_eval):
    # A caption that guessed would name the right value of each attribute 1/2 to 1/5 of the time
    # and often name none; the model's greedy captions name 90% of them on 1000 faces.
    assert small_eval["caption_recall"]["mean"] >= 0.8, small_eval["caption_recall"]


def test_drawn_faces_show_the_text(bundled, small_eval):
    judge = Judge(MODEL)
    images, attributes, _ = held_out(N_EVAL, 64)
    assert judge_accuracy(judge, images, attributes) >= 0.95  # the judge itself can read faces
    # Generation is the weak task: one drawing shows 68% of the text's attributes on 1000
    # faces. It must show the text's background and hair length and beat chance on average.
    single = small_eval["faithfulness_single"]
    chance = np.mean([1 / len(v) for v in ATTRIBUTES.values()])
    assert single["per_attribute"]["background"] >= 0.85, single
    assert single["per_attribute"]["hair length"] >= 0.75, single
    assert single["mean"] >= chance + 0.2, single
    # By default the model keeps the best of 32 drawings by its own reading of them (85% on
    # 1000 faces): that must follow the text clearly more often than one drawing does.
    assert small_eval["candidates"] == bundled.config.image_candidates == 32
    faithful = small_eval["faithfulness"]
    assert faithful["mean"] >= max(0.75, single["mean"] + 0.08), (faithful, single)
    # Prompts that name three attributes, as people write them, are followed too (66% on 1000
    # faces from one drawing; a model trained on complete captions only drew their background
    # 56% of the time), and better from the best of 32.
    short = small_eval["short_prompt_faithfulness_single"]["per_attribute"]
    assert short["background"] >= 0.85 and short["hair length"] >= 0.7, short
    best_short = small_eval["short_prompt_faithfulness"]["mean"]
    assert best_short >= small_eval["short_prompt_faithfulness_single"]["mean"] + 0.04
    assert small_eval["psnr_db"] >= 22


def test_demo_writes_what_it_promises(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "-n", "2", "--text", "a bald man with a beard"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["file"] for f in report["faces"]] == ["face-0.png", "face-1.png"]
    for entry in report["faces"]:
        assert np.asarray(Image.open(tmp_path / entry["file"])).shape == (64, 64, 3)
        assert entry["caption"] and set(entry["attributes"]) == set(ATTRIBUTES)
    assert report["attributes_in_text"] == {"hair length": "bald", "beard": "yes"}
    assert (report["candidates"], report["views"]) == (32, 4)  # the bundled model's defaults
    sheet = Image.open(tmp_path / "contact-sheet.png")
    assert sheet.width > 2 * 256 and sheet.height > 256
    assert "face-1.png" in capsys.readouterr().out


def test_bench_quality_writes_json(tmp_path, capsys):
    args = ["bench", "quality", "-n", "2", "--configs", "onnxruntime:fp32", "-q", "-o"]
    assert main([*args, str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quality-talk2face-synth.json").read_text())
    r = report["configs"]["onnxruntime:fp32"]
    assert set(r["attributes"]["per_attribute"]) == set(ATTRIBUTES) and r["psnr_db"] > 0
    assert r["candidates"] == 32 and "faithfulness_single" in r
    assert r["views"] == 4 and "attributes_one_view" in r
    assert "| onnxruntime:fp32 |" in capsys.readouterr().out


def test_bench_quality_confirms_on_the_validation_faces(tmp_path, capsys):
    args = ["bench", "quality", "-n", "1", "--configs", "onnxruntime:fp32", "--candidates", "1",
            "--views", "1", "--faces", "validation", "-q", "-o", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "quality-talk2face-synth-validation.json").read_text())
    assert report["face_set"] == "validation" and "of the validation set" in capsys.readouterr().out
    evaluation, validation = held_out(1, 64)[0], held_out(1, 64, "validation")[0]
    assert not np.array_equal(evaluation, validation)  # another set of faces
