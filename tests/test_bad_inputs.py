"""Every public entry point refuses bad input at the boundary with the right FacertError
subclass, and the model answers exactly as before afterwards (no slot, cache or state left
broken). One table for the Python API, one for the CLI, and property-based fuzzing of the
parameters."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import facert
from facert import FacertError, ImageError, InvalidArgument, LimitExceeded, Limits
from facert.cli import main

LIMITS = Limits(max_faces=3, max_candidates=4, max_text_chars=100, max_images=4)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return facert.load(tiny_model_dir, progress=False, limits=LIMITS)


@pytest.fixture(scope="module")
def face(model):
    return model.generate_faces("a smiling woman", n=1, seed=3, candidates=1)[0]


@pytest.fixture(scope="module")
def reference(model, face):
    """What the model answers before any bad input: it must answer the same after each."""
    return _answers(model, face)


def _answers(model, face):
    return (
        model.caption(face),
        model.attributes(face, "gender", views=2),
        model.generate_faces("an old man", n=1, seed=5, candidates=2)[0].tobytes(),
    )


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, face):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad-files")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image at all\n")
    Image.fromarray(face).save(d / "face.png")
    (d / "truncated.png").write_bytes((d / "face.png").read_bytes()[:200])
    (d / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (d / "folder").mkdir()
    return d


TEXT = "a smiling woman"
API_CASES = {
    # generate_faces: text
    "text int": ("generate", dict(text=123), InvalidArgument),
    "text bytes": ("generate", dict(text=b"a smiling woman"), InvalidArgument),
    "text None": ("generate", dict(text=None), InvalidArgument),
    "text empty": ("generate", dict(text=""), InvalidArgument),
    "text blank": ("generate", dict(text=" \t\n"), InvalidArgument),
    "text too long": ("generate", dict(text="a" * 101), LimitExceeded),
    "text no known words": ("generate", dict(text="\x00\x01"), InvalidArgument),
    # generate_faces: counts
    "n zero": ("generate", dict(n=0), InvalidArgument),
    "n negative": ("generate", dict(n=-1), InvalidArgument),
    "n float": ("generate", dict(n=2.0), InvalidArgument),
    "n bool": ("generate", dict(n=True), InvalidArgument),
    "n str": ("generate", dict(n="2"), InvalidArgument),
    "n a million": ("generate", dict(n=10**6), LimitExceeded),
    "candidates zero": ("generate", dict(candidates=0), InvalidArgument),
    "candidates float": ("generate", dict(candidates=1.0), InvalidArgument),
    "candidates over limit": ("generate", dict(candidates=5), LimitExceeded),
    # generate_faces: sampling
    "seed negative": ("generate", dict(seed=-1), InvalidArgument),
    "seed 2**64": ("generate", dict(seed=2**64), InvalidArgument),
    "seed float": ("generate", dict(seed=1.5), InvalidArgument),
    "seed str": ("generate", dict(seed="0"), InvalidArgument),
    "top_k negative": ("generate", dict(top_k=-1), InvalidArgument),
    "top_k float": ("generate", dict(top_k=7.5), InvalidArgument),
    "top_p above 1": ("generate", dict(top_p=1.5), InvalidArgument),
    "top_p negative": ("generate", dict(top_p=-0.1), InvalidArgument),
    "top_p nan": ("generate", dict(top_p=math.nan), InvalidArgument),
    "temperature nan": ("generate", dict(temperature=math.nan), InvalidArgument),
    "temperature inf": ("generate", dict(temperature=math.inf), InvalidArgument),
    "temperature negative": ("generate", dict(temperature=-1.0), InvalidArgument),
    "temperature str": ("generate", dict(temperature="1"), InvalidArgument),
    "on_step not callable": ("generate", dict(on_step="tick"), InvalidArgument),
    # caption: images and flags
    "image None": ("caption", dict(image=None), InvalidArgument),
    "image int": ("caption", dict(image=7), InvalidArgument),
    "image missing file": ("caption", dict(image="FILES/missing.png"), ImageError),
    "image zero bytes": ("caption", dict(image="FILES/empty.png"), ImageError),
    "image text file": ("caption", dict(image="FILES/notes.txt"), ImageError),
    "image truncated": ("caption", dict(image="FILES/truncated.png"), ImageError),
    "image directory": ("caption", dict(image="FILES/folder"), ImageError),
    "image bomb": ("caption", dict(image="FILES/bomb.png"), LimitExceeded),
    "image 0x0": ("caption", dict(image=np.zeros((0, 0, 3), np.uint8)), ImageError),
    "image 0x5": ("caption", dict(image=np.zeros((0, 5, 3), np.uint8)), ImageError),
    "image 5 channels": ("caption", dict(image=np.zeros((8, 8, 5), np.uint8)), ImageError),
    "image 1-D": ("caption", dict(image=np.zeros(12, np.uint8)), ImageError),
    "image bool": ("caption", dict(image=np.zeros((8, 8, 3), bool)), ImageError),
    "greedy str": ("caption", dict(greedy="yes"), InvalidArgument),
    "caption seed negative": ("caption", dict(greedy=False, seed=-5), InvalidArgument),
    # attributes
    "names None": ("attributes", dict(names=None), InvalidArgument),
    "names empty list": ("attributes", dict(names=[]), InvalidArgument),
    "names empty str": ("attributes", dict(names=" , "), InvalidArgument),
    "names int items": ("attributes", dict(names=[1, 2]), InvalidArgument),
    "names bytes": ("attributes", dict(names=b"gender"), InvalidArgument),
    "names unknown": ("attributes", dict(names="shoe size"), InvalidArgument),
    "names too many": ("attributes", dict(names=["gender"] * 65), LimitExceeded),
    "mode unknown": ("attributes", dict(mode="guess"), InvalidArgument),
    "views zero": ("attributes", dict(views=0), InvalidArgument),
    "views five": ("attributes", dict(views=5), InvalidArgument),
    "views float": ("attributes", dict(views=2.0), InvalidArgument),
    "views str": ("attributes", dict(views="2"), InvalidArgument),
    # forward_logits
    "ids float": ("logits", dict(ids=[101, 1.5], segs=[1, 1]), InvalidArgument),
    "ids str": ("logits", dict(ids=["a"], segs=[1]), InvalidArgument),
    "ids empty": ("logits", dict(ids=[], segs=[]), InvalidArgument),
    "ids out of range": ("logits", dict(ids=[10**6], segs=[1]), InvalidArgument),
    "segs out of range": ("logits", dict(ids=[101], segs=[3]), InvalidArgument),
    "ids and segs differ": ("logits", dict(ids=[101, 102], segs=[1]), InvalidArgument),
    "ids None": ("logits", dict(ids=None, segs=[1]), InvalidArgument),
    # image tokenizer
    "codes float": ("decode", dict(codes=np.zeros((1, 256))), InvalidArgument),
    "codes bool": ("decode", dict(codes=np.zeros((1, 256), bool)), InvalidArgument),
    "codes out of range": ("decode", dict(codes=np.full((1, 256), 1024)), InvalidArgument),
    "codes wrong width": ("decode", dict(codes=np.zeros((1, 255), int)), InvalidArgument),
    "codes no rows": ("decode", dict(codes=np.zeros((0, 256), int)), InvalidArgument),
    "codes too many rows": ("decode", dict(codes=np.zeros((5, 256), int)), LimitExceeded),
    "encode nan batch": (
        "encode",
        dict(images=np.full((1, 3, 256, 256), np.nan, np.float32)),
        ImageError,
    ),
    "encode too many": ("encode", dict(images=[np.zeros((8, 8, 3), np.uint8)] * 5), LimitExceeded),
}


def _call(model, face, files, entry, kwargs):
    kwargs = {
        k: str(files / v[len("FILES/") :]) if isinstance(v, str) and v.startswith("FILES/") else v
        for k, v in kwargs.items()
    }
    if entry == "generate":
        kwargs = {"text": TEXT, "n": 1, "seed": 0, "candidates": 1, **kwargs}
        return model.generate_faces(**kwargs)
    if entry == "caption":
        return model.caption(**{"image": face, **kwargs})
    if entry == "attributes":
        return model.attributes(**{"image": face, "names": "gender", **kwargs})
    if entry == "logits":
        return model.forward_logits(kwargs["ids"], kwargs["segs"])
    if entry == "decode":
        return model.image_tokenizer.decode(kwargs["codes"])
    return model.image_tokenizer.encode(kwargs["images"])


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses_bad_input_and_keeps_answering(case, model, face, files, reference):
    entry, kwargs, error = API_CASES[case]
    with pytest.raises(error) as caught:
        _call(model, face, files, entry, kwargs)
    assert str(caught.value)  # a message that says what is wrong
    assert model.engine.idle
    assert _answers(model, face) == reference


LOAD_CASES = {
    "model_dir int": (dict(model_dir=123), InvalidArgument),
    "backend unknown": (dict(backend="tensorflow"), InvalidArgument),
    "backend not str": (dict(backend=None), InvalidArgument),
    "precision unknown": (dict(precision="fp8"), InvalidArgument),
    "decode unknown": (dict(decode="fast"), InvalidArgument),
    "num_slots zero": (dict(num_slots=0), InvalidArgument),
    "num_slots float": (dict(num_slots=2.5), InvalidArgument),
    "num_slots beyond memory": (dict(num_slots=10**9), LimitExceeded),
    "threads zero": (dict(threads=0), InvalidArgument),
    "providers str": (dict(providers="CPUExecutionProvider"), InvalidArgument),
    "limits dict": (dict(limits={"max_faces": 2}), InvalidArgument),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_refuses_bad_options(case, tiny_model_dir):
    kwargs, error = LOAD_CASES[case]
    kwargs = {"model_dir": tiny_model_dir, "progress": False, **kwargs}
    with pytest.raises(error):
        facert.load(kwargs.pop("model_dir"), **kwargs)


@pytest.mark.parametrize(
    "field, value", [("max_faces", 0), ("max_text_chars", -1), ("max_images", 2.0)]
)
def test_limits_refuse_non_positive_or_non_integer_bounds(field, value):
    with pytest.raises(InvalidArgument):
        Limits(**{field: value})


def test_a_raised_limit_admits_what_the_default_refuses(tiny_model_dir):
    text = "a smiling woman " * 10  # 160 characters: over LIMITS, within this model's
    roomy = facert.load(tiny_model_dir, progress=False, limits=Limits(max_text_chars=200))
    assert len(roomy.generate_faces(text, n=1, seed=0, candidates=1)) == 1


CLI_CASES = {
    "generate empty text": ["generate", "", "-n", "1"],
    "generate n zero": ["generate", "a face", "-n", "0"],
    "generate n over limit": ["generate", "a face", "-n", "100000"],
    "generate temperature nan": ["generate", "a face", "--temperature", "nan"],
    "generate top-p 2": ["generate", "a face", "--top-p", "2"],
    "generate seed negative": ["generate", "a face", "--seed", "-1"],
    "generate candidates zero": ["generate", "a face", "--candidates", "0"],
    "generate threads zero": ["generate", "a face", "--threads", "0"],
    "caption missing file": ["caption", "FILES/missing.png"],
    "caption zero bytes": ["caption", "FILES/empty.png"],
    "caption text file": ["caption", "FILES/notes.txt"],
    "caption bomb": ["caption", "FILES/bomb.png"],
    "analyze views 9": ["analyze", "FILES/face.png", "--views", "9"],
    "analyze unknown attribute": ["analyze", "FILES/face.png", "--attributes", "shoe size"],
    "analyze directory": ["analyze", "FILES/folder"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_bad_input_in_one_line(case, tiny_model_dir, files, tmp_path, capsys):
    argv = [a.replace("FILES/", f"{files}/") for a in CLI_CASES[case]]
    argv += ["-m", str(tiny_model_dir)]
    if argv[0] == "generate":
        argv += ["-o", str(tmp_path / "out"), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facert: error: ") and "\n" not in err and "Traceback" not in err


def test_cli_reports_an_unwritable_output_in_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where the output folder should go")
    argv = ["generate", "a face", "-n", "1", "-o", str(tmp_path / "taken"), "-q"]
    assert main([*argv, "-m", str(tiny_model_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("facert: error: ") and "\n" not in err


# Anything a caller might pass for a parameter: valid values, edge values and wrong types.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(0, 3), max_size=3),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.one_of(st.integers(-2, 4), ANYTHING),
    seed=st.one_of(st.integers(-1, 2**64), ANYTHING),
    top_k=st.one_of(st.integers(-1, 2**40), ANYTHING),
    top_p=st.one_of(st.floats(-0.5, 1.5), ANYTHING),
    temperature=st.one_of(st.floats(-1, 3), ANYTHING),
    candidates=st.one_of(st.integers(0, 5), ANYTHING),
)
def test_fuzzed_sampling_parameters_draw_or_refuse(
    model, n, seed, top_k, top_p, temperature, candidates
):
    """Every combination either draws valid faces or raises a FacertError; the pool stays free."""
    try:
        faces = model.generate_faces(
            TEXT, n=n, seed=seed, top_k=top_k, top_p=top_p, temperature=temperature,
            candidates=candidates,
        )  # fmt: skip
    except FacertError:
        pass
    else:
        assert len(faces) == n and all(f.shape == (256, 256, 3) for f in faces)
    assert model.engine.idle


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.one_of(ANYTHING, st.lists(st.text(max_size=6), max_size=3)),
    mode=st.one_of(st.sampled_from(["score", "generate"]), ANYTHING),
    views=st.one_of(st.integers(-1, 6), ANYTHING),
)
def test_fuzzed_attribute_questions_answer_or_refuse(model, face, names, mode, views):
    try:
        answers = model.attributes(face, names, mode=mode, views=views)
    except FacertError:
        pass
    else:
        assert answers and all("value" in a and 0.0 <= a["prob"] <= 1.0 for a in answers.values())
    assert model.engine.idle
