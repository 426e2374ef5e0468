"""Triton kernels for the GPU hot paths, each a small launcher over torch tensors:

- `decode_attention(q, k_cache, v_cache, k_new, v_new, slots, positions)`: one layer's decode
  attention over the static slot cache, writing the new keys/values in place (attention.py);
- `add_layer_norm(x, weight, bias, eps, delta=...)`: the block's residual add and the LayerNorm
  after it, one kernel instead of torch's eight (norm.py);
- `gelu(x)`: gelu_fast in one kernel instead of eight (activation.py);
- `sample(logits, temperature, top_k, top_p, uniforms)`: the fused sampler with the C++
  sampler's semantics, logits kept on the device (sampling.py);
- `nearest_codes(z, codebook)`: the VQGAN's nearest codebook vector, first minimum (codes.py);
- `crop_resize(frame, boxes, size)`: camera frame + face boxes -> scaled model inputs as the CPU
  path computes them (frames.py).

numpy references of each are in reference.py; aot.py compiles them for sm_87 and sm_90 without a
GPU and writes ptx/. triton is imported only when a launcher is first used, so `import
facert.kernels` never needs it. Under TRITON_INTERPRET=1 (set before that first use) the kernels
run on CPU tensors.
"""

from importlib import import_module
from typing import Any

_LAUNCHERS = {
    "decode_attention": "attention",
    "add_layer_norm": "norm",
    "gelu": "activation",
    "sample": "sampling",
    "nearest_codes": "codes",
    "crop_resize": "frames",
}

__all__ = sorted(_LAUNCHERS)


def __getattr__(name: str) -> Any:
    if name not in _LAUNCHERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAUNCHERS[name]}", __name__), name)
