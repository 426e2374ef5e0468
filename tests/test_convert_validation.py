"""`facert convert` checks every input before writing, and writes the model directory atomically.

Each malformed input is one error of the right FacertError subclass from the API and one line
with status 2 from the command line, and the output directory is left absent (or, when a model
was there before, byte for byte unchanged), with no temporary directory beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from facert.cli import main
from facert.export import convert as convert_module
from facert.export.checkpoint import read_checkpoint
from facert.export.convert import convert
from facert.runtime.errors import InvalidArgument, ModelFileError

from .conftest import T2F, VOCAB, VQ, convert_args

INPUTS = {
    "--lm": T2F / "talk2face.bin",
    "--lm-config": T2F / "config.json",
    "--vocab": VOCAB,
    "--vqgan": VQ / "last.ckpt",
    "--vqgan-config": VQ / "vqgan.yaml",
}


def _lm_config(tmp: Path, **changes) -> Path:
    cfg = json.loads((T2F / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    return _write(tmp / "config.json", json.dumps(cfg))


def _vq_config(tmp: Path, change) -> Path:
    doc = yaml.safe_load((VQ / "vqgan.yaml").read_text())
    change(doc["model"]["params"]["first_stage_config"]["params"])
    return _write(tmp / "vqgan.yaml", yaml.safe_dump(doc))


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _lm_weights(tmp: Path, change) -> Path:
    sd = torch.load(T2F / "talk2face.bin", weights_only=True)
    torch.save(change(sd), tmp / "lm.bin")
    return tmp / "lm.bin"


def _vq_weights(tmp: Path, change) -> Path:
    sd = dict(read_checkpoint(VQ / "last.ckpt")["state_dict"])
    torch.save({"state_dict": change(sd)}, tmp / "vq.ckpt")
    return tmp / "vq.ckpt"


def _lm(**changes):
    return lambda t: _lm_config(t, **changes)


def _dd(key: str, value):
    return lambda t: _vq_config(t, lambda params: params["ddconfig"].__setitem__(key, value))


def _params(change):
    return lambda t: _vq_config(t, change)


def _text(name: str, content: str | bytes):
    return lambda t: _write(t / name, content)


def _tensor(weights, key: str, change):
    """A checkpoint whose tensor `key` went through `change`."""

    def make(t: Path) -> Path:
        return weights(t, lambda sd: {**sd, key: change(sd[key])})

    return make


LM_KEY = "encoder.transformer.0.self_attn.linear_layers.0.weight"
VQ_KEY = "first_stage_model.quantize.embedding.weight"

# option -> (the error it must raise, {case: a maker of the bad value from a tmp dir})
CASES = {
    "--lm-config": (ModelFileError, {
        "list": _text("c.json", "[]"),
        "not-json": _text("c.json", "{"),
        "missing-heads": _lm(heads_num=None),
        "string-size": _lm(hidden_size="64"),
        "negative-ffn": _lm(feedforward_size=-1),
        "bool-layers": _lm(layers_num=True),
        "zero-layers": _lm(layers_num=0),
        "a-billion-layers": _lm(layers_num=10**9),
        "deep-nesting": _text("c.json", "[" * 100_000),
        "heads-do-not-divide": _lm(heads_num=3),
        "seq-past-positions": _lm(seq_length=2000),
        "nan-eps": _lm(layernorm_eps=float("nan")),
        "image-tokenizer-list": _lm(image_tokenizer=[]),
        "image-vocab-mismatch": _lm(image_tokenizer={"image_vocab_size": 512}),
    }),
    "--vqgan-config": (ModelFileError, {
        "not-mapping": _text("v.yaml", "- 1\n- 2\n"),
        "not-yaml": _text("v.yaml", "a: [\n"),
        "no-model": _text("v.yaml", "other: 1\n"),
        "string-ch": _dd("ch", "abc"),
        "ddconfig-list": _params(lambda params: params.__setitem__("ddconfig", [1, 2])),
        "no-embed-dim": _params(lambda params: params.pop("embed_dim")),
        "empty-ch-mult": _dd("ch_mult", []),
        "string-double-z": _dd("double_z", "no"),
        "odd-resolution": _dd("resolution", 250),
        "groupnorm-impossible": _dd("ch", 20),
    }),
    "--vocab": (ModelFileError, {
        "not-utf8": _text("v.txt", b"[PAD]\n\xff\xfe\n"),
        "empty": _text("v.txt", ""),
    }),
    "--lm": (ModelFileError, {
        "not-a-dict": lambda t: _lm_weights(t, lambda sd: list(sd.values())),
        "non-tensor-value": lambda t: _lm_weights(t, lambda sd: {**sd, "extra": [1.0]}),
        "nan-weight": _tensor(_lm_weights, LM_KEY, lambda w: w * float("nan")),
        "inf-weight": _tensor(_lm_weights, LM_KEY, lambda w: w / 0),
        "int-weight": _tensor(_lm_weights, LM_KEY, lambda w: w.long()),
    }),
    "--vqgan": (ModelFileError, {
        "not-a-dict": lambda t: _vq_weights(t, lambda sd: [1]),
        "nan-weight": _tensor(_vq_weights, VQ_KEY, lambda w: w * float("nan")),
        "int-weight": _tensor(_vq_weights, VQ_KEY, lambda w: w.int()),
    }),
    "--attributes": (InvalidArgument, {
        "list": _text("a.json", "[]"),
        "empty": _text("a.json", "{}"),
        "no-values": _text("a.json", '{"age": []}'),
        "string-values": _text("a.json", '{"age": "young"}'),
        "number-values": _text("a.json", '{"age": [1, 2]}'),
        "blank-name": _text("a.json", '{" ": ["a"]}'),
    }),
}  # fmt: skip
CASE_IDS = [f"{option}={case}" for option, (_, makers) in CASES.items() for case in makers]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _run_case(tmp_path: Path, case_id: str, out: Path):
    option, case = case_id.split("=")
    error, makers = CASES[option]
    make = makers[case]
    inputs = dict(INPUTS, **{option: make(tmp_path / "inputs")})
    args = convert_args(out)
    for flag, path in inputs.items():
        if flag in args:
            args[args.index(flag) + 1] = str(path)
        else:
            args += [flag, str(path)]
    return error, inputs, args


def _api(inputs: dict, out: Path) -> None:
    attributes = inputs.get("--attributes")
    convert(
        *(inputs[k] for k in ("--lm", "--lm-config", "--vocab", "--vqgan", "--vqgan-config")),
        out,
        attributes=None if attributes is None else json.loads(attributes.read_text()),
    )


@pytest.fixture
def inputs_dir(tmp_path):
    (tmp_path / "inputs").mkdir()
    return tmp_path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("facert: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case", CASE_IDS)
def test_malformed_input_is_one_error_and_writes_nothing(inputs_dir, capsys, case):
    out = inputs_dir / "out" / "model"
    error, inputs, args = _run_case(inputs_dir, case, out)
    with pytest.raises(error):
        _api(inputs, out)
    assert main(args) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in inputs_dir.iterdir()) == ["inputs"]


@pytest.mark.parametrize("option", sorted(INPUTS))
def test_a_missing_input_is_an_invalid_argument(tmp_path, capsys, option):
    absent = tmp_path / "absent"
    with pytest.raises(InvalidArgument, match="not found"):
        _api({**INPUTS, option: absent}, tmp_path / "out")
    args = convert_args(tmp_path / "out")
    args[args.index(option) + 1] = str(absent)
    assert main(args) == 2
    _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["{age", b'{"\xff": ["a"]}', None])
def test_unreadable_attribute_file(tmp_path, capsys, content):
    path = tmp_path / "attributes.json"
    if content is not None:
        _write(path, content)
    assert main([*convert_args(tmp_path / "out"), "--attributes", str(path)]) == 2
    assert "attribute vocabulary" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case", ["--lm=nan-weight", "--vqgan-config=string-ch", "--attributes=list"]
)
def test_a_failed_conversion_leaves_the_previous_model_unchanged(inputs_dir, capsys, case):
    out = inputs_dir / "out"
    assert main(convert_args(out)) == 0
    before = _snapshot(out)
    assert main(_run_case(inputs_dir, case, out)[2]) == 2
    assert _snapshot(out) == before
    assert sorted(p.name for p in inputs_dir.iterdir()) == ["inputs", "out"]


def test_a_write_that_fails_midway_leaves_the_previous_model(inputs_dir, monkeypatch):
    out = inputs_dir / "out"
    assert main(convert_args(out)) == 0
    before = _snapshot(out)
    real_save = convert_module.save_file

    def save_then_fail(tensors, path):
        real_save(tensors, path)
        if path.endswith("vqgan.safetensors"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "save_file", save_then_fail)
    with pytest.raises(OSError):
        _api(INPUTS, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in inputs_dir.iterdir()) == ["inputs", "out"]


def test_a_previous_model_is_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(convert_args(out)) == 0
    (out / "onnx").mkdir()  # exported engines of the previous model go with it
    assert main([*convert_args(out), "--name", "second"]) == 0
    assert json.loads((out / "facert.json").read_text())["name"] == "second"
    assert sorted(p.name for p in out.iterdir()) == [
        "facert.json", "lm.safetensors", "vocab.txt", "vqgan.safetensors"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "existing", ["file", "directory", "model-with-extras", "link", "in-a-file"]
)
def test_output_that_is_not_a_model_directory_is_never_touched(tmp_path, capsys, existing):
    target = tmp_path / "target"
    out = target
    if existing == "file":
        target.write_text("keep me")
    elif existing == "directory":
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    elif existing == "model-with-extras":
        assert main(convert_args(target)) == 0
        (target / "notes.txt").write_text("keep me")
    elif existing == "link":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    else:
        target.write_text("keep me")
        out = target / "model"
    before = _snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(InvalidArgument):
        _api(INPUTS, out)
    assert main(convert_args(out)) == 2
    _one_error_line(capsys)
    assert _snapshot(tmp_path) == before and target.is_symlink() == (existing == "link")


def test_an_empty_directory_becomes_the_model(tmp_path):
    (tmp_path / "out").mkdir()
    assert main(convert_args(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "facert.json").is_file()
