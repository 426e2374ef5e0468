"""Fused CPU backend, the default on CPUs: the LM's prefill, decode steps and head run on
facert's own kernel (kernels/cpu/decode.cpp), over one copy of the weights at the run's
precision, read from the model directory's lm.safetensors; images go through ONNX Runtime's VQGAN
graphs: the encoder's session made at load, the decoder's on its first use (a captioning kiosk
never loads it).

The KV cache is one numpy array per keys/values, (layers, slots, heads, capacity, head_dim),
allocated once, float32 in fp32 runs and float16 in int8 runs (kernels/decode.py CACHE_DTYPES);
the kernel reads and writes any slot in place, so a slot is its row.
`forward_logits` (a full forward without a cache: reference checks, not serving) runs the
engine's lm_prefill and head graphs, loaded only if it is called.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facert.kernels.decode import CACHE_DTYPES, FusedDecoder

from ..config import ModelConfig
from .onnxruntime_backend import Graphs

VQGAN_GRAPHS = ("vqgan_encoder", "vqgan_decoder")


class FusedCpuBackend:
    name = "onnxruntime"  # what the user chose: the embedded CPU path
    lm_path = "fused kernel"

    def __init__(
        self, engine_dir: Path, config: ModelConfig, decoder: FusedDecoder, threads: int | None
    ):
        self.config, self.decoder = config, decoder
        self.cache_dtype = CACHE_DTYPES[decoder.precision]
        # ONNX Runtime's idle threads must not spin: they would steal a core from the kernel
        self.graphs = Graphs(engine_dir, ["CPUExecutionProvider"], threads, spinning=False)
        self.graphs.load(("vqgan_encoder",))
        self.engine_dir = self.graphs.engine_dir
        self.weight_bytes = decoder.weight_bytes + self.graphs.weight_bytes(VQGAN_GRAPHS)
        self.k_cache = self.v_cache = None

    def allocate(self, num_slots: int, max_len: int) -> None:
        c = self.config.lm
        shape = (c.n_layer, num_slots, c.n_head, max_len, c.head_dim)  # (L, S, H, M, D)
        self.k_cache = np.zeros(shape, self.cache_dtype)
        self.v_cache = np.zeros(shape, self.cache_dtype)

    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        return self.graphs.forward_logits(ids, segs, self.config)

    def prefill(
        self, slots: np.ndarray, ids: list[np.ndarray], segs: list[np.ndarray]
    ) -> np.ndarray:
        return self.decoder.prefill(self.k_cache, self.v_cache, np.asarray(slots), ids, segs)

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.decoder.step(self.k_cache, self.v_cache, slots, tokens, positions)

    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        """Only the window's rows of the head are read (what a decode step needs)."""
        return self.decoder.head(hidden, window)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self.graphs.encode_images(images)

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        return self.graphs.decode_images(codes)
