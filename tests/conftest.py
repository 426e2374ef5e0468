"""Shared test fixtures: the tiny TencentPretrain / taming checkpoints (copied from
../shared/fixtures, produced by those projects' own code) converted once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
T2F = FIXTURES / "t2f-tiny"
VQ = FIXTURES / "vqgan-tiny"
VOCAB = FIXTURES / "google_uncased_en_vocab.txt"


def convert_args(out: Path) -> list[str]:
    return [
        "convert",
        "--lm",
        str(T2F / "talk2face.bin"),
        "--lm-config",
        str(T2F / "config.json"),
        "--vocab",
        str(VOCAB),
        "--vqgan",
        str(VQ / "last.ckpt"),
        "--vqgan-config",
        str(VQ / "vqgan.yaml"),
        "-o",
        str(out),
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from facert.export.convert import convert

    out = tmp_path_factory.mktemp("tiny") / "model"
    convert(
        T2F / "talk2face.bin", T2F / "config.json", VOCAB, VQ / "last.ckpt", VQ / "vqgan.yaml", out
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import facert

    return facert.load(tiny_model_dir, backend="torch")


@pytest.fixture(scope="session", params=["torch", "onnxruntime", "onnxruntime-graph"])
def any_model(request, tiny_model_dir):
    """The public API must behave the same on every backend and decode path (onnxruntime decodes
    with the fused CPU kernel by default, or with its exported lm_decode graph)."""
    import facert

    backend, _, decode = request.param.partition("-")
    return facert.load(tiny_model_dir, backend=backend, decode=decode or "auto", progress=False)


@pytest.fixture(scope="session")
def lm_golden():
    return np.load(T2F / "golden.npz")


@pytest.fixture(scope="session")
def vq_golden():
    return np.load(VQ / "golden.npz")
