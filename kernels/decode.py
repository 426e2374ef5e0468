"""Fused CPU kernels of the LM (kernels/cpu/decode.cpp): `FusedDecoder.step` runs the LM's
layers for a batch of rows against the runtime's KV cache and returns their final hidden states;
`FusedDecoder.head` turns hidden states into the logits of one vocabulary window;
`FusedDecoder.prefill` runs whole prompts, writing their keys/values into the cache. A step over
one window is one call of step and head, reading each weight once; a batch mixing windows runs
the layers once and the head once per window, each row paying only for its own window's rows.

Weights come straight from a model directory's `lm.safetensors` (facert names), packed here in
panels of 16 output rows (the kernel's tile layout). `int8` quantizes every matrix per output
row, symmetric, here at load time (a second or two for the base model); the kernel quantizes
activations per row on the fly.

Batch independence: a row's hidden state and logits are bit-identical whatever other rows share
the call (batch size, their slots, positions, tokens), in fp32 and int8, at every instruction-set
level and for any thread count; a prompt's prefill likewise whatever other prompts share it.
Every product gives each (weight row, input row) pair one accumulator that takes the products
k = 0..K-1 in order (fp32: one fused multiply-add each; int8: exact integers), whatever the tile
that carries it; each output value is computed whole by one thread; int8 activations are
quantized per row. The products' levels (`set_isa`: AVX-512, AVX2, portable) give the same bits,
and so do two windows' logits of one id.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from functools import cache

import numpy as np

from . import cpu_library

PRECISIONS = ("fp32", "int8")
ISA_LEVELS = ("portable", "avx2", "avx512")  # the kernel's product levels, in order
PANEL = 16  # output rows per packed weight panel
DECODE_SEGMENT = 2  # generated tokens are segment 2 in every template

_ptr, _i32, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _ptr), ("scale", _ptr), ("row_sum", _ptr), ("bias", _ptr),
                ("out", _i32), ("in_", _i32)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_weight", _ptr), ("ln1_bias", _ptr), ("qkv", _Linear), ("proj", _Linear),
                ("ln2_weight", _ptr), ("ln2_bias", _ptr), ("fc", _Linear),
                ("fc_proj", _Linear)]  # fmt: skip


class _LM(ctypes.Structure):
    _fields_ = [("n_layer", _i32), ("n_head", _i32), ("n_embd", _i32), ("n_ffn", _i32),
                ("decode_segment", _i32), ("eps", _f32), ("wte", _ptr), ("wpe", _ptr),
                ("wse", _ptr), ("layers", ctypes.POINTER(_Layer)), ("lnf_weight", _ptr),
                ("lnf_bias", _ptr), ("head", _Linear)]  # fmt: skip


@cache
def _kernels(library: ctypes.CDLL) -> tuple[Callable[..., int], ...]:
    step, head, prefill = library.facert_decode_step, library.facert_head, library.facert_prefill
    i64, lm = ctypes.c_int64, ctypes.POINTER(_LM)
    step.argtypes = [lm, _ptr, _ptr, i64, i64, _i32, _ptr, _ptr, _ptr, _ptr, _i32]
    head.argtypes = [lm, _ptr, _i32, _i32, _i32, _ptr, _i32]
    prefill.argtypes = [lm, _ptr, _ptr, i64, i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr, _i32]
    step.restype = head.restype = prefill.restype = ctypes.c_int
    return step, head, prefill


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float (N, K) -> int8 (N, K), per-row scales (N,) float32 and row sums (N,) int32, with
    w ~= q * scale[:, None]."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # (N,)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)  # (N, K)
    return q, scale, q.sum(axis=1, dtype=np.int32)


def pack_panels(w: np.ndarray) -> np.ndarray:
    """(N, K) -> the kernel's panels of 16 output rows, rows zero-padded to a multiple of 16:
    float32 (N/16, K, 16), so that one k of 16 rows is one vector load; int8 (N/16, K/4, 16, 4)
    with K zero-padded to a multiple of 4, so that 4 k of 16 rows are one VNNI operand."""
    n, k = w.shape
    rows = -n % PANEL
    if w.dtype == np.int8:
        w = np.pad(w, ((0, rows), (0, -k % 4)))
        return np.ascontiguousarray(w.reshape(-1, PANEL, w.shape[1] // 4, 4).transpose(0, 2, 1, 3))
    w = np.pad(np.asarray(w, dtype=np.float32), ((0, rows), (0, 0)))
    return np.ascontiguousarray(w.reshape(-1, PANEL, k).transpose(0, 2, 1))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class FusedDecoder:
    """The LM's decode step on this CPU, over a (layers, slots, heads, capacity, head_dim)
    float32 KV cache owned by the caller."""

    def __init__(
        self,
        weights: dict[str, np.ndarray],
        n_head: int,
        eps: float,
        precision: str = "fp32",
        threads: int | None = None,
        library: ctypes.CDLL | None = None,
    ):
        """`library`: a build of kernels/cpu/decode.cpp to call (default: facert's own)."""
        if precision not in PRECISIONS:
            raise ValueError(f"the fused decoder runs {PRECISIONS}, not {precision!r}")
        self.precision, self.threads = precision, threads or default_threads()
        self._step, self._head, self._prefill = _kernels(library or cpu_library())
        self._keep: list[np.ndarray] = []  # every buffer the kernel points into
        n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        wte = weights["wte.weight"]
        self.vocab_size, n_embd = wte.shape
        self.n_embd = n_embd
        n_ffn = weights["blocks.0.mlp.fc.weight"].shape[0]
        layers = (_Layer * n_layer)()
        for i, layer in enumerate(layers):
            p = f"blocks.{i}."
            layer.ln1_weight, layer.ln1_bias = self._vectors(weights, p + "ln_1")
            qkv = [weights[f"{p}attn.{n}.weight"] for n in "qkv"]
            qkv_bias = [weights[f"{p}attn.{n}.bias"] for n in "qkv"]
            layer.qkv = self._linear(np.concatenate(qkv), np.concatenate(qkv_bias))  # (3C, C)
            layer.proj = self._linear(*self._pair(weights, p + "attn.proj"))
            layer.ln2_weight, layer.ln2_bias = self._vectors(weights, p + "ln_2")
            layer.fc = self._linear(*self._pair(weights, p + "mlp.fc"))
            layer.fc_proj = self._linear(*self._pair(weights, p + "mlp.proj"))
        lnf = self._vectors(weights, "ln_f")
        self._lm = _LM(
            n_layer, n_head, n_embd, n_ffn, DECODE_SEGMENT, eps, self._float(wte),
            self._float(weights["wpe.weight"]), self._float(weights["wse.weight"]), layers,
            *lnf, self._linear(weights["lm_head.weight"], None),
        )  # fmt: skip
        self._layers = layers

    @property
    def weight_bytes(self) -> int:
        """The kernel's own copy of the weights (packed, at its precision)."""
        return sum(a.nbytes for a in self._keep)

    def _float(self, a: np.ndarray) -> int:
        # its own memory: a view would keep the whole file it was read from alive
        a = np.require(a, np.float32, ["C_CONTIGUOUS", "OWNDATA"])
        self._keep.append(a)
        return a.ctypes.data

    @staticmethod
    def _pair(weights: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
        return weights[name + ".weight"], weights[name + ".bias"]

    def _vectors(self, weights: dict[str, np.ndarray], name: str) -> tuple[int, int]:
        return tuple(self._float(a) for a in self._pair(weights, name))

    def _linear(self, w: np.ndarray, bias: np.ndarray | None) -> _Linear:
        out, in_ = w.shape
        b = self._float(bias) if bias is not None else None
        if self.precision == "fp32":
            return _Linear(self._float(pack_panels(w)), None, None, b, out, in_)
        q, scale, row_sum = quantize_rows(np.asarray(w, dtype=np.float32))
        q = pack_panels(q)
        self._keep += [q, scale, row_sum]
        return _Linear(q.ctypes.data, scale.ctypes.data, row_sum.ctypes.data, b, out, in_)

    @staticmethod
    def _check_cache(k_cache: np.ndarray, v_cache: np.ndarray) -> None:
        for kv in (k_cache, v_cache):
            if kv.dtype != np.float32 or not kv.flags.c_contiguous or kv.ndim != 5:
                raise ValueError("the KV cache must be C-contiguous float32 (L, S, H, M, D)")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"key and value caches differ: {k_cache.shape}, {v_cache.shape}")

    def step(
        self,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        slots: np.ndarray,
        tokens: np.ndarray,
        positions: np.ndarray,
    ) -> np.ndarray:
        """Append tokens (B,) at positions (B,) of slots (B,), writing their keys/values into the
        caches in place; returns their float32 (B, C) final hidden states (after ln_f)."""
        self._check_cache(k_cache, v_cache)
        slots, tokens, positions = (np.ascontiguousarray(a, dtype=np.int64)
                                    for a in (slots, tokens, positions))  # fmt: skip
        if not len(tokens) == len(slots) == len(positions):
            raise ValueError("slots, tokens and positions must have one entry per row")
        hidden = np.empty((len(tokens), self.n_embd), dtype=np.float32)  # (B, C)
        if not len(tokens):
            return hidden
        status = self._step(
            ctypes.byref(self._lm), k_cache.ctypes.data, v_cache.ctypes.data, k_cache.shape[1],
            k_cache.shape[3], len(tokens), tokens.ctypes.data, positions.ctypes.data,
            slots.ctypes.data, hidden.ctypes.data, self.threads,
        )  # fmt: skip
        if status:
            raise ValueError(
                f"decode step out of range: slots {slots}, positions {positions}, tokens "
                f"{tokens} (cache {k_cache.shape}, vocabulary {self.vocab_size})"
            )
        return hidden

    def prefill(
        self,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        rows: np.ndarray,
        ids: list[np.ndarray],
        segs: list[np.ndarray],
    ) -> np.ndarray:
        """Run prompts ids[b] (segment ids segs[b]) at positions 0..T_b-1 of cache rows rows[b],
        writing every position's keys/values; returns float32 (B, C) final hidden states (after
        ln_f) of each prompt's last position. Attention: the prefix-LM mask of export/lm.py."""
        self._check_cache(k_cache, v_cache)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if not len(rows) == len(ids) == len(segs):
            raise ValueError("rows, ids and segs must have one entry per prompt")
        lengths = np.array([len(a) for a in ids], dtype=np.int64)
        if any(len(s) != n for s, n in zip(segs, lengths)):
            raise ValueError("each prompt needs one segment id per token")
        hidden = np.empty((len(rows), self.n_embd), dtype=np.float32)  # (B, C)
        if not len(rows):
            return hidden
        flat_ids, flat_segs = (np.ascontiguousarray(np.concatenate(a), dtype=np.int64)
                               for a in (ids, segs))  # fmt: skip
        status = self._prefill(
            ctypes.byref(self._lm), k_cache.ctypes.data, v_cache.ctypes.data, k_cache.shape[1],
            k_cache.shape[3], len(rows), lengths.ctypes.data, flat_ids.ctypes.data,
            flat_segs.ctypes.data, rows.ctypes.data, hidden.ctypes.data, self.threads,
        )  # fmt: skip
        if status:
            raise ValueError(
                f"prefill out of range: rows {rows}, lengths {lengths} (cache {k_cache.shape}, "
                f"vocabulary {self.vocab_size}, segments 0-2)"
            )
        return hidden

    def head(self, hidden: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        """float (N, C) final hidden states -> float32 (N, hi-lo) logits over vocabulary ids
        [lo, hi), reading only those rows of the head."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        lo, hi = (int(w) for w in window)
        if hidden.ndim != 2 or hidden.shape[1] != self.n_embd:
            raise ValueError(f"hidden states must be (N, {self.n_embd}), not {hidden.shape}")
        if not 0 <= lo < hi <= self.vocab_size:
            raise ValueError(f"window {window} out of range (vocabulary {self.vocab_size})")
        logits = np.empty((len(hidden), hi - lo), dtype=np.float32)  # (N, W)
        if len(hidden) and self._head(
            ctypes.byref(self._lm), hidden.ctypes.data, len(hidden), lo, hi, logits.ctypes.data,
            self.threads,
        ):  # fmt: skip
            raise ValueError(f"head window {window} out of range")
        return logits


def set_isa(level: str = "avx512", library: ctypes.CDLL | None = None) -> str:
    """Run the kernel's products at `level` (one of ISA_LEVELS) or the best this CPU has below
    it; returns the level in use. Process-wide, for tests: every level gives the same bits."""
    fn = (library or cpu_library()).facert_decode_isa
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return ISA_LEVELS[fn(ISA_LEVELS.index(level))]


def allow_vnni(allow: bool) -> bool:
    """Let int8 products use AVX512-VNNI where the CPU has it (the default), or force the AVX2
    level; returns whether VNNI is in use now."""
    fn = cpu_library().facert_decode_vnni
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return bool(fn(int(allow)))
