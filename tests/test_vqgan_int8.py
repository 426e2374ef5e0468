"""int8 engines carry a statically quantized VQGAN (export/vqgan_quant.py): its expensive convs
in int8, close to fp32 on faces it was not calibrated on, and the same bytes on every export.

Measured on the bundled model (trained; 64 held-out faces): decoder 50.9 dB PSNR against fp32
(49.6 dB the worst face), encoder codes 98.2 % the same as fp32's. The bounds leave margin.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import facert
from facert.export.onnx_export import export_engine
from facert.export.train.data import EVAL_SEED, faces
from facert.export.vqgan_quant import (
    QUANTIZED_CONVS,
    named_convs,
    quantized_convs,
    subpixel_upsampling,
)
from facert.runtime.config import load_config
from facert.runtime.images import scale_pixels, to_uint8

MODEL = Path(facert.BUNDLED_MODEL)
HELD_OUT = 32
MIN_PSNR_DB = 45.0
MIN_CODE_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    """The bundled model exported twice at int8 and once at fp32."""
    root = tmp_path_factory.mktemp("engines")
    out = {"int8": root / "int8", "int8-again": root / "int8-again", "fp32": root / "fp32"}
    for name, path in out.items():
        export_engine(MODEL, path, name.removesuffix("-again"))
    return out


def _graph(engine: Path, name: str, weights: bool = True) -> onnx.ModelProto:
    return onnx.load(engine / f"{name}.onnx", load_external_data=weights)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) of decoder outputs in [-1, 1], compared as the uint8 images users get."""
    mse = ((to_uint8(a).astype(np.float64) - to_uint8(b)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    config = load_config(MODEL)
    images, _ = faces(EVAL_SEED, range(HELD_OUT), config.vqgan.resolution)
    return scale_pixels(images, config.image_scaling)


@pytest.mark.parametrize("graph", ["vqgan_encoder", "vqgan_decoder"])
def test_int8_engine_quantizes_the_chosen_convs(engines, graph):
    fp32 = named_convs(_graph(engines["fp32"], graph, weights=False))
    chosen = [n for n in fp32.graph.node if n.op_type == "Conv"
              and re.search(QUANTIZED_CONVS[graph], n.name)]  # fmt: skip
    assert len(chosen) >= 6
    assert quantized_convs(_graph(engines["int8"], graph, weights=False)) == len(chosen)
    assert quantized_convs(fp32) == 0


def test_int8_decoder_is_close_to_fp32(engines, held_out):
    codes = _session(_graph(engines["fp32"], "vqgan_encoder")).run(None, {"images": held_out})[0]
    fp32, int8 = (
        _session(_graph(engines[p], "vqgan_decoder")).run(None, {"codes": codes})[0]
        for p in ("fp32", "int8")
    )
    assert _psnr(fp32, int8) > MIN_PSNR_DB


def test_int8_encoder_gives_fp32_codes(engines, held_out):
    fp32, int8 = (
        _session(_graph(engines[p], "vqgan_encoder")).run(None, {"images": held_out})[0]
        for p in ("fp32", "int8")
    )
    assert (fp32 == int8).mean() > MIN_CODE_AGREEMENT


def test_int8_export_is_deterministic(engines):
    first, again = engines["int8"], engines["int8-again"]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in names)


def test_subpixel_upsampling_computes_the_same_images(engines, held_out):
    """The int8 decoder's upsampling convs run sub-pixel; in fp32 that changes only rounding."""
    codes = _session(_graph(engines["fp32"], "vqgan_encoder")).run(None, {"images": held_out})[0]
    decoder = _graph(engines["fp32"], "vqgan_decoder")
    rewritten = subpixel_upsampling(decoder)
    assert sum(n.op_type == "DepthToSpace" for n in rewritten.graph.node) >= 1
    fp32, subpixel = (_session(m).run(None, {"codes": codes})[0] for m in (decoder, rewritten))
    np.testing.assert_allclose(subpixel, fp32, atol=1e-4)
