"""int8 VQGAN graphs for int8 engines: static quantization of the expensive convolutions.

What is quantized, and why only that (measured on the base shape, the taming FFHQ VQGAN's
shapes with random weights; bench/results/vqgan.md): with every convolution in int8 the
decoder's images came out at 30 dB PSNR against fp32's, because each quantized input adds its
rounding noise and the noise adds up over 59 convolutions. The noise comes mostly from the
activations. The inputs of the convolutions inside residual blocks (conv1, conv2) are
normalized and bounded and lose little; the others (upsampling and shortcut convolutions,
q/k/v, the first and last layers) read the raw residual stream, whose wide range leaves few
levels for most values (one upsampling conv alone cost more than the six block convs of the
256-pixel level). So only conv1 and conv2 of the high-resolution levels run in int8: 71 % of
the decoder's multiply-adds (41 dB) and 82 % of the encoder's (85 % of codes as fp32's on the
random weights, whose codes are near ties; 98 % on the trained bundled model, whose changed
codes decode to images over 70 dB PSNR from fp32's). The decoder's upsampling convs, left in fp32,
run sub-pixel instead (subpixel_upsampling: the same result in 44 % of the arithmetic). fp32
engines keep the graphs as built.

How: onnxruntime.quantization.quantize_static, QDQ format, u8 activations and per-channel s8
weights in 7 bits (reduce_range), MinMax ranges over synthetic faces (export/synthetic.py)
through the fp32 encoder, and their codes for the decoder. u8 x s8 runs on VNNI's vpdpbusd
(u8 x u8 was 1.6x slower here). Without VNNI, ONNX Runtime's int8 convolution
(MLAS ConvSymKernelAvx2) multiplies with vpmaddubsw, which adds u8 x s8 products in pairs into
saturating int16: 7-bit weights keep every pair within int16 (2 x 255 x 64 < 32768), so an
engine's int8 sums are exact on any x86 it is copied to, as the LM's are (onnx_export.py). The
calibration faces come from a fixed dataset seed, so exporting twice gives identical graphs.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from facert.runtime.config import ModelConfig
from facert.runtime.images import scale_pixels

# Conv nodes (named by their weight, taming's names) that int8 engines run in int8.
QUANTIZED_CONVS = {
    "vqgan_encoder": r"^encoder\.down\.[012]\.block\.\d+\.conv[12]$",
    "vqgan_decoder": r"^decoder\.up\.[012]\.block\.\d+\.conv[12]$",
}
CALIBRATION_SEED = 0  # export/train/data.py's TRAIN_SEED: faces like those the model learned
CALIBRATION_FACES = 8


class _Batches:
    """The CalibrationDataReader protocol: one input dict per call, None at the end."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self._items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def image_batches(images: np.ndarray) -> _Batches:
    """Calibration data for the encoder: one image per run."""
    return _Batches("images", [x[None] for x in images])


def code_batches(codes: np.ndarray) -> _Batches:
    """Calibration data for the decoder: one image's codes per run."""
    return _Batches("codes", [c[None] for c in codes])


def calibration_images(config: ModelConfig, n: int = CALIBRATION_FACES) -> np.ndarray:
    """n synthetic faces at the model's resolution, scaled as the encoder takes them: the same
    faces on every export, so the ranges (and the engine's bytes) repeat."""
    from .train.data import faces

    images, _ = faces(CALIBRATION_SEED, range(n), config.vqgan.resolution)
    return scale_pixels(images, config.image_scaling)


def named_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose Conv nodes carry their weight's name (the quantizer selects nodes by
    name, and the graphs leave nodes unnamed)."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node in named.graph.node:
        if node.op_type == "Conv":
            node.name = node.input[1].removesuffix(".weight")
    return named


def quantize_graph(
    model: onnx.ModelProto, pattern: str, reader: _Batches, cache: Path | None = None
) -> onnx.ModelProto:
    """The Conv nodes whose names match `pattern` in int8, the rest as they were. `cache`: a
    file for the calibrated ranges, read if it exists (bench/vqgan.py compares several
    patterns on one calibration), else written."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .onnx_export import _quiet_quantizer_logs

    named = named_convs(model)
    convs = [n.name for n in named.graph.node if n.op_type == "Conv"]
    excluded = [name for name in convs if not re.search(pattern, name)]
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer_logs():
        out = Path(tmp) / "q.onnx"
        quantize_static(
            named, out, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
            nodes_to_exclude=excluded, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
        )  # fmt: skip
        return onnx.load(out)


def encode(encoder: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """Codes of images through an encoder graph (the decoder's calibration data)."""
    session = ort.InferenceSession(encoder.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def quantize_vqgan(
    encoder: onnx.ModelProto, decoder: onnx.ModelProto, config: ModelConfig
) -> dict[str, onnx.ModelProto]:
    """fp32 vqgan_encoder and vqgan_decoder -> their int8 versions (QUANTIZED_CONVS in int8,
    the rest fp32, the decoder's upsampling sub-pixel), calibrated on synthetic faces and on the
    codes the fp32 encoder gives them."""
    images = calibration_images(config)
    codes = encode(encoder, images)
    decoder = subpixel_upsampling(decoder)
    return {
        "vqgan_encoder": quantize_graph(
            encoder, QUANTIZED_CONVS["vqgan_encoder"], image_batches(images)
        ),
        "vqgan_decoder": quantize_graph(
            decoder, QUANTIZED_CONVS["vqgan_decoder"], code_batches(codes)
        ),
    }


def quantized_convs(model: onnx.ModelProto) -> int:
    """How many Conv nodes of a QDQ graph read int8 weights (through a DequantizeLinear)."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dequantized)


# Sub-pixel upsampling. A 3x3 conv after a nearest 2x upsampling reads each input pixel up to
# four times: each output phase (row parity a, column parity b) sees only a 2x2 window of the
# input, whose taps are sums of the 3x3 taps. Rows: phase 0 reads input rows i-1 and i with
# taps (w0, w1 + w2), phase 1 rows i and i+1 with (w0 + w1, w2); columns alike.
_PHASE_TAPS = (
    np.array([[1, 0, 0], [0, 1, 1]], np.float32),
    np.array([[1, 1, 0], [0, 0, 1]], np.float32),
)


def _subpixel_kernel(w: np.ndarray) -> np.ndarray:
    """(C, Cin, 3, 3) -> (4 C, Cin, 2, 2): one 2x2 kernel per phase, phases (0,0), (0,1),
    (1,0), (1,1) in DepthToSpace's DCR channel order."""
    phases = [
        np.einsum("yi,ocij,xj->ocyx", _PHASE_TAPS[a], w, _PHASE_TAPS[b])
        for a in (0, 1)
        for b in (0, 1)
    ]
    return np.concatenate(phases).astype(np.float32)


def _upsampling_conv(node: onnx.NodeProto, readers: dict, weights: dict) -> onnx.NodeProto | None:
    """The 3x3 conv (stride 1, padding 1) that alone reads a nearest Resize's output, if any."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type != "Resize" or attrs.get("mode") != b"nearest":
        return None
    found = readers.get(node.output[0], [])
    if len(found) != 1 or found[0].op_type != "Conv" or found[0].input[1] not in weights:
        return None
    conv = found[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    square = weights[conv.input[1]].dims[2:] == [3, 3]
    if not square or attrs.get("pads") != [1] * 4 or attrs.get("strides", [1, 1]) != [1, 1]:
        return None
    return conv


def _subpixel_nodes(x: str, conv: onnx.NodeProto, weights: dict) -> tuple[list, list]:
    """Nodes and initializers computing `conv` of the 2x upsampled x from x itself: one 2x2
    conv per phase (padded on the side it reads), concatenated and interleaved."""
    w = onnx.numpy_helper.to_array(weights[conv.input[1]])
    bias = onnx.numpy_helper.to_array(weights[conv.input[2]])
    kernels, c = _subpixel_kernel(w), w.shape[0]
    base = conv.input[1].removesuffix(".weight")
    nodes, inits, phases = [], [], []
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        name = f"{base}.phase{a}{b}"
        inits += [onnx.numpy_helper.from_array(kernels[k * c : (k + 1) * c], f"{name}.weight"),
                  onnx.numpy_helper.from_array(bias, f"{name}.bias")]  # fmt: skip
        phases.append(f"{name}.out")
        nodes.append(onnx.helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [phases[-1]], name=name,
            kernel_shape=[2, 2], pads=[1 - a, 1 - b, a, b],
        ))  # fmt: skip
    nodes += [
        onnx.helper.make_node("Concat", phases, [f"{base}.phases"], axis=1),
        onnx.helper.make_node(
            "DepthToSpace", [f"{base}.phases"], [conv.output[0]], blocksize=2, mode="DCR"
        ),
    ]
    return nodes, inits


def subpixel_upsampling(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every nearest 2x upsampling followed by a 3x3 conv runs as 2x2 convs on the
    small input (4 x 4 taps at a quarter of the pixels instead of 9: 2.25x fewer multiply-adds
    in the decoder's four upsampling convs, the same result up to float rounding)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    nodes, inits, skipped = [], [], set()
    for node in graph.node:
        conv = _upsampling_conv(node, readers, weights)
        if conv is None:
            if id(node) not in skipped:
                nodes.append(node)
            continue
        new_nodes, new_inits = _subpixel_nodes(node.input[0], conv, weights)
        nodes += new_nodes  # where the Resize was: x exists, the conv's readers come later
        inits += new_inits
        skipped.add(id(conv))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out
