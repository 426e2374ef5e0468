"""ONNX Runtime backend: every step through the exported graphs (prefill, lm_decode, heads,
VQGAN), on any execution provider. torch-free. (On the CPU provider in fp32 and int8 the default
is FusedCpuBackend, which runs the LM on facert's own kernel and only the VQGAN here.)

The KV cache is one numpy array per keys/values, (layers, slots, heads, capacity, head_dim),
allocated once. A decode step runs the lm_decode graph, binding each layer's rows in place (IO
binding, no copies); GroupQueryAttention writes the new position straight into them. That needs
the step's rows to be cache rows 0..B-1, so this backend maps slots to cache rows and, when the
running set changes, swaps a row that lies beyond B with one below it that no running row holds;
the step then feeds its inputs in cache-row order.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import ModelConfig
from ..errors import FacertError, ModelFileError
from ..onnx_engines import read_engine, read_manifest, weights_file
from .base import pad_rows

GRAPHS = ("lm_prefill", "lm_decode", "head_text", "head_image", "vqgan_encoder", "vqgan_decoder")


def session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    """`spinning=False` when ONNX Runtime shares the cores with facert's own decode kernel: its
    idle threads would otherwise spin through every decode step and steal a core from it."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # errors only
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def check_providers(providers: list[str]) -> None:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise FacertError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
            f"build (available: {', '.join(available)})"
        )


class Graphs:
    """ONNX Runtime sessions over one engine directory, each made when `load` (or its first use)
    asks for it: only those graphs and their weights files are read (each checked against its
    sha256 as it is read, and freed once the sessions have copied it)."""

    def __init__(
        self, engine_dir: Path, providers: list[str], threads: int | None, spinning: bool = True
    ):
        check_providers(providers)
        self.engine_dir, self.providers = engine_dir, providers
        self.threads, self.spinning = threads, spinning
        self.manifest = read_manifest(engine_dir)
        # fp16 engines keep activations (and a graph-run KV cache) in half precision
        self.float_dtype = np.dtype(np.float16 if self.manifest["precision"] == "fp16"
                                    else np.float32)  # fmt: skip
        self.sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()  # a first use may come from any thread

    def load(self, names: tuple[str, ...]) -> None:
        """Create the sessions of `names` not made yet, reading their files once, together."""
        with self._lock:
            names = tuple(n for n in names if n not in self.sessions)
            if not names:
                return
            engine = read_engine(self.engine_dir, names)
            self.engine_dir = engine.dir  # a corrupt directory found automatically is re-exported
            weights = engine.weights()
            so = session_options(self.threads, self.spinning)
            so.add_external_initializers_from_files_in_memory(
                list(weights), list(weights.values()), [len(w) for w in weights.values()]
            )
            for name in names:
                try:
                    session = ort.InferenceSession(engine.graph(name), so, providers=self.providers)
                except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as e:
                    raise ModelFileError(
                        f"cannot load the ONNX graph {name} in {self.engine_dir}: {e}"
                    ) from e
                # falling back to another provider would rebuild the session from `so`, whose
                # weight bytes are freed once the sessions have copied them
                session.disable_fallback()
                self.sessions[name] = session

    def run(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name not in self.sessions:
            self.load((name,))
        return self.sessions[name].run(None, inputs)

    def weight_bytes(self, names: tuple[str, ...]) -> int:
        """The bytes of the weights files these graphs read (what their sessions hold)."""
        files = {weights_file(n) for n in names}
        return sum((self.engine_dir / f).stat().st_size for f in files)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=self.float_dtype)
        return self.run("vqgan_encoder", {"images": x})[0]

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        out = self.run("vqgan_decoder", {"codes": np.asarray(codes, dtype=np.int64)})[0]
        return out.astype(np.float32, copy=False)

    def forward_logits(self, ids: np.ndarray, segs: np.ndarray, config: ModelConfig) -> np.ndarray:
        """Full prefix-LM forward without a cache, through lm_prefill and the head graphs."""
        feed = {"input_ids": ids[None].astype(np.int64), "segment_ids": segs[None].astype(np.int64)}
        hidden = self.run("lm_prefill", feed)[0]  # (1, L, C)
        return self.heads(hidden[0], (0, config.lm.vocab_size), config)

    def heads(self, hidden: np.ndarray, window: tuple[int, int], config: ModelConfig) -> np.ndarray:
        """(N, C) hidden -> (N, hi-lo) float32 logits, running only the heads the window needs."""
        text = config.lm.text_vocab_size
        hidden = np.ascontiguousarray(hidden, dtype=self.float_dtype)
        parts = []
        for head, (lo, hi) in (
            ("head_text", (0, text)),
            ("head_image", (text, config.lm.vocab_size)),
        ):
            if window[0] < hi and window[1] > lo:
                logits = self.run(head, {"hidden": hidden})[0]
                parts.append(logits[:, max(window[0], lo) - lo : min(window[1], hi) - lo])
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


class OnnxRuntimeBackend:
    name = "onnxruntime"
    lm_path = "lm_decode graph"

    def __init__(
        self,
        engine_dir: Path,
        config: ModelConfig,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        self.config = config
        self.graphs = Graphs(engine_dir, providers or ["CPUExecutionProvider"], threads)
        self.graphs.load(GRAPHS)
        self.engine_dir = self.graphs.engine_dir
        self.sessions = self.graphs.sessions
        self.float_dtype = self.cache_dtype = self.graphs.float_dtype
        self.weight_bytes = self.graphs.weight_bytes(GRAPHS)
        self.k_cache = self.v_cache = None
        self._bindings = {}

    def allocate(self, num_slots: int, max_len: int) -> None:
        c = self.config.lm
        shape = (c.n_layer, num_slots, c.n_head, max_len, c.head_dim)  # (L, S, H, M, D)
        self.k_cache = np.zeros(shape, self.float_dtype)
        self.v_cache = np.zeros(shape, self.float_dtype)
        self._bindings: dict[tuple, _DecodeBinding] = {}
        # Slot -> the cache row that holds it, and back. The lm_decode graph binds rows 0..B-1
        # in place, so a step's rows are moved there (swapped with rows no running sequence
        # uses) when the running set changes.
        self._row = np.arange(num_slots)
        self._slot_at = np.arange(num_slots)

    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        """(N, C) hidden -> (N, hi-lo) float32 logits through the head graphs it overlaps."""
        return self.graphs.heads(hidden, window, self.config)

    def forward_logits(self, ids: np.ndarray, segs: np.ndarray) -> np.ndarray:
        return self.graphs.forward_logits(ids, segs, self.config)

    def prefill(
        self,
        slots: np.ndarray,
        ids: list[np.ndarray],
        segs: list[np.ndarray],
    ) -> np.ndarray:
        batch_ids, batch_segs, lengths = pad_rows(ids, segs)
        T = batch_ids.shape[1]
        hidden, *present = self.graphs.run(
            "lm_prefill", {"input_ids": batch_ids, "segment_ids": batch_segs}
        )  # (B, T, C), 2L x (B, H, T, D)
        rows = self._row[slots]
        for layer in range(self.config.lm.n_layer):
            self.k_cache[layer, rows, :, :T] = present[2 * layer]
            self.v_cache[layer, rows, :, :T] = present[2 * layer + 1]
        last = hidden[np.arange(len(ids)), lengths - 1]  # (B, C)
        return last.astype(np.float32)

    def _binding(self, k: np.ndarray, v: np.ndarray) -> _DecodeBinding:
        """An IO binding over these cache buffers, reused while they stay the same."""
        B = k.shape[1]
        key = (B, k.ctypes.data, k.shape)
        if key not in self._bindings:
            self._bindings[key] = _DecodeBinding(self.sessions["lm_decode"], k, v, self.config)
        return self._bindings[key]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        rows = self._rows_at_front(np.asarray(slots))  # a permutation of 0..B-1
        B = len(rows)
        order = np.argsort(rows)  # the call's row that cache row p holds is order[p]
        binding = self._binding(self.k_cache[:, :B], self.v_cache[:, :B])  # in place
        hidden = binding.run(np.asarray(tokens)[order], positions[order])  # (B, C), cache order
        return hidden[rows].astype(np.float32)  # call order; a copy: the binding reuses it

    def _rows_at_front(self, slots: np.ndarray) -> np.ndarray:
        """Cache rows of `slots`, after moving any at or past len(slots) into a row below it
        that none of them holds (swapping whole rows, so the other slot keeps its contents)."""
        B, rows = len(slots), self._row[slots]
        free = sorted(set(range(B)) - set(rows.tolist()))
        for i in np.nonzero(rows >= B)[0]:
            src, dst = int(rows[i]), free.pop()
            for cache in (self.k_cache, self.v_cache):
                cache[:, [src, dst]] = cache[:, [dst, src]]
            other = self._slot_at[dst]
            self._row[slots[i]], self._row[other] = dst, src
            self._slot_at[dst], self._slot_at[src] = slots[i], other
            rows[i] = dst
        return rows

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        src, dst = self._row[src], self._row[dst]
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self.graphs.encode_images(images)

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        return self.graphs.decode_images(codes)


class _DecodeBinding:
    """lm_decode bound once to fixed buffers: the step's small inputs are rewritten in place and
    the cache layers are bound as both past and present, so a step is one run call."""

    def __init__(
        self, session: ort.InferenceSession, k: np.ndarray, v: np.ndarray, config: ModelConfig
    ):
        B = k.shape[1]
        self.session = session
        self.ids = np.zeros((B, 1), dtype=np.int64)
        self.positions = np.zeros((B, 1), dtype=np.int64)
        self.seqlens = np.zeros(B, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.hidden = np.zeros((B, 1, config.lm.n_embd), dtype=k.dtype)
        self.io = session.io_binding()
        for name, a in (
            ("input_ids", self.ids),
            ("position_ids", self.positions),
            ("seqlens_k", self.seqlens),
            ("total_sequence_length", self.total),
        ):
            self.io.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        self.io.bind_output(
            "hidden", "cpu", 0, self.hidden.dtype, self.hidden.shape, self.hidden.ctypes.data
        )
        for layer in range(config.lm.n_layer):
            for kind, cache in (("key", k), ("value", v)):
                buf = cache[layer]  # (B, H, M, D), contiguous
                args = ("cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
                self.io.bind_input(f"past_{kind}_{layer}", *args)
                self.io.bind_output(f"present_{kind}_{layer}", *args)
        self._keep = (k, v)  # the bound memory must outlive the binding

    def run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step; returns (B, C) hidden states (a view reused by the next step)."""
        self.ids[:, 0] = tokens
        self.positions[:, 0] = positions
        self.seqlens[:] = positions
        self.total[()] = positions.max() + 1
        self.session.run_with_iobinding(self.io)
        return self.hidden[:, 0]
