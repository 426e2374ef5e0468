"""Exactness against golden outputs of TencentPretrain and taming's own code."""

from __future__ import annotations

import numpy as np


def test_lm_logits_match_tencentpretrain(tiny_model, lm_golden):
    for i in range(int(lm_golden["n"])):
        logits = tiny_model.forward_logits(lm_golden[f"src{i}"], lm_golden[f"seg{i}"])  # (L, V)
        ref = lm_golden[f"logits{i}"]
        err = np.abs(logits[lm_golden[f"pos{i}"]] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (i, err)
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(top5, lm_golden[f"top5_{i}"], err_msg=f"sequence {i}")


def test_vqgan_codes_match_taming(tiny_model, vq_golden):
    images = vq_golden["images"]  # already scaled, (N, 3, 256, 256)
    codes = tiny_model.image_tokenizer.encode(images)
    ref = vq_golden["indices"]
    assert codes.shape == ref.shape and codes.dtype == np.int64
    differ = np.argwhere(codes != ref)
    if len(differ):  # allowed only where the two codes' distances tie within 1e-5
        import torch

        backend = tiny_model.backend
        with torch.no_grad():
            z = backend.vqgan.latents(torch.from_numpy(images)).permute(0, 2, 3, 1).flatten(1, 2)
        e = backend.vqgan.quantize.embedding.weight
        for n, t in differ:
            d = ((z[n, t] - e) ** 2).sum(-1)
            assert abs(float(d[codes[n, t]] - d[ref[n, t]])) < 1e-5


def test_vqgan_decode_matches_taming(tiny_model, vq_golden):
    decoded = tiny_model.image_tokenizer.decode(vq_golden["indices"])
    ref = np.clip(vq_golden["decoded"], -1.0, 1.0)
    assert decoded.shape == ref.shape and decoded.dtype == np.float32
    assert np.abs(decoded - ref).max() < 1e-4


def test_raw_decoder_output_matches_taming(tiny_model, vq_golden):
    import torch

    with torch.no_grad():
        raw = tiny_model.backend.vqgan.decode(torch.from_numpy(vq_golden["indices"])).numpy()
    ref = vq_golden["decoded"]
    assert np.abs(raw - ref).max() / np.abs(ref).max() < 1e-4
