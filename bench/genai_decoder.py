"""facert's exported decode graph made into an onnxruntime-genai decoder (contestant (c)).

lm_decode.onnx already has the KV layout genai's shared-buffer mode expects (GroupQueryAttention
writing in place into (batch, heads, capacity, head_dim) buffers). Three edits make it fit:
  - input_ids and position_ids take any length, so the same graph runs the prompt;
  - seqlens_k and total_sequence_length, which genai does not feed, are computed from genai's
    attention_mask (mask sum - 1, mask width);
  - the final hidden state is projected onto the full vocabulary (`logits`), as genai samples.
What this changes, for reading its numbers: genai's prompt pass is causal (GroupQueryAttention
has no prefix mask) and every token carries segment 2, so its tokens are not Talk2Face's; each
step does facert's decode work plus the full-vocabulary head (the reference samples from the
full vocabulary too).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facert.runtime.config import LM_FILE, load_config, load_weights, model_hash
from facert.runtime.onnx_engines import cache_root, resolve_engine

CONFIG = "genai_config.json"


def _dynamic_length(value: onnx.ValueInfoProto) -> None:
    dim = value.type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "sequence"


def decoder_graph(engine_dir: Path, lm_head: np.ndarray) -> onnx.ModelProto:
    """lm_decode.onnx (fp32) + the full (V, C) LM head -> a genai decoder graph."""
    model = onnx.load(engine_dir / "lm_decode.onnx")  # weights loaded from the engine's file
    g = model.graph
    inputs = [v for v in g.input if v.name not in ("seqlens_k", "total_sequence_length")]
    for v in inputs:
        if v.name in ("input_ids", "position_ids"):
            _dynamic_length(v)
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
    inputs.append(mask)
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(lm_head.T), "lm_head_t"),  # (C, V)
        numpy_helper.from_array(np.array([1], np.int64), "mask_axis"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
    ])  # fmt: skip
    from_mask = [
        helper.make_node("ReduceSum", ["attention_mask", "mask_axis"], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["mask_last"]),
        helper.make_node("Cast", ["mask_last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["mask_width"]),
        helper.make_node("Cast", ["mask_width"], ["total_sequence_length"], to=TensorProto.INT32),
    ]
    *body, last = g.node
    if last.op_type != "Identity" or last.output[0] != "hidden":
        raise ValueError("lm_decode.onnx no longer ends in Identity -> hidden")
    head = helper.make_node("MatMul", [last.input[0], "lm_head_t"], ["logits"])
    del g.node[:]
    g.node.extend([*from_mask, *body, head])
    outputs = [v for v in g.output if v.name != "hidden"]
    logits = helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, ["batch", "sequence", lm_head.shape[0]]
    )
    del g.output[:]
    g.output.extend([logits, *outputs])
    return model


def genai_config(model_dir: Path, threads: int | None) -> dict:
    lm = load_config(model_dir).lm
    session = {"log_id": "facert-bench", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = threads
    kinds = ("past_key", "past_value", "present_key", "present_value")
    names = {kind: f"{kind}_%d" for kind in kinds}
    return {
        "model": {
            "type": "llama",  # any decoder-only type: the graph does all the model-specific math
            "vocab_size": lm.vocab_size,
            "context_length": lm.max_positions,
            "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0,
            "decoder": {
                "filename": "model.onnx",
                "head_size": lm.head_dim, "hidden_size": lm.n_embd,
                "num_attention_heads": lm.n_head, "num_key_value_heads": lm.n_head,
                "num_hidden_layers": lm.n_layer,
                "session_options": session,
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "attention_mask": "attention_mask",
                           "past_key_names": names["past_key"],
                           "past_value_names": names["past_value"]},
                "outputs": {"logits": "logits",
                            "present_key_names": names["present_key"],
                            "present_value_names": names["present_value"]},
            },
        },
        "search": {"max_length": lm.seq_length, "past_present_share_buffer": True,
                   "do_sample": True, "top_k": 70, "num_beams": 1},
    }  # fmt: skip


def build(model_dir: Path, threads: int | None = None) -> Path:
    """The genai model directory for a facert model (cached; the config is written last)."""
    out = cache_root() / "genai" / model_hash(model_dir)[:16]
    if not out.is_dir():
        tmp = out.with_name(out.name + ".partial")  # renamed when complete
        tmp.mkdir(parents=True, exist_ok=True)
        engine = resolve_engine(Path(model_dir), "fp32", progress=False)
        head = load_weights(Path(model_dir) / LM_FILE)["lm_head.weight"]
        onnx.save_model(
            decoder_graph(engine, head), tmp / "model.onnx",
            save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
        )  # fmt: skip
        tmp.rename(out)
    (out / CONFIG).write_text(json.dumps(genai_config(model_dir, threads), indent=1))
    return out
