"""TensorRT-ready ONNX graphs: the same model as onnx_graphs.py in standard ONNX operators only.

TensorRT's ONNX parser does not know ONNX Runtime's com.microsoft operators (MultiHeadAttention,
GroupQueryAttention, SkipLayerNormalization, FastGelu), so the LM is written here from the
operators it does support (export/tensorrt_operators.json lists them, with their source):
  LayerNorm   standard LayerNormalization (opset 17) with gamma scaled by sqrt((N-1)/N), eps
              1e-12: TencentPretrain's unbiased std with eps added to the std differs only in
              where eps goes (onnx_graphs.py, spec "LayerNorm")
  attention   MatMul / Add (the additive prefix mask, -10000) / Softmax / MatMul; the 1/sqrt(D)
              scale is folded into the query weights and bias (exact when D is a power of two)
  gelu_fast   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) from Mul/Add/Tanh
  KV cache    explicit inputs and outputs: decode takes past_{key,value}_L (B, H, M, D) and
              returns present_* of the same shape, the step's key/value written at each row's
              position with ScatterElements, attention over positions <= pos (the rest masked)
Precision lives in the graph, because TensorRT 11 builds strongly typed networks only (10.x
opts in with the STRONGLY_TYPED flag; the builder flags FP16/INT8 are gone in 11):
  fp32  as built
  fp16  every float tensor in half precision, KV cache included; LayerNormalization and the
        VQGAN's ArgMin stay fp32 behind Casts (statistics and near-tie code choices)
  int8  the LM's MatMul weights stored as int8, per output channel, symmetric (zero point 0,
        as TensorRT requires), each behind a DequantizeLinear; activations stay fp32 (a float16
        DequantizeLinear output needs opset 19). The VQGAN stays fp32, as in onnx_export.py.
The VQGAN graphs of onnx_graphs.py already use standard operators only and are reused as built.

Graphs (B rows, T prompt positions, C hidden, H heads, D head size, M cache capacity):
  lm_prefill   input_ids, segment_ids (B, T) int64 -> hidden (B, T, C),
               present_{key,value}_L (B, H, T, D)
  lm_decode    input_ids, position_ids (B, 1) int64, past_{key,value}_L (B, H, M, D)
               -> hidden (B, 1, C), present_{key,value}_L (B, H, M, D)
  head_text / head_image   hidden (N, C) -> logits (N, W)
  vqgan_encoder / vqgan_decoder   as in onnx_graphs.py
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from facert.runtime.config import LMConfig, ModelConfig

from .onnx_graphs import (
    FLOAT,
    INT64,
    MASK_VALUE,
    Graph,
    _LMWeights,
    _window,
    layer_norm_epsilon,
    prompt_inputs,
    vqgan_decoder_graph,
    vqgan_encoder_graph,
)

OPSET = 17
IR_VERSION = 9  # ONNX 1.15: read by every TensorRT 10.x parser and by ONNX Runtime
PRECISIONS = ("fp32", "fp16", "int8")
LM_GRAPHS = ("lm_prefill", "lm_decode", "head_text", "head_image")
GRAPHS = (*LM_GRAPHS, "vqgan_encoder", "vqgan_decoder")
FP32_OPS = ("LayerNormalization", "ArgMin")  # kept fp32 in fp16 graphs


class _Weights(_LMWeights):
    """onnx_graphs' LM weights with the attention scale folded into the query columns, and the
    MatMul weights optionally behind int8 DequantizeLinear nodes."""

    def __init__(self, g: Graph, w: dict[str, np.ndarray], cfg: LMConfig, int8: bool):
        super().__init__(g, w, cfg)
        self.int8 = int8
        self._dequantized: dict[str, str] = {}

    def _array(self, name: str) -> np.ndarray:
        a = super()._array(name)
        if name.endswith((".qkv.weight", ".qkv.bias")):
            a = a.copy()
            a[..., : self.cfg.n_embd] *= np.float32(1.0 / math.sqrt(self.cfg.head_dim))
        return a

    def matmul_weight(self, name: str) -> str:
        """A MatMul's (in, out) weight: the float initializer, or int8 -> DequantizeLinear."""
        if not self.int8:
            return self.get(name)
        if name not in self._dequantized:
            q, scale = quantize_per_channel(self._array(name))
            self._dequantized[name] = self.g.op(
                "DequantizeLinear",
                [self.g.weight(name + ".int8", q), self.g.weight(name + ".scale", scale)],
                axis=1,
            )
        return self._dequantized[name]


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) float weight -> int8 weight and float32 (out,) scales, symmetric per output
    column: w ~= q * scale, q in [-127, 127] (-128 unused, so the range is symmetric)."""
    amax = np.abs(w).max(axis=0)  # (out,)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _layer_norm(g: Graph, W: _Weights, x: str, prefix: str, eps: float) -> str:
    return g.op(
        "LayerNormalization",
        [x, W.get(prefix + "ln_weight"), W.get(prefix + "bias")],
        axis=-1,
        epsilon=eps,
    )


def _linear(g: Graph, W: _Weights, x: str, weight: str, bias: str) -> str:
    return g.op("Add", [g.op("MatMul", [x, W.matmul_weight(weight)]), W.get(bias)])


def _gelu_fast(g: Graph, x: str) -> str:
    """gelu_fast (tanh approximation) from standard operators; x^3 as x*x*x."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715)])])
    tanh = g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2.0 / math.pi))])])
    half_x = g.op("Mul", [x, g.const(0.5)])
    return g.op("Mul", [half_x, g.op("Add", [tanh, g.const(1.0)])])


def _transformer(g: Graph, W: _Weights, x: str, attention, cfg: LMConfig) -> str:
    """Pre-LN blocks; `attention(i, q, k, v)` takes (B, H, T, D) heads and returns (B, H, T, D).
    Returns ln_f(x), (B, T, C)."""
    H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
    eps = layer_norm_epsilon(cfg)
    to_heads = g.const([0, 0, H, D], np.int64)
    merge = g.const([0, 0, C], np.int64)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        a = _layer_norm(g, W, x, p + "ln_1.", eps)
        qkv = _linear(g, W, a, p + "attn.qkv.weight", p + "attn.qkv.bias")  # (B, T, 3C)
        q, k, v = (
            g.op("Transpose", [g.op("Reshape", [t, to_heads])], perm=[0, 2, 1, 3])
            for t in g.op("Split", [qkv], n_out=3, axis=-1)
        )  # (B, H, T, D) each
        y = attention(i, q, k, v)  # (B, H, T, D)
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), merge])  # (B, T, C)
        h = g.op("Add", [x, _linear(g, W, y, p + "attn.proj.weight", p + "attn.proj.bias")])
        m = _layer_norm(g, W, h, p + "ln_2.", eps)
        f = _gelu_fast(g, _linear(g, W, m, p + "mlp.fc.weight", p + "mlp.fc.bias"))
        x = g.op("Add", [h, _linear(g, W, f, p + "mlp.proj.weight", p + "mlp.proj.bias")])
    return _layer_norm(g, W, x, "ln_f.", eps)


def _attend(g: Graph, q: str, k: str, v: str, bias: str) -> str:
    """softmax(q k^T + bias) v; q is pre-scaled. (B, H, T, D), (B, H, S, D) -> (B, H, T, D)."""
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])  # (B, H, T, S)
    return g.op("MatMul", [g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1), v])


def lm_prefill_graph(w: dict[str, np.ndarray], cfg: LMConfig, int8: bool = False) -> Graph:
    g = Graph("lm_prefill")
    W = _Weights(g, w, cfg, int8)
    x, bias = prompt_inputs(g, W)

    def attention(i: int, q: str, k: str, v: str) -> str:
        g.node("Identity", [k], [f"present_key_{i}"])
        g.node("Identity", [v], [f"present_value_{i}"])
        return _attend(g, q, k, v, bias)

    g.node("Identity", [_transformer(g, W, x, attention, cfg)], ["hidden"])
    g.output("hidden", FLOAT, ["batch", "length", cfg.n_embd])
    for i in range(cfg.n_layer):
        for kv in ("key", "value"):
            g.output(f"present_{kv}_{i}", FLOAT, ["batch", cfg.n_head, "length", cfg.head_dim])
    return g


def lm_decode_graph(w: dict[str, np.ndarray], cfg: LMConfig, int8: bool = False) -> Graph:
    g = Graph("lm_decode")
    W = _Weights(g, w, cfg, int8)
    ids = g.input("input_ids", INT64, ["batch", 1])
    pos = g.input("position_ids", INT64, ["batch", 1])
    cache_shape = ["batch", cfg.n_head, "capacity", cfg.head_dim]
    for i in range(cfg.n_layer):
        for kv in ("key", "value"):
            g.input(f"past_{kv}_{i}", FLOAT, cache_shape)
            g.output(f"present_{kv}_{i}", FLOAT, cache_shape)
    seg2 = g.const(w["wse.weight"][2], hint="segment_2")  # every decoded token is segment 2
    x = g.op(
        "Add",
        [g.op("Gather", [W.get("wte.weight"), ids]), g.op("Gather", [W.get("wpe.weight"), pos])],
    )
    x = g.op("Add", [x, seg2])  # (B, 1, C)

    # Keys after a row's position are stale or empty: -10000 hides them, as in the prefix mask.
    capacity = g.op("Gather", [g.op("Shape", ["past_key_0"]), g.const(2, np.int64)])
    j = g.op("Range", [g.const(0, np.int64), capacity, g.const(1, np.int64)])  # (M,)
    later = g.op("Cast", [g.op("Greater", [j, pos])], to=FLOAT)  # (B, M)
    bias = g.op(
        "Unsqueeze", [g.op("Mul", [later, g.const(MASK_VALUE)]), g.const([1, 2], np.int64)]
    )  # (B, 1, 1, M)
    row_pos = g.op("Reshape", [pos, g.const([-1, 1, 1, 1], np.int64)])  # (B, 1, 1, 1)
    where: list[str] = []  # the scatter indices (B, H, 1, D), made once from layer 0's key

    def attention(i: int, q: str, k: str, v: str) -> str:
        if not where:
            where.append(g.op("Expand", [row_pos, g.op("Shape", [k])]))
        for kv, new in (("key", k), ("value", v)):
            g.node(
                "ScatterElements", [f"past_{kv}_{i}", where[0], new], [f"present_{kv}_{i}"], axis=2
            )
        return _attend(g, q, f"present_key_{i}", f"present_value_{i}", bias)

    g.node("Identity", [_transformer(g, W, x, attention, cfg)], ["hidden"])
    g.output("hidden", FLOAT, ["batch", 1, cfg.n_embd])
    return g


def lm_head_graph(w: dict[str, np.ndarray], cfg: LMConfig, head: str, int8: bool = False) -> Graph:
    g = Graph(head)
    W = _Weights(g, w, cfg, int8)
    lo, hi = _window(cfg, head)
    h = g.input("hidden", FLOAT, ["rows", cfg.n_embd])
    g.node("MatMul", [h, W.matmul_weight(head)], ["logits"])
    g.output("logits", FLOAT, ["rows", hi - lo])
    return g


def _standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """Only the default domain, at OPSET, in an IR version every pinned parser reads."""
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", OPSET))
    model.ir_version = IR_VERSION
    return model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=False, op_block_list=list(FP32_OPS))
    _sort_nodes(model.graph)  # the converter appends its Casts at the end
    return _standard(model)  # and may reset the IR version


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder nodes topologically (ONNX requires it; the order among ready nodes is kept)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph {graph.name} has a cycle or a missing input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def tensorrt_graphs(
    lm: dict[str, np.ndarray],
    vqgan: dict[str, np.ndarray],
    config: ModelConfig,
    precision: str = "fp32",
) -> dict[str, onnx.ModelProto]:
    """All six graphs at one precision (PRECISIONS), each using only standard ONNX operators."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    int8 = precision == "int8"
    c = config.lm
    graphs = {
        "lm_prefill": lm_prefill_graph(lm, c, int8).model(),
        "lm_decode": lm_decode_graph(lm, c, int8).model(),
        "head_text": lm_head_graph(lm, c, "head_text", int8).model(),
        "head_image": lm_head_graph(lm, c, "head_image", int8).model(),
        "vqgan_encoder": vqgan_encoder_graph(vqgan, config.vqgan),
        "vqgan_decoder": vqgan_decoder_graph(vqgan, config.vqgan),
    }
    graphs = {n: _standard(m) for n, m in graphs.items()}
    if precision == "fp16":
        graphs = {n: _to_fp16(m) for n, m in graphs.items()}
    return graphs


def op_types(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(domain, op type) of every node, "" for the default ONNX domain."""
    return {(n.domain if n.domain != "ai.onnx" else "", n.op_type) for n in model.graph.node}


OPERATORS_FILE = Path(__file__).with_name("tensorrt_operators.json")


def supported_operators() -> set[str]:
    """The operators TensorRT's ONNX parser imports (export/tensorrt_operators.json says from
    where, and for which TensorRT versions)."""
    return set(json.loads(OPERATORS_FILE.read_text())["supported"])


def unsupported_nodes(model: onnx.ModelProto, supported: set[str] | None = None) -> list[str]:
    """What TensorRT's parser would refuse in a graph: operators outside the supported list or
    the default domain, and the restrictions of operators this project uses that the list
    states (DequantizeLinear's zero point, LayerNormalization's extra outputs, Resize modes,
    axes that must be initializers). Empty when the graph is fine."""
    supported = supported_operators() if supported is None else supported
    consts = {t.name: t for t in model.graph.initializer}
    problems = []
    for n in model.graph.node:
        where = f"{model.graph.name}: {n.op_type} {n.name or n.output[0]}"
        if n.domain not in ("", "ai.onnx") or n.op_type not in supported:
            problems.append(f"{where}: {n.domain or 'ai.onnx'}.{n.op_type} is not supported")
        elif n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2]:
            zero = consts.get(n.input[2])
            if zero is None or numpy_helper.to_array(zero).any():
                problems.append(f"{where}: the zero point must be a zero initializer")
        elif n.op_type == "LayerNormalization" and len([o for o in n.output if o]) > 1:
            problems.append(f"{where}: only the first output is supported")
        elif n.op_type in ("ReduceSum", "Unsqueeze") and n.input[1:] and n.input[1] not in consts:
            problems.append(f"{where}: axes must be an initializer")
        elif n.op_type == "Resize":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for key, allowed in _RESIZE.items():
                value = attrs.get(key, _RESIZE_DEFAULTS[key])
                value = value.decode() if isinstance(value, bytes) else value
                if value not in allowed:
                    problems.append(f"{where}: {key} {value!r} is not supported")
    return problems


_RESIZE = {
    "mode": ("nearest", "linear"),
    "coordinate_transformation_mode": (
        "half_pixel",
        "pytorch_half_pixel",
        "tf_half_pixel_for_nn",
        "asymmetric",
        "align_corners",
    ),
    "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
    "antialias": (0,),
}
_RESIZE_DEFAULTS = {
    "mode": "nearest",
    "coordinate_transformation_mode": "half_pixel",
    "nearest_mode": "round_prefer_floor",
    "antialias": 0,
}


# ----------------------------------------------------------------------------- export

FORMAT = 1  # of a TensorRT-ready ONNX directory (manifest.json "format")
KV_CACHE = (
    "per layer, keys and values (batch, heads, capacity, head_dim), explicit graph inputs "
    "past_* and outputs present_*: lm_decode writes the step at each row's position "
    "(ScatterElements) and returns whole buffers, so a runtime alternates two of them"
)


def export_tensorrt(model_dir: str | Path, out_dir: str | Path, precision: str = "fp16") -> dict:
    """Write a model directory's six graphs at one precision, TensorRT-ready, into `out_dir`
    (NAME.onnx + weights files, as onnx_export.py lays them out) with manifest.json; returns the
    manifest. Refuses (FacertError) a graph that TensorRT's parser would not import. The
    manifest's `graphs_sha256` names these exact graphs in engine cache keys
    (tensorrt_build.engine_key). Atomic and serialized like `export_engine`."""
    from facert.runtime.config import LM_FILE, VQGAN_FILE, load_config, read_model
    from facert.runtime.errors import FacertError, InvalidArgument
    from facert.runtime.files import directory_lock, staged
    from facert.runtime.onnx_engines import check_writable

    if precision not in PRECISIONS:
        raise InvalidArgument(
            f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    files = read_model(model_dir, keep=(LM_FILE, VQGAN_FILE))  # hashed and kept in one read
    graphs = tensorrt_graphs(files.weights(LM_FILE), files.weights(VQGAN_FILE), config, precision)
    problems = [p for m in graphs.values() for p in unsupported_nodes(m)]
    if problems:
        raise FacertError("TensorRT's ONNX parser would refuse: " + "; ".join(problems))
    check_writable(out_dir)
    try:
        with directory_lock(out_dir), staged(out_dir) as tmp:
            return _write(graphs, files.hash, tmp, precision)
    except OSError as e:
        raise FacertError(f"cannot write the TensorRT graph directory {out_dir}: {e}") from e


def _write(graphs: dict[str, onnx.ModelProto], source_hash: str, out: Path, precision: str) -> dict:
    from facert.runtime.onnx_engines import MANIFEST

    from .onnx_export import file_sha256, graph_entries, save_sharing_weights

    save_sharing_weights(graphs, out)
    files = {f.name: file_sha256(f) for f in sorted(out.iterdir())}
    manifest = {
        "format": FORMAT,
        "target": "tensorrt",
        "precision": precision,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "onnx_version": onnx.__version__,
        "source_model_sha256": source_hash,
        "graphs_sha256": graphs_hash(files),
        "kv_cache": KV_CACHE,
        "graphs": graph_entries(graphs),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def graphs_hash(files: dict[str, str]) -> str:
    """One sha256 over every file's name and sha256: changes when any graph or weight does."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()
