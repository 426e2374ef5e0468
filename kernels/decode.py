"""Fused CPU kernels of the LM (kernels/cpu/decode.cpp): `FusedDecoder.step` runs the LM's
layers for a batch of rows against the runtime's KV cache and returns their final hidden states;
`FusedDecoder.head` turns hidden states into the logits of one vocabulary window;
`FusedDecoder.prefill` runs whole prompts, writing their keys/values into the cache. A step over
one window is one call of step and head, reading each weight once; a batch mixing windows runs
the layers once and the head once per window, each row paying only for its own window's rows.

Weights come straight from a model directory's `lm.safetensors` (facert names), streamed in
blocks of rows as the file is read (runtime/config.py): the kernel packs each block of a matrix
into panels of 16 output rows (its tile layout) as it arrives, so the file's float32 copy is
never in memory beside the packed one, only a block of it. `int8` quantizes every matrix per
output row, symmetric, in that same pass (`quantize_rows` and `pack_panels` state the format in
numpy; the kernel's packing matches them bit for bit); the kernel quantizes activations per row
on the fly.

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
from collections.abc import Callable, Iterable, Mapping
from functools import cache

import numpy as np

from . import cpu_library

PRECISIONS = ("fp32", "int8")
# The KV cache's type at each precision: int8 runs keep half-precision keys and values (IEEE
# binary16, rounded to nearest on write, widened exactly on read; attention's arithmetic stays
# float32), which halves the bytes a long batched step's attention reads and the pool's size.
# fp32 keeps float32: its results are the exact model's.
CACHE_DTYPES = {"fp32": np.dtype(np.float32), "int8": np.dtype(np.float16)}
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
    step.argtypes = [lm, _ptr, _ptr, i64, i64, _i32, _ptr, _ptr, _ptr, _ptr, _i32, _i32]
    head.argtypes = [lm, _ptr, _i32, _i32, _i32, _ptr, _i32]
    prefill.argtypes = [lm, _ptr, _ptr, i64, i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr, _i32, _i32]
    step.restype = head.restype = prefill.restype = ctypes.c_int
    return step, head, prefill


@cache
def _packers(library: ctypes.CDLL) -> tuple[Callable[..., None], Callable[..., None]]:
    f32, int8 = library.facert_pack_f32, library.facert_pack_int8
    f32.argtypes = [_ptr, _i32, _i32, _i32, _ptr, _i32]
    int8.argtypes = [_ptr, _i32, _i32, _i32, _ptr, _ptr, _ptr, _i32]
    f32.restype = int8.restype = None
    return f32, int8


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


class Panels:
    """An (n, k) matrix in the kernel's layout (pack_panels': float32, or int8 with per-row
    scales and row sums), filled by the kernel a block of rows at a time."""

    def __init__(self, n: int, k: int, precision: str):
        self.n, self.k, panels = n, k, -(-n // PANEL)
        if precision == "fp32":
            self.weight = np.zeros((panels, k, PANEL), np.float32)  # (N/16, K, 16)
            self.scale = self.row_sum = None
        else:
            self.weight = np.zeros((panels, -(-k // 4), PANEL, 4), np.int8)  # (N/16, K/4, 16, 4)
            self.scale, self.row_sum = np.zeros(n, np.float32), np.zeros(n, np.int32)  # (N,)

    def pack(
        self, w: np.ndarray, row0: int, threads: int = 1, library: ctypes.CDLL | None = None
    ) -> None:
        """Rows w (rows, k) become rows row0.. of the matrix: the same bits as pack_panels (of
        quantize_rows' int8 rows) gives them."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] != self.k or not 0 <= row0 <= self.n - len(w):
            raise ValueError(f"rows {w.shape} at {row0} do not fit a ({self.n}, {self.k}) matrix")
        f32, int8 = _packers(library or cpu_library())
        if self.scale is None:
            f32(w.ctypes.data, len(w), self.k, row0, self.weight.ctypes.data, threads)
        else:
            int8(w.ctypes.data, len(w), self.k, row0, self.weight.ctypes.data,
                 self.scale.ctypes.data, self.row_sum.ctypes.data, threads)  # fmt: skip


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# The LM's products by facert weight name, in a layer and outside: (the kernel's product, part,
# parts). q, k and v are three parts of one product, qkv (3C, C), stacked in that order.
_LAYER_PRODUCTS = {"attn.q": ("qkv", 0, 3), "attn.k": ("qkv", 1, 3), "attn.v": ("qkv", 2, 3),
                   "attn.proj": ("proj", 0, 1), "mlp.fc": ("fc", 0, 1),
                   "mlp.proj": ("fc_proj", 0, 1)}  # fmt: skip
_PRODUCTS = {"lm_head": ("head", 0, 1)}  # no bias
_LAYER_VECTORS = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")
_VECTORS = ("wte.weight", "wpe.weight", "wse.weight", "ln_f.weight", "ln_f.bias")  # kept as read


class _Product:
    """One product's weights, packed as the rows of its parts arrive, and its bias, stacked the
    same way."""

    def __init__(self, parts: int):
        self.parts, self.panels, self.bias = parts, None, None
        self.packed, self.biased = set(), set()  # parts whose last rows are in

    def weight(self, name: str, shape: tuple, part: int, row0: int, rows: np.ndarray,
               decoder: FusedDecoder) -> None:  # fmt: skip
        if len(shape) == 2 and self.panels is None:
            self.panels = Panels(self.parts * shape[0], shape[1], decoder.precision)
        if len(shape) != 2 or (self.parts * shape[0], shape[1]) != (self.panels.n, self.panels.k):
            raise ValueError(f"{name} is {shape}, unlike the other parts of its product")
        self.panels.pack(rows, part * shape[0] + row0, decoder.threads, decoder.library)
        if row0 + len(rows) == shape[0]:
            self.packed.add(part)

    def add_bias(self, name: str, shape: tuple, part: int, row0: int, rows: np.ndarray) -> None:
        if len(shape) == 1 and self.bias is None:
            self.bias = np.empty(self.parts * shape[0], np.float32)
        if len(shape) != 1 or self.parts * shape[0] != len(self.bias):
            raise ValueError(f"{name} is {shape}, unlike the other parts of its product")
        self.bias[part * shape[0] + row0 :][: len(rows)] = rows
        if row0 + len(rows) == shape[0]:
            self.biased.add(part)


class FusedDecoder:
    """The LM's decode step on this CPU, over a (layers, slots, heads, capacity, head_dim) KV
    cache owned by the caller: float32 or float16 (CACHE_DTYPES says which each precision
    uses; the kernel takes either)."""

    def __init__(
        self,
        weights: Mapping[str, np.ndarray] | Iterable[tuple[str, tuple, int, np.ndarray]],
        n_head: int,
        eps: float,
        precision: str = "fp32",
        threads: int | None = None,
        library: ctypes.CDLL | None = None,
    ):
        """`weights`: the LM's tensors by facert name, or a stream of them in any order (a file
        as it is read, runtime/config.py's TensorStream): (name, shape, first row, rows), each
        tensor in blocks of its rows in order. Each block is packed or copied before the next
        is taken, so it may be a view of a buffer the stream then reuses.
        `library`: a build of kernels/cpu/decode.cpp to call (default: facert's own)."""
        if precision not in PRECISIONS:
            raise ValueError(f"the fused decoder runs {PRECISIONS}, not {precision!r}")
        self.precision, self.threads = precision, threads or default_threads()
        self.library = library or cpu_library()
        self._step, self._head, self._prefill = _kernels(self.library)
        self._keep: list[np.ndarray] = []  # every buffer the kernel points into
        vectors: dict[str, np.ndarray] = {}
        products: dict[str, _Product] = {}
        if isinstance(weights, Mapping):
            weights = ((name, a.shape, 0, a) for name, a in weights.items())
        for name, shape, row0, rows in weights:
            block, _, rest = name.partition(".")
            index, _, rest = rest.partition(".")
            in_layer = block == "blocks" and index.isascii() and index.isdigit()
            prefix, table = (f"blocks.{index}.", _LAYER_PRODUCTS) if in_layer else ("", _PRODUCTS)
            base, _, leaf = name.removeprefix(prefix).rpartition(".")
            if base in table and leaf in ("weight", "bias"):
                product, part, parts = table[base]
                p = products.setdefault(prefix + product, _Product(parts))
                if leaf == "weight":
                    p.weight(name, shape, part, row0, rows, self)
                else:
                    p.add_bias(name, shape, part, row0, rows)
            elif (in_layer and rest in _LAYER_VECTORS) or name in _VECTORS:
                if not shape:
                    raise ValueError(f"{name} is a scalar")
                if row0 == 0:  # its own memory, filled block by block
                    vectors[name] = np.empty(shape, np.float32)
                vectors[name][row0 : row0 + len(rows)] = rows
        self._assemble(vectors, products, n_head, eps)

    def _assemble(
        self, vectors: dict[str, np.ndarray], products: dict[str, _Product], n_head: int, eps: float
    ) -> None:
        """The kernel's description of the LM, every tensor checked present and of its shape."""

        def vector(name: str, *shape: int) -> int:  # -1: any size
            a = vectors.get(name)
            if a is None:
                raise ValueError(f"the LM has no tensor {name!r}")
            if a.ndim != len(shape) or any(s not in (-1, d) for s, d in zip(shape, a.shape)):
                raise ValueError(f"{name} is {a.shape}, not {shape} (-1: any size)")
            return a.ctypes.data

        def linear(name: str, out: int, in_: int, biased: bool = True) -> _Linear:
            p = products.get(name)
            if p is None or len(p.packed) < p.parts or (biased and len(p.biased) < p.parts):
                raise ValueError(f"the LM lacks weights of its {name} product")
            w = p.panels
            if (w.n, w.k) != (out, in_) or (biased and len(p.bias) != out):
                raise ValueError(f"the {name} product is ({w.n}, {w.k}), not ({out}, {in_})")
            arrays = (w.weight, w.scale, w.row_sum, p.bias if biased else None)
            self._keep += [a for a in arrays if a is not None]
            return _Linear(*(None if a is None else a.ctypes.data for a in arrays), out, in_)

        vector("wte.weight", -1, -1)
        self.vocab_size, c = vectors["wte.weight"].shape
        self.n_embd = c
        n_layer = 1 + max((int(k.split(".")[1]) for k in products if k.startswith("blocks.")),
                          default=-1)  # fmt: skip
        fc = products.get("blocks.0.fc")
        n_ffn = fc.panels.n if fc and fc.panels else 0
        layers = [
            _Layer(
                vector(f"blocks.{i}.ln_1.weight", c),
                vector(f"blocks.{i}.ln_1.bias", c),
                linear(f"blocks.{i}.qkv", 3 * c, c),
                linear(f"blocks.{i}.proj", c, c),
                vector(f"blocks.{i}.ln_2.weight", c),
                vector(f"blocks.{i}.ln_2.bias", c),
                linear(f"blocks.{i}.fc", n_ffn, c),
                linear(f"blocks.{i}.fc_proj", c, n_ffn),
            )
            for i in range(n_layer)
        ]
        if not layers:
            raise ValueError("the LM has no layers")
        self._layers = (_Layer * n_layer)(*layers)
        self._lm = _LM(
            n_layer, n_head, c, n_ffn, DECODE_SEGMENT, eps, vector("wte.weight", -1, c),
            vector("wpe.weight", -1, c), vector("wse.weight", 3, c), self._layers,
            vector("ln_f.weight", c), vector("ln_f.bias", c),
            linear("head", self.vocab_size, c, biased=False),
        )  # fmt: skip
        self._keep += vectors.values()

    @property
    def weight_bytes(self) -> int:
        """The kernel's own copy of the weights (packed, at its precision)."""
        return sum(a.nbytes for a in self._keep)

    @staticmethod
    def _half_cache(k_cache: np.ndarray, v_cache: np.ndarray) -> int:
        """1 for a float16 cache, 0 for float32; anything else is refused."""
        for kv in (k_cache, v_cache):
            if kv.dtype not in CACHE_DTYPES.values() or not kv.flags.c_contiguous or kv.ndim != 5:
                raise ValueError(
                    "the KV cache must be C-contiguous float32 or float16 (L, S, H, M, D)"
                )
        if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
            raise ValueError(
                f"key and value caches differ: {k_cache.shape} {k_cache.dtype}, "
                f"{v_cache.shape} {v_cache.dtype}"
            )
        return int(k_cache.dtype == np.float16)

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
        half = self._half_cache(k_cache, v_cache)
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
            slots.ctypes.data, hidden.ctypes.data, self.threads, half,
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
        half = self._half_cache(k_cache, v_cache)
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
            flat_segs.ctypes.data, rows.ctypes.data, hidden.ctypes.data, self.threads, half,
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
