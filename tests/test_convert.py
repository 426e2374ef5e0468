"""Checkpoint conversion: strict loading, old key names, and no code execution."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from facert.export.checkpoint import Placeholder, read_checkpoint
from facert.export.convert import OLD_TP_NAMES, convert
from facert.runtime.config import LM_FILE, VQGAN_FILE, load_config, write_config
from facert.runtime.errors import FacertError

from .conftest import T2F, VOCAB, VQ


def _convert(tmp_path, lm=T2F / "talk2face.bin", vq=VQ / "last.ckpt", **kw):
    return convert(lm, T2F / "config.json", VOCAB, vq, VQ / "vqgan.yaml", tmp_path / "m", **kw)


def test_model_directory_layout(tmp_path):
    _convert(tmp_path)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["facert.json", "lm.safetensors", "vocab.txt", "vqgan.safetensors"]
    cfg = load_config(tmp_path / "m")
    assert (cfg.lm.n_layer, cfg.lm.n_embd, cfg.lm.n_head, cfg.lm.vocab_size) == (2, 64, 4, 31546)
    assert cfg.lm.text_vocab_size == 30522 and cfg.vqgan.n_embed == 1024
    assert cfg.image_scaling == "reference"


def test_lightning_checkpoint_classes_stay_inert():
    ckpt = read_checkpoint(VQ / "last.ckpt")
    (callback_key,) = ckpt["callbacks"].keys()
    assert issubclass(callback_key, Placeholder)
    assert callback_key.qualified_name.startswith("pytorch_lightning")


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.bin"
    torch.save({"x": torch.zeros(2), "evil": Evil()}, path)
    loaded = read_checkpoint(path)
    assert not marker.exists()
    assert isinstance(loaded["evil"], Placeholder) and torch.equal(loaded["x"], torch.zeros(2))


def test_legacy_format_copies_convert_identically(tmp_path):
    """torch.save(_use_new_zipfile_serialization=False) files hold the same weights as zip ones."""
    lm = torch.load(T2F / "talk2face.bin", weights_only=True)
    torch.save(lm, tmp_path / "lm.bin", _use_new_zipfile_serialization=False)
    vq = {"state_dict": dict(read_checkpoint(VQ / "last.ckpt")["state_dict"])}
    torch.save(vq, tmp_path / "vq.ckpt", _use_new_zipfile_serialization=False)
    assert not any(zipfile.is_zipfile(tmp_path / f) for f in ("lm.bin", "vq.ckpt"))
    _convert(tmp_path / "zip")
    _convert(tmp_path / "legacy", lm=tmp_path / "lm.bin", vq=tmp_path / "vq.ckpt")
    zip_dir, legacy_dir = tmp_path / "zip" / "m", tmp_path / "legacy" / "m"
    for name in ("facert.json", LM_FILE, VQGAN_FILE, "vocab.txt"):
        assert (zip_dir / name).read_bytes() == (legacy_dir / name).read_bytes(), name


def test_old_tencentpretrain_names_are_accepted(tmp_path):
    sd = torch.load(T2F / "talk2face.bin", weights_only=True)
    renamed = {old: sd[new] for old, new in OLD_TP_NAMES.items()}
    old = {**{k: v for k, v in sd.items() if k not in OLD_TP_NAMES.values()}, **renamed}
    torch.save(old, tmp_path / "old.bin")
    _convert(tmp_path, lm=tmp_path / "old.bin")
    from safetensors.torch import load_file

    new = load_file(str(tmp_path / "m" / "lm.safetensors"))
    assert torch.equal(new["wte.weight"], sd["embedding.word.embedding.weight"])
    assert torch.equal(new["lm_head.weight"], sd["target.lm.output_layer.weight"])


def test_strict_loading_lists_what_is_wrong(tmp_path):
    sd = torch.load(T2F / "talk2face.bin", weights_only=True)
    del sd["encoder.transformer.1.layer_norm_2.gamma"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["embedding.seg.embedding.weight"] = torch.zeros(4, 64)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(FacertError) as e:
        _convert(tmp_path, lm=tmp_path / "bad.bin")
    msg = str(e.value)
    assert "missing (1): encoder.transformer.1.layer_norm_2.gamma" in msg
    assert "unexpected (1): encoder.extra.weight" in msg
    assert "embedding.seg.embedding.weight: checkpoint (4, 64), expected (3, 64)" in msg


def test_vqgan_missing_key_reported_with_checkpoint_name(tmp_path):
    ckpt = read_checkpoint(VQ / "last.ckpt")
    sd = dict(ckpt["state_dict"])
    del sd["first_stage_model.quantize.embedding.weight"]
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(
        FacertError, match=r"missing \(1\): first_stage_model.quantize.embedding.weight"
    ):
        _convert(tmp_path, vq=tmp_path / "bad.ckpt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(FacertError, match="not a readable PyTorch checkpoint"):
        _convert(tmp_path, lm=tmp_path / "junk.bin")
    with pytest.raises(FacertError, match="checkpoint not found"):
        _convert(tmp_path, lm=tmp_path / "absent.bin")


def test_attribute_vocabulary_and_scaling_are_recorded(tmp_path):
    cfg = _convert(tmp_path, image_scaling="taming", attributes={"age": ["young", "old"]})
    saved = json.loads((tmp_path / "m" / "facert.json").read_text())
    assert saved["attributes"] == {"age": ["young", "old"]} and saved["image_scaling"] == "taming"
    assert load_config(tmp_path / "m") == cfg


def test_restricted_reader_returns_the_same_tensors():
    """Sanity: the restricted reader returns the same tensors torch's safe loader does."""
    ref = torch.load(T2F / "talk2face.bin", weights_only=True)
    got = read_checkpoint(T2F / "talk2face.bin")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _copy_weights(source, target, cast) -> None:
    """A copy of a model directory whose two weight files went through `cast`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("onnx"))
    for name in (LM_FILE, VQGAN_FILE):
        weights = load_file(str(source / name))
        save_file({k: cast(v) if v.is_floating_point() else v for k, v in weights.items()},
                  str(target / name))  # fmt: skip
    write_config(target, load_config(target))  # new weights on purpose: record their sha256


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_float16_weights_compute_what_widened_float32_does(tiny_model_dir, tmp_path, backend):
    import facert

    _copy_weights(tiny_model_dir, tmp_path / "half", lambda v: v.half())
    _copy_weights(tiny_model_dir, tmp_path / "widened", lambda v: v.half().float())
    ids, segs = [101, 2158, 102, 30522, 30600], [1, 1, 1, 2, 2]
    got = [
        facert.load(tmp_path / d, backend=backend, progress=False).forward_logits(ids, segs)
        for d in ("half", "widened")
    ]
    np.testing.assert_array_equal(got[0], got[1])
    original = facert.load(tiny_model_dir, backend=backend, progress=False)
    assert not np.array_equal(got[0], original.forward_logits(ids, segs))  # the rounding is real


def test_bfloat16_weights_are_refused_clearly(tiny_model_dir, tmp_path):
    import facert

    _copy_weights(tiny_model_dir, tmp_path / "bf16", lambda v: v.bfloat16())
    with pytest.raises(FacertError, match="float16"):
        facert.load(tmp_path / "bf16", progress=False)
