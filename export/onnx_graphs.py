"""ONNX graphs of the LM and the VQGAN, built straight from a model directory's weights.

Built by hand (onnx.helper + numpy, no torch) so that every operator is the fused one ONNX
Runtime runs fastest: MultiHeadAttention with an additive prefix mask for prefill,
GroupQueryAttention over a preallocated KV buffer for decode (keys and values are written in
place at each row's position), SkipLayerNormalization for residual + LayerNorm, FastGelu.

TencentPretrain's LayerNorm (unbiased std, eps added to the std) is expressed as a standard
LayerNormalization with gamma scaled by sqrt((N-1)/N) and the variance's eps that gives the same
result for a constant row (`layer_norm_epsilon`: eps^2 (N-1)/N, about 1e-12 for its 1e-6); the
difference is the eps placement only (measured in tests/test_onnxruntime.py against the exact
torch model).

Graphs (B rows, T prompt positions, C hidden, H heads, D head size, M cache capacity):
  lm_prefill   input_ids, segment_ids (B, T)  ->  hidden (B, T, C),
               present_{key,value}_L (B, H, T, D)
  lm_decode    input_ids, position_ids (B, 1), seqlens_k (B,), total_sequence_length (),
               past_{key,value}_L (B, H, M, D)  ->  hidden (B, 1, C), present_{key,value}_L (same
               buffers as past when bound so)
  head_text / head_image   hidden (N, C) -> logits (N, W): the LM head over one vocabulary window
  vqgan_encoder  images (N, 3, R, R) scaled  ->  codes (N, h*w) int64 (argmin inside the graph)
  vqgan_decoder  codes (N, h*w)  ->  images (N, 3, R, R) in [-1, 1]
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facert.runtime.config import (
    VQGAN_NORM_EPS,
    VQGAN_NORM_GROUPS,
    LMConfig,
    ModelConfig,
    VQGANConfig,
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # what current ONNX Runtime releases read
MASK_VALUE = -10000.0
FLOAT, INT64, INT32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


class Graph:
    """A small builder: nodes, initializers and named values."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        return self.weight(self.fresh(hint), np.asarray(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def node(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain, **attrs))

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
        model.producer_name = "facert"
        return model


# ----------------------------------------------------------------------------- LM


def layer_norm_epsilon(cfg: LMConfig) -> float:
    """The eps of a standard LayerNormalization (added to the biased variance, gamma scaled by
    _ln_gamma) that gives TencentPretrain's LayerNorm (eps added to the unbiased std) of the
    config's eps for a row whose values are all equal; rows that vary differ by the eps' place
    only."""
    n = cfg.n_embd
    return cfg.layernorm_eps**2 * (n - 1) / n


def _ln_gamma(gamma: np.ndarray) -> np.ndarray:
    n = gamma.shape[0]
    return (gamma * np.float32(math.sqrt((n - 1) / n))).astype(np.float32)


class _LMWeights:
    """The LM's weights laid out for MatMul (in, out), shared by name across graphs."""

    def __init__(self, g: Graph, w: dict[str, np.ndarray], cfg: LMConfig):
        self.g, self.w, self.cfg = g, w, cfg

    def get(self, name: str) -> str:
        """Initializer for a facert LM tensor, transformed for its use; added once per graph."""
        if not any(i.name == name for i in self.g.initializers):
            self.g.weight(name, self._array(name))
        return name

    def _array(self, name: str) -> np.ndarray:
        w = self.w
        if name.endswith(".qkv.weight"):  # (C, 3C)
            p = name[: -len("qkv.weight")]
            return np.concatenate([w[p + f"{x}.weight"].T for x in "qkv"], axis=1)
        if name.endswith(".qkv.bias"):
            p = name[: -len("qkv.bias")]
            return np.concatenate([w[p + f"{x}.bias"] for x in "qkv"])
        if name.endswith(".ln_weight"):
            return _ln_gamma(w[name[: -len("ln_weight")] + "weight"])
        if name in ("head_text", "head_image"):
            lo, hi = _window(self.cfg, name)
            return np.ascontiguousarray(w["lm_head.weight"][lo:hi].T)  # (C, W)
        if name.startswith("blocks.") and w[name].ndim == 2:
            return np.ascontiguousarray(w[name].T)  # Linear (out, in) -> MatMul (in, out)
        return w[name]


def _window(cfg: LMConfig, head: str) -> tuple[int, int]:
    return (
        (0, cfg.text_vocab_size) if head == "head_text" else (cfg.text_vocab_size, cfg.vocab_size)
    )


def _transformer(g: Graph, W: _LMWeights, x: str, attention, cfg: LMConfig) -> str:
    """Pre-LN blocks with residual adds fused into SkipLayerNormalization; returns ln_f(x)."""
    eps = layer_norm_epsilon(cfg)
    a = g.op(
        "LayerNormalization",
        [x, W.get("blocks.0.ln_1.ln_weight"), W.get("blocks.0.ln_1.bias")],
        axis=-1,
        epsilon=eps,
    )
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        qkv = g.op("MatMul", [a, W.get(p + "attn.qkv.weight")])
        y = attention(i, qkv, W.get(p + "attn.qkv.bias"))  # (B, T, C)
        proj = g.op("MatMul", [y, W.get(p + "attn.proj.weight")])
        m, h = g.op(
            "SkipLayerNormalization",
            [
                proj,
                x,
                W.get(p + "ln_2.ln_weight"),
                W.get(p + "ln_2.bias"),
                W.get(p + "attn.proj.bias"),
            ],
            n_out=4,
            domain=MS_DOMAIN,
            epsilon=eps,
        )[::3]
        fc = g.op("MatMul", [m, W.get(p + "mlp.fc.weight")])
        act = g.op("FastGelu", [fc, W.get(p + "mlp.fc.bias")], domain=MS_DOMAIN)
        out = g.op("MatMul", [act, W.get(p + "mlp.proj.weight")])
        nxt = f"blocks.{i + 1}.ln_1." if i + 1 < cfg.n_layer else "ln_f."
        a, x = g.op(
            "SkipLayerNormalization",
            [out, h, W.get(nxt + "ln_weight"), W.get(nxt + "bias"), W.get(p + "mlp.proj.bias")],
            n_out=4,
            domain=MS_DOMAIN,
            epsilon=eps,
        )[::3]
    return a


def prompt_inputs(g: Graph, W: _LMWeights) -> tuple[str, str]:
    """A prompt's inputs, input_ids and segment_ids (B, T) -> its embeddings (B, T, C) and the
    additive prefix-mask bias (B, 1, T, T): what every prefill graph starts from."""
    ids = g.input("input_ids", INT64, ["batch", "length"])
    segs = g.input("segment_ids", INT64, ["batch", "length"])
    length = g.op("Gather", [g.op("Shape", [ids]), g.const(1, np.int64)])
    positions = g.op("Range", [g.const(0, np.int64), length, g.const(1, np.int64)])  # (T,)
    x = g.op(
        "Add",
        [
            g.op("Gather", [W.get("wte.weight"), ids]),
            g.op("Gather", [W.get("wpe.weight"), positions]),
        ],
    )
    x = g.op("Add", [x, g.op("Gather", [W.get("wse.weight"), segs])])  # (B, T, C)

    # Prefix mask: key j visible to query i iff two of (seg_j == 1, seg_j > 0, j <= i) hold.
    seg_j = g.op("Unsqueeze", [segs, g.const([1, 2], np.int64)])  # (B, 1, 1, T)
    rows = g.op("Unsqueeze", [positions, g.const([1], np.int64)])  # (T, 1)
    causal = g.op("LessOrEqual", [positions, rows])  # (T, T): [i, j] = j <= i
    votes = g.op(
        "Add",
        [
            g.op(
                "Add",
                [
                    g.op("Cast", [g.op("Equal", [seg_j, g.const(1, np.int64)])], to=FLOAT),
                    g.op("Cast", [g.op("Greater", [seg_j, g.const(0, np.int64)])], to=FLOAT),
                ],
            ),
            g.op("Cast", [causal], to=FLOAT),
        ],
    )  # (B, 1, T, T)
    hidden_mask = g.op("Cast", [g.op("Less", [votes, g.const(2.0)])], to=FLOAT)
    bias = g.op("Mul", [hidden_mask, g.const(MASK_VALUE)])  # (B, 1, T, T)
    return x, bias


def lm_prefill_graph(w: dict[str, np.ndarray], cfg: LMConfig) -> onnx.ModelProto:
    g = Graph("lm_prefill")
    W = _LMWeights(g, w, cfg)
    x, bias = prompt_inputs(g, W)

    def attention(i: int, qkv: str, qkv_bias: str) -> str:
        q, k, v = g.op("Split", [qkv], n_out=3, axis=-1)
        out = g.fresh("attn")
        g.node(
            "MultiHeadAttention",
            [q, k, v, qkv_bias, "", bias],
            [out, f"present_key_{i}", f"present_value_{i}"],
            domain=MS_DOMAIN,
            num_heads=cfg.n_head,
        )
        return out

    hidden = _transformer(g, W, x, attention, cfg)
    g.node("Identity", [hidden], ["hidden"])
    g.output("hidden", FLOAT, ["batch", "length", cfg.n_embd])
    for i in range(cfg.n_layer):
        for kv in ("key", "value"):
            g.output(f"present_{kv}_{i}", FLOAT, ["batch", cfg.n_head, "length", cfg.head_dim])
    return g.model()


def lm_decode_graph(w: dict[str, np.ndarray], cfg: LMConfig) -> onnx.ModelProto:
    g = Graph("lm_decode")
    W = _LMWeights(g, w, cfg)
    ids = g.input("input_ids", INT64, ["batch", 1])
    pos = g.input("position_ids", INT64, ["batch", 1])
    seqlens = g.input("seqlens_k", INT32, ["batch"])
    total = g.input("total_sequence_length", INT32, [])
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

    def attention(i: int, qkv: str, qkv_bias: str) -> str:
        packed = g.op("Add", [qkv, qkv_bias])  # (B, 1, 3C)
        out = g.fresh("attn")
        g.node(
            "GroupQueryAttention",
            [packed, "", "", f"past_key_{i}", f"past_value_{i}", seqlens, total],
            [out, f"present_key_{i}", f"present_value_{i}"],
            domain=MS_DOMAIN,
            num_heads=cfg.n_head,
            kv_num_heads=cfg.n_head,
        )
        return out

    hidden = _transformer(g, W, x, attention, cfg)
    g.node("Identity", [hidden], ["hidden"])
    g.output("hidden", FLOAT, ["batch", 1, cfg.n_embd])
    return g.model()


def lm_head_graph(w: dict[str, np.ndarray], cfg: LMConfig, head: str) -> onnx.ModelProto:
    g = Graph(head)
    W = _LMWeights(g, w, cfg)
    lo, hi = _window(cfg, head)
    h = g.input("hidden", FLOAT, ["rows", cfg.n_embd])
    g.node("MatMul", [h, W.get(head)], ["logits"])
    g.output("logits", FLOAT, ["rows", hi - lo])
    return g.model()


# ----------------------------------------------------------------------------- VQGAN


class _VQ:
    """Emit taming's VQGAN blocks; weights keep taming's names."""

    def __init__(self, g: Graph, w: dict[str, np.ndarray]):
        self.g, self.w = g, w

    def p(self, name: str) -> str:
        if not any(i.name == name for i in self.g.initializers):
            self.g.weight(name, self.w[name])
        return name

    def conv(self, x: str, name: str, stride: int = 1, pad: int | None = None) -> str:
        k = self.w[name + ".weight"].shape[-1]
        pad = k // 2 if pad is None else pad
        return self.g.op(
            "Conv",
            [x, self.p(name + ".weight"), self.p(name + ".bias")],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
        )

    def norm(self, x: str, name: str) -> str:
        """taming's GroupNorm as InstanceNormalization over (N, groups, C/groups*H*W)."""
        g, groups = self.g, VQGAN_NORM_GROUPS
        C = self.w[name + ".weight"].shape[0]
        shape = g.op("Shape", [x])
        grouped = g.op("Reshape", [x, g.const([0, groups, -1], np.int64)])
        normed = g.op(
            "InstanceNormalization",
            [grouped, g.const(np.ones(groups)), g.const(np.zeros(groups))],
            epsilon=VQGAN_NORM_EPS,
        )
        y = g.op("Reshape", [normed, shape])
        gamma = g.weight(name + ".weight", self.w[name + ".weight"].reshape(C, 1, 1))
        beta = g.weight(name + ".bias", self.w[name + ".bias"].reshape(C, 1, 1))
        return g.op("Add", [g.op("Mul", [y, gamma]), beta])

    def swish(self, x: str) -> str:
        return self.g.op("Mul", [x, self.g.op("Sigmoid", [x])])

    def resnet(self, x: str, name: str) -> str:
        h = self.conv(self.swish(self.norm(x, name + ".norm1")), name + ".conv1")
        h = self.conv(self.swish(self.norm(h, name + ".norm2")), name + ".conv2")
        shortcut = (
            self.conv(x, name + ".nin_shortcut") if name + ".nin_shortcut.weight" in self.w else x
        )
        return self.g.op("Add", [shortcut, h])

    def attn(self, x: str, name: str) -> str:
        g = self.g
        C = self.w[name + ".q.weight"].shape[0]
        n = self.norm(x, name + ".norm")
        shape = g.op("Shape", [x])
        flat = g.const([0, C, -1], np.int64)
        q = g.op(
            "Transpose", [g.op("Reshape", [self.conv(n, name + ".q"), flat])], perm=[0, 2, 1]
        )  # (B, HW, C)
        k = g.op("Reshape", [self.conv(n, name + ".k"), flat])  # (B, C, HW)
        v = g.op("Reshape", [self.conv(n, name + ".v"), flat])  # (B, C, HW)
        wts = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, k]), g.const(C**-0.5)])], axis=2)
        h = g.op("MatMul", [v, g.op("Transpose", [wts], perm=[0, 2, 1])])  # (B, C, HW)
        return g.op("Add", [x, self.conv(g.op("Reshape", [h, shape]), name + ".proj_out")])

    def level(self, x: str, name: str) -> str:
        j = 0
        while f"{name}.block.{j}.conv1.weight" in self.w:
            x = self.resnet(x, f"{name}.block.{j}")
            if f"{name}.attn.{j}.q.weight" in self.w:
                x = self.attn(x, f"{name}.attn.{j}")
            j += 1
        return x

    def mid(self, x: str, name: str) -> str:
        x = self.resnet(x, name + ".block_1")
        return self.resnet(self.attn(x, name + ".attn_1"), name + ".block_2")


def vqgan_encoder_graph(w: dict[str, np.ndarray], cfg: VQGANConfig) -> onnx.ModelProto:
    g = Graph("vqgan_encoder")
    vq = _VQ(g, w)
    x = g.input("images", FLOAT, ["batch", cfg.in_channels, cfg.resolution, cfg.resolution])
    h = vq.conv(x, "encoder.conv_in")
    for i in range(len(cfg.ch_mult)):
        h = vq.level(h, f"encoder.down.{i}")
        if f"encoder.down.{i}.downsample.conv.weight" in w:
            padded = g.op("Pad", [h, g.const([0, 0, 0, 0, 0, 0, 1, 1], np.int64)])  # right/bottom
            h = vq.conv(padded, f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
    h = vq.mid(h, "encoder.mid")
    z = vq.conv(vq.swish(vq.norm(h, "encoder.norm_out")), "encoder.conv_out")
    z = vq.conv(z, "quant_conv")  # (B, E, h, w)
    flat = g.op(
        "Reshape",
        [g.op("Transpose", [z], perm=[0, 2, 3, 1]), g.const([-1, cfg.embed_dim], np.int64)],
    )
    codebook = w["quantize.embedding.weight"]  # (K, E)
    # d = |z|^2 + |e|^2 - 2 z.e, the first minimum on ties, as taming computes it.
    zz = g.op("ReduceSum", [g.op("Mul", [flat, flat]), g.const([1], np.int64)], keepdims=1)
    ee = g.const((codebook**2).sum(1), hint="codebook_sq")
    ze = g.op("MatMul", [flat, g.weight("codebook_t", codebook.T.copy())])
    d = g.op("Sub", [g.op("Add", [zz, ee]), g.op("Mul", [ze, g.const(2.0)])])
    codes = g.op("ArgMin", [d], axis=1, keepdims=0, select_last_index=0)
    g.node("Reshape", [codes, g.const([-1, cfg.num_codes_per_image], np.int64)], ["codes"])
    g.output("codes", INT64, ["batch", cfg.num_codes_per_image])
    return g.model()


def vqgan_decoder_graph(w: dict[str, np.ndarray], cfg: VQGANConfig) -> onnx.ModelProto:
    g = Graph("vqgan_decoder")
    vq = _VQ(g, w)
    codes = g.input("codes", INT64, ["batch", cfg.num_codes_per_image])
    side = cfg.latent_size
    z = g.op("Gather", [g.weight("codebook", w["quantize.embedding.weight"]), codes])  # (B, T, E)
    z = g.op(
        "Transpose",
        [g.op("Reshape", [z, g.const([-1, side, side, cfg.embed_dim], np.int64)])],
        perm=[0, 3, 1, 2],
    )  # (B, E, h, w)
    h = vq.conv(vq.conv(z, "post_quant_conv"), "decoder.conv_in")
    h = vq.mid(h, "decoder.mid")
    for i in reversed(range(len(cfg.ch_mult))):
        h = vq.level(h, f"decoder.up.{i}")
        if f"decoder.up.{i}.upsample.conv.weight" in w:
            up = g.op(
                "Resize",
                [h, "", g.const([1.0, 1.0, 2.0, 2.0])],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
            h = vq.conv(up, f"decoder.up.{i}.upsample.conv")
    out = vq.conv(vq.swish(vq.norm(h, "decoder.norm_out")), "decoder.conv_out")
    g.node("Clip", [out, g.const(-1.0), g.const(1.0)], ["images"])
    g.output("images", FLOAT, ["batch", cfg.out_ch, cfg.resolution, cfg.resolution])
    return g.model()


def all_graphs(
    lm: dict[str, np.ndarray], vqgan: dict[str, np.ndarray], config: ModelConfig
) -> dict[str, onnx.ModelProto]:
    return {
        "lm_prefill": lm_prefill_graph(lm, config.lm),
        "lm_decode": lm_decode_graph(lm, config.lm),
        "head_text": lm_head_graph(lm, config.lm, "head_text"),
        "head_image": lm_head_graph(lm, config.lm, "head_image"),
        "vqgan_encoder": vqgan_encoder_graph(vqgan, config.vqgan),
        "vqgan_decoder": vqgan_decoder_graph(vqgan, config.vqgan),
    }
