"""`facert export`: a model directory -> ONNX graphs at one precision + manifest.json.

Precisions:
  fp32  the graphs as built (onnx_graphs.py)
  fp16  every float tensor in half precision, KV cache included (for GPU execution providers)
  int8  LM MatMul weights dynamically quantized (int8 weights, int8 activations per call)
  int4  LM MatMul weights as 4-bit blocks (MatMulNBits, block 32, symmetric)
For int4 the VQGAN stays fp32. For int8 the VQGAN's expensive convolutions run in int8 too,
statically calibrated on synthetic faces (vqgan_quant.py says which and why); the rest of it
stays fp32.

The LM's graphs share one weights file (`lm_weights.bin`): a tensor used by several of them (the
prefill and decode graphs hold the same layers) is stored once; each other graph has its own
(`vqgan_encoder_weights.bin`, ...), so a backend reads only what the graphs it loads hold. The
manifest lists the sha256 of every other file, which the loader checks as it reads them.
Exports are atomic and serialized between processes (runtime/onnx_engines.py says how).
Needs onnx and onnxruntime, not torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime

from facert.runtime.config import (
    LM_FILE,
    VQGAN_FILE,
    ModelConfig,
    load_config,
    read_model,
)
from facert.runtime.errors import FacertError, InvalidArgument, ModelFileError
from facert.runtime.files import directory_lock, staged
from facert.runtime.onnx_engines import (
    ENGINE_FORMAT,
    LM_GRAPHS,
    MANIFEST,
    PRECISIONS,
    check_writable,
    read_manifest,
    staleness,
    weights_file,
)

from .onnx_graphs import OPSET, all_graphs
from .vqgan_quant import quantize_vqgan

__all__ = ["ENGINE_FORMAT", "PRECISIONS", "export_engine", "read_manifest", "staleness"]
EXTERNAL_MIN_BYTES = 1024
FUSED_OPS = (
    "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization", "LayerNormalization",
    "FastGelu", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger",
)  # fmt: skip


@contextlib.contextmanager
def _quiet_quantizer_logs():
    """onnxruntime.quantization logs advice and per-node progress; keep the CLI readable."""
    loggers = [
        logging.getLogger(),
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer"),
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights in 7 bits (reduce_range): without VNNI, x86 adds u8 x s8 products in pairs into
    saturating int16 (AVX2's vpmaddubsw), which full-range weights overflow: on an AVX2-only
    EPYC the int8 graph's top-1 agreement with fp32 was 0.72 in 8 bits, 0.95 in 7. An engine
    must work on any x86 it is copied to, so every export leaves that bit out."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer_logs():
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
            per_channel=True, reduce_range=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )  # fmt: skip
        return onnx.load(out)


def _quantize_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4
    )
    with _quiet_quantizer_logs():
        quantizer.process()
    return quantizer.model.model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # ArgMin over code distances keeps fp32: near-ties decide which code an image gets.
    return convert_float_to_float16(model, keep_io_types=False, op_block_list=["ArgMin"])


def _transform(name: str, precision: str) -> Callable[[onnx.ModelProto], onnx.ModelProto] | None:
    if precision == "fp16":
        return _to_fp16
    if precision in ("int8", "int4") and name in LM_GRAPHS:
        return _quantize_int8 if precision == "int8" else _quantize_int4
    return None


def save_sharing_weights(models: dict[str, onnx.ModelProto], out_dir: Path) -> None:
    """Write each graph as NAME.onnx with its initializers (all but the smallest) in its
    weights file (`weights_file`), each distinct tensor (by content) stored once per file."""
    files: dict[str, tuple] = {}  # weights file -> (open file, {sha256: (offset, length)})
    with contextlib.ExitStack() as stack:
        for name, model in models.items():
            location = weights_file(name)
            if location not in files:
                files[location] = (stack.enter_context(open(out_dir / location, "wb")), {})
            f, offsets = files[location]
            for t in model.graph.initializer:
                raw = onnx.numpy_helper.to_array(t).tobytes()
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue  # shapes and scalars stay inline: shape inference reads them
                key = hashlib.sha256(raw).digest()
                if key not in offsets:
                    f.write(b"\0" * (-f.tell() % 64))  # 64-byte aligned, as ORT prefers
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                _point_at(t, location, *offsets[key])
    for name, model in models.items():
        onnx.save_model(model, out_dir / f"{name}.onnx")


def _point_at(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make an initializer refer to its bytes in a weights file instead of holding them."""
    t.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)


def _io(values) -> list[dict]:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    def dtype(v):
        return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name

    return [{"name": v.name, "dtype": dtype(v), "shape": dims(v)} for v in values]


def graph_entries(graphs: dict[str, onnx.ModelProto]) -> dict[str, dict]:
    """A manifest's "graphs": each graph's file, weights file, inputs and outputs."""
    return {
        n: {
            "file": f"{n}.onnx",
            "weights": weights_file(n),
            "inputs": _io(m.graph.input),
            "outputs": _io(m.graph.output),
        }  # fmt: skip
        for n, m in graphs.items()
    }


def export_engine(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
    needed: Callable[[], str | None] | None = None,
) -> dict:
    """Build all graphs of a model directory at one precision into `out_dir`; returns the
    manifest. The graphs are built in a temporary sibling directory and renamed into place, all
    under out_dir's export lock, so a reader never sees part of a directory and two exports
    never interleave. `needed`, asked once the lock is held, says why the export is still needed
    (None: another process has just written current graphs, which are kept)."""
    if precision not in PRECISIONS:
        raise InvalidArgument(
            f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    check_writable(out_dir)
    try:
        with directory_lock(out_dir):
            if needed is not None and needed() is None:
                return read_manifest(out_dir)
            with staged(out_dir) as tmp:
                return _build(model_dir, config, tmp, precision, progress)
    except OSError as e:  # a full disk, or a place that refuses writes after all
        raise FacertError(f"cannot write the engine directory {out_dir}: {e}") from e


def _build(
    model_dir: Path,
    config: ModelConfig,
    out_dir: Path,
    precision: str,
    progress: Callable[[str], None] | None,
) -> dict:
    files = read_model(model_dir, keep=(LM_FILE, VQGAN_FILE))  # hashed and kept in one read
    lm, vqgan = files.weights(LM_FILE), files.weights(VQGAN_FILE)
    try:
        graphs = all_graphs(lm, vqgan, config)
    except KeyError as e:  # the header of a damaged (or foreign) weights file lost a name
        raise ModelFileError(
            f"{model_dir} has no tensor {e.args[0]!r} ({LM_FILE} or {VQGAN_FILE} is damaged or "
            "belongs to another model): restore it or convert the model again"
        ) from e
    if precision == "int8":  # before the loop: calibrating the decoder runs the fp32 encoder
        if progress:
            progress("int8 vqgan")
        graphs.update(quantize_vqgan(graphs["vqgan_encoder"], graphs["vqgan_decoder"], config))
    for name in list(graphs):
        if (transform := _transform(name, precision)) is not None:
            if progress:
                progress(f"{precision} {name}")
            graphs[name] = transform(graphs[name])
    if progress:
        progress("writing")
    save_sharing_weights(graphs, out_dir)
    manifest = {
        "format": ENGINE_FORMAT,
        "precision": precision,
        "opset": OPSET,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "source_model_sha256": files.hash,
        "kv_cache": "per layer, keys and values (batch, heads, capacity, head_dim); lm_decode's "
        "GroupQueryAttention writes the new position in place when present_* is bound to past_*",
        "fused_ops": {n: _fused_counts(m) for n, m in graphs.items()},
        "graphs": graph_entries(graphs),
        "files": {f.name: file_sha256(f) for f in sorted(out_dir.iterdir())},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}
