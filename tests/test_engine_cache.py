"""The engine cache shared by processes, and damaged files: concurrent exports into one cache
produce one export that every process uses, a reader never sees a half-replaced directory,
corrupt or malformed engine files are re-exported when found automatically and refused with the
fix when named, and damaged model files or facert.json are one clear ModelFileError."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import facert
from facert.cli import main
from facert.export.onnx_export import export_engine
from facert.runtime.config import load_config, model_hash
from facert.runtime.errors import InvalidArgument, ModelFileError
from facert.runtime.onnx_engines import _read_verified, staleness

IDS = np.array([101, 1037, 2402, 2158, 102, 30522 + 5, 30522 + 7])
SEGS = np.array([1, 1, 1, 1, 1, 2, 2])

# Loads the model once per cache named, as every process does at once; saves the logits and
# how many exports this process built.
LOADER = """
import os, sys
import numpy as np
import facert
from facert.export import onnx_export

model, inputs, out, caches = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], sys.argv[4:]
build, builds = onnx_export._build, []
onnx_export._build = lambda *a, **k: builds.append(1) or build(*a, **k)
logits = []
for cache in caches:
    os.environ["FACERT_CACHE"] = cache
    m = facert.load(model, progress=False, threads=1)
    logits.append(m.forward_logits(inputs["ids"], inputs["segs"]))
np.savez(out, logits=np.stack(logits), builds=len(builds))
"""
# Loads the model over and over until the writer is done, checking every result.
READER = """
import sys, pathlib, numpy as np, facert
model, inputs, done, n = sys.argv[1], np.load(sys.argv[2]), pathlib.Path(sys.argv[3]), 0
while not done.exists() or n < 5:
    m = facert.load(model, progress=False, threads=1)
    logits = m.forward_logits(inputs["ids"], inputs["segs"])
    np.testing.assert_allclose(logits, inputs["reference"], rtol=1e-6, atol=1e-6)
    n += 1
print(n)
"""
WRITER = """
import sys, pathlib
from facert.export.onnx_export import export_engine
for _ in range(8):
    export_engine(sys.argv[1], sys.argv[2])
pathlib.Path(sys.argv[3]).touch()
"""


def _python(script: str, *args: object, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], text=True, **kw)


def _copy_model(src: Path, dst: Path) -> Path:
    """A model directory whose MODEL/onnx/PRECISION cannot be created (onnx is a file), so its
    engines go to $FACERT_CACHE."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx"))
    (dst / "onnx").write_text("")
    return dst


def _cache_engine(cache: Path, model: Path) -> Path:
    return cache / "onnx" / model_hash(model)[:16] / "fp32"


def _logits(model: Path, **kw) -> np.ndarray:
    return facert.load(model, progress=False, threads=1, **kw).forward_logits(IDS, SEGS)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_dir):
    """A model copy, an engine exported from it, and the logits it gives."""
    root = tmp_path_factory.mktemp("engine-cache")
    model = _copy_model(tiny_model_dir, root / "model")
    export_engine(model, root / "engine", "fp32")
    return model, root / "engine", _logits(model, engine_dir=root / "engine")


def test_processes_exporting_into_one_cache_export_once(template, tmp_path):
    model, _, reference = template
    np.savez(tmp_path / "inputs.npz", ids=IDS, segs=SEGS)
    caches = [tmp_path / f"cache{i}" for i in range(4)]
    outs = [tmp_path / f"out{p}.npz" for p in range(3)]
    children = [
        _python(LOADER, model, tmp_path / "inputs.npz", out, *caches, stderr=subprocess.PIPE)
        for out in outs
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    results = [np.load(out) for out in outs]
    assert sum(int(r["builds"]) for r in results) == len(caches)  # the others waited and reused
    for r in results:
        for logits in r["logits"]:
            np.testing.assert_allclose(logits, reference, rtol=1e-6, atol=1e-6)
    for cache in caches:  # no lock files or temporary directories left behind
        engine = _cache_engine(cache, model)
        assert sorted(p.name for p in engine.parent.iterdir()) == ["fp32"]


def test_reader_loads_while_a_writer_replaces_the_engine(template, tmp_path):
    model, _, reference = template
    np.savez(tmp_path / "inputs.npz", ids=IDS, segs=SEGS, reference=reference)
    cache, done = tmp_path / "cache", tmp_path / "done"
    engine = _cache_engine(cache, model)
    export_engine(model, engine, "fp32")
    writer = _python(WRITER, model, engine, done)
    env = {**os.environ, "FACERT_CACHE": str(cache)}
    reader = _python(READER, model, tmp_path / "inputs.npz", done, env=env,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = reader.communicate(timeout=120)
    assert writer.wait(timeout=120) == 0
    assert reader.returncode == 0, err
    assert int(out) >= 5 and _read_verified(engine, None).manifest["precision"] == "fp32"


def test_killed_exporter_leaves_no_lock_and_its_leftovers_are_removed(
    template, tmp_path, monkeypatch
):
    """flock is released when its holder dies, however it dies; what it was writing goes."""
    model, _, reference = template
    cache = tmp_path / "cache"
    engine = _cache_engine(cache, model)
    engine.parent.mkdir(parents=True)
    holder = _python(
        "import sys, time, pathlib; from facert.runtime.files import directory_lock\n"
        "with directory_lock(pathlib.Path(sys.argv[1])):\n"
        "    (pathlib.Path(sys.argv[1]).parent / '.fp32.tmp-1').mkdir()\n"
        "    print('locked', flush=True); time.sleep(60)",
        engine,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with open(engine.parent / ".fp32.lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if it were still held
    monkeypatch.setenv("FACERT_CACHE", str(cache))
    np.testing.assert_allclose(_logits(model), reference, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in engine.parent.iterdir()) == ["fp32"]  # leftovers removed


def _flip_bit(path: Path, index: int | None = None, bit: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if index is None else index] ^= bit
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "weights bit flip": (
        lambda d: _flip_bit(d / "vqgan_encoder_weights.bin"),
        "does not match its sha256",
    ),
    "truncated graph": (lambda d: _truncate(d / "vqgan_encoder.onnx"), "does not match its sha256"),
    "garbage manifest": (lambda d: (d / "manifest.json").write_text("{nope"), "not valid JSON"),
    "manifest of the wrong shape": (
        lambda d: (d / "manifest.json").write_text('{"format": 4, "graphs": []}'),
        "malformed",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_engine_found_automatically_is_reexported(
    template, tmp_path, monkeypatch, capfd, corruption
):
    model, exported, reference = template
    monkeypatch.setenv("FACERT_CACHE", str(tmp_path / "cache"))
    engine = _cache_engine(tmp_path / "cache", model)
    shutil.copytree(exported, engine)
    CORRUPTIONS[corruption][0](engine)
    np.testing.assert_allclose(_logits(model), reference, rtol=1e-6, atol=1e-6)
    if "sha256" in CORRUPTIONS[corruption][1]:  # found only as the files are read: say so
        assert "does not match its sha256" in capfd.readouterr().err
    assert staleness(engine, model, "fp32") is None and _read_verified(engine, None)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_engine_named_is_refused_with_the_fix(template, tmp_path, corruption):
    model, exported, _ = template
    engine = tmp_path / "engine"
    shutil.copytree(exported, engine)
    damage, why = CORRUPTIONS[corruption]
    damage(engine)
    with pytest.raises(ModelFileError, match=why) as e:
        facert.load(model, engine_dir=engine, progress=False)
    assert f"`facert export {model} -o {engine} --precision fp32`" in str(e.value)


def _record_sha256(model: Path, record: bool) -> None:
    """record: what a converter writes, facert.json recording the sha256 of the weights and
    vocabulary; else a model directory from before converters did."""
    config = json.loads((model / "facert.json").read_text())
    config.pop("sha256", None)
    if record:
        config["sha256"] = {
            name: hashlib.sha256((model / name).read_bytes()).hexdigest()
            for name in ("lm.safetensors", "vqgan.safetensors", "vocab.txt")
        }
    (model / "facert.json").write_text(json.dumps(config))


MODEL_DAMAGE = {
    "truncated lm": ("lm.safetensors", _truncate, False, "lm.safetensors is corrupt"),
    "vqgan header": ("vqgan.safetensors", lambda p: _flip_bit(p, 8), False, "is corrupt"),
    "vqgan tensor renamed": (
        "vqgan.safetensors",
        lambda p: _flip_bit(p, 10, 0x20),  # {"decoder... -> {"Decoder...: valid, but wrong
        False,
        "has no tensor 'decoder",
    ),
    "lm data bit flip, recorded sha256": (
        "lm.safetensors",
        _flip_bit,
        True,
        "lm.safetensors does not match the sha256 that facert.json records",
    ),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_damaged_model_files_are_a_model_file_error(template, tmp_path, monkeypatch, damage):
    name, harm, record, message = MODEL_DAMAGE[damage]
    model = _copy_model(template[0], tmp_path / "model")
    _record_sha256(model, record)
    if record:
        _logits(model)  # intact, it loads
    monkeypatch.setenv("FACERT_CACHE", str(tmp_path / "cache"))
    harm(model / name)
    with pytest.raises(ModelFileError, match=message):
        facert.load(model, progress=False)


def _config_cases(config: dict) -> dict[str, tuple[object, str]]:
    lm = config["lm"]
    return {
        "a list": ([], "expected a JSON object"),
        "a string": ("x", "expected a JSON object"),
        "lm a list": ({**config, "lm": []}, "lm must be an object"),
        "unknown key": ({**config, "colour": "red"}, "unknown key colour"),
        "unknown lm key": ({**config, "lm": {**lm, "n_heads": 4}}, "unknown key lm.n_heads"),
        "string for int": ({**config, "lm": {**lm, "n_head": "4"}}, "lm.n_head must be int"),
        "bool for int": ({**config, "cls_id": True}, "cls_id must be int"),
        "negative size": ({**config, "lm": {**lm, "n_ffn": -1}}, "lm.n_ffn must be at least 1"),
        "heads do not divide": ({**config, "lm": {**lm, "n_head": 7}}, "divisible by lm.n_head"),
        "bad ch_mult": (
            {**config, "vqgan": {**config["vqgan"], "ch_mult": [1, "2"]}},
            r"vqgan.ch_mult\[1\] must be int",
        ),  # fmt: skip
        "attributes": ({**config, "attributes": {"age": "old"}}, "attributes.age must be a list"),
        "attribute values": ({**config, "attributes": {"age": [1]}}, r"attributes.age\[0\]"),
        "prompts": ({**config, "prompts": {"to_image": 3}}, "prompts.to_image must be str"),
        "sha256": ({**config, "sha256": {"x.bin": "0" * 64}}, "sha256 must map"),
        "image_scaling": ({**config, "image_scaling": "other"}, "image_scaling must be one of"),
    }


def test_malformed_facert_json_is_one_model_file_error(template, tmp_path):
    model = _copy_model(template[0], tmp_path / "model")
    path = model / "facert.json"
    config = json.loads(path.read_text())
    for case, (content, message) in _config_cases(config).items():
        path.write_text(json.dumps(content))
        with pytest.raises(ModelFileError, match=message) as e:
            load_config(model)
        assert str(path) in str(e.value), case
    path.write_text("{not json")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        load_config(model)


def test_cli_reports_a_malformed_config_in_one_line(template, tmp_path, capsys):
    model = _copy_model(template[0], tmp_path / "model")
    (model / "facert.json").write_text('{"lm": {"n_head": "4"}}')
    assert main(["info", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lm.n_head must be int" in err


def test_facert_cache_pointing_at_a_file(template, tmp_path, monkeypatch):
    model, _, reference = template
    monkeypatch.setenv("FACERT_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidArgument, match="no writable place .* set FACERT_CACHE"):
        facert.load(model, progress=False)
    writable = tmp_path / "writable"
    shutil.copytree(model, writable, ignore=shutil.ignore_patterns("onnx"))
    np.testing.assert_allclose(_logits(writable), reference, rtol=1e-6, atol=1e-6)
    assert staleness(writable / "onnx" / "fp32", writable, "fp32") is None  # fell back to it


def test_export_replaces_a_directory_atomically(template, tmp_path):
    """`facert export -o DIR` over an existing directory: no half state, nothing left beside."""
    model, _, _ = template
    out = tmp_path / "out"
    assert main(["export", str(model), "-o", str(out)]) == 0
    first = _read_verified(out, None).contents
    (out / "stray.txt").write_text("from an older export")
    assert main(["export", str(model), "-o", str(out)]) == 0
    assert _read_verified(out, None).contents == first and not (out / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
