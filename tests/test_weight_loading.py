"""Loading the fused kernel's weights: lm.safetensors is streamed in blocks of rows (read,
hashed and packed in one pass, runtime/config.py), and the kernel packs and quantizes each block
(kernels/cpu/decode.cpp). The packed weights are the same bits as the numpy statement of the
format (pack_panels, quantize_rows), in the native and the portable build; the model's hash is
the value engines were exported under; the stream holds one buffer of a few rows, and a process
loading a larger LM peaks at its packed weights plus that buffer."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facert.kernels.decode import FusedDecoder, Panels, pack_panels, quantize_rows
from facert.runtime import config
from facert.runtime.config import (
    CHECKED_FILES,
    CONFIG_FILE,
    LM_FILE,
    load_config,
    load_weights,
    read_model,
)
from facert.runtime.errors import ModelFileError
from tests.test_decode_kernel import portable_library  # noqa: F401 (a fixture)

BUNDLED = Path(__file__).parents[1] / "facert" / "models" / "talk2face-synth"


def _rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random rows, and rows that test the edges of int8 quantization: zero, exact halves of
    the scale (ties to even), tiny (a subnormal scale: clipped), huge, one large value."""
    w = (rng.standard_normal((n, k)) * 0.2).astype(np.float32)
    edges = [np.zeros(k), np.resize([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5], k),
             np.resize([1e-38, -3e-39, 5e-40], k), np.resize([1e-44, -1e-44], k),
             np.resize([3e38, -1e37, 1.0], k), np.r_[1e6, np.ones(k - 1)]]  # fmt: skip
    w[: min(n, len(edges))] = np.array(edges[:n], np.float32)
    return w


SHAPES = [(35, 10), (768, 768), (211, 40), (170, 38), (17, 3), (1, 1), (64, 600)]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("library", ["native", "portable"])
def test_kernel_packing_is_the_numpy_format_bit_for_bit(precision, library, request):
    lib = request.getfixturevalue("portable_library") if library == "portable" else None
    rng = np.random.default_rng(3)
    for n, k in SHAPES:
        w = _rows(rng, n, k)
        panels = Panels(n, k, precision)
        panels.pack(w, 0, threads=2, library=lib)
        if precision == "fp32":
            assert np.array_equal(panels.weight, pack_panels(w)), (n, k)
            continue
        with np.errstate(all="ignore"):  # the tiny rows' scale is 0: w / 0
            q, scale, row_sum = quantize_rows(w)
        assert np.array_equal(panels.weight, pack_panels(q)), (n, k)
        assert np.array_equal(panels.scale, scale) and np.array_equal(panels.row_sum, row_sum)


def test_packing_in_parts_is_packing_the_stacked_matrix():
    """q, k and v arrive one by one and become rows of one matrix (38 rows each: panels shared
    by two parts): the same bits as packing the stacked matrix at once, on any thread count."""
    rng = np.random.default_rng(4)
    parts = [_rows(rng, 38, 38) for _ in range(3)]
    for precision in ("fp32", "int8"):
        whole, stacked = Panels(3 * 38, 38, precision), Panels(3 * 38, 38, precision)
        whole.pack(np.concatenate(parts), 0, threads=1)
        for i, part in enumerate(parts):
            stacked.pack(part, 38 * i, threads=2)
        for a, b in zip((whole.weight, whole.scale, whole.row_sum),
                        (stacked.weight, stacked.scale, stacked.row_sum)):  # fmt: skip
            assert np.array_equal(a, b), precision


def test_rows_that_do_not_fit_are_refused():
    panels = Panels(20, 8, "int8")
    for rows, at in ((np.ones((21, 8)), 0), (np.ones((4, 8)), 17), (np.ones((4, 9)), 0)):
        with pytest.raises(ValueError, match="do not fit"):
            panels.pack(rows, at)


def _stream(model_dir: Path, take) -> object:
    return read_model(model_dir, stream={LM_FILE: take}).streamed[LM_FILE]


def test_streamed_tensors_are_the_file_and_the_hash_is_unchanged(tiny_model_dir, monkeypatch):
    from safetensors.numpy import load_file

    monkeypatch.setattr(config, "_CHUNK", 4096)  # blocks of a few rows: the tiny LM's are small
    seen, buffers, blocks = {}, set(), []

    def take(tensors):
        for name, shape, row0, rows in tensors:
            assert not rows.flags.owndata and rows.nbytes <= 4096  # a view of the one buffer
            buffers.add(rows.ctypes.data)
            if row0 == 0:
                seen[name] = np.empty(shape, np.float32)
            seen[name][row0 : row0 + len(rows)] = rows
            blocks.append(name)
        return len(seen)

    files = read_model(tiny_model_dir, stream={LM_FILE: take})
    theirs = load_file(str(tiny_model_dir / LM_FILE))
    assert files.streamed[LM_FILE] == len(theirs) and seen.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(seen[k], theirs[k].astype(np.float32))
    assert len(buffers) == 1 and len(blocks) > len(theirs) and LM_FILE not in files.kept
    # the hash engines are exported under: sha256 over "name digest" lines of the four files
    digests = {n: hashlib.sha256((tiny_model_dir / n).read_bytes()).hexdigest()
               for n in (CONFIG_FILE, *CHECKED_FILES)}  # fmt: skip
    joined = "".join(f"{n} {d}\n" for n, d in digests.items())
    assert (
        files.hash
        == hashlib.sha256(joined.encode()).hexdigest()
        == read_model(tiny_model_dir, keep=(LM_FILE,)).hash
    )


def test_a_consumer_that_stops_early_still_gets_the_whole_hash(tiny_model_dir):
    assert _stream(tiny_model_dir, lambda tensors: next(tensors)[0]) in load_weights(
        tiny_model_dir / LM_FILE
    )
    files = read_model(tiny_model_dir, stream={LM_FILE: lambda tensors: None})
    assert files.hash == read_model(tiny_model_dir).hash


def test_float16_files_stream_widened_exactly(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    monkeypatch.setattr(config, "_CHUNK", 64)  # blocks of a row or a few
    rng = np.random.default_rng(5)
    tensors = {"m": rng.standard_normal((9, 7)), "v": rng.standard_normal(40), "s": np.array(2.5)}
    for name in (CONFIG_FILE, *CHECKED_FILES):
        (tmp_path / name).write_text("{}")
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(tmp_path / LM_FILE))

    def take(stream):
        out = {}
        for name, shape, row0, rows in stream:
            assert rows.dtype == np.float32
            if not shape:  # a scalar comes whole
                out[name] = rows.copy()
            else:
                out.setdefault(name, np.empty(shape, np.float32))[row0 : row0 + len(rows)] = rows
        return out

    got, want = _stream(tmp_path, take), load_weights(tmp_path / LM_FILE)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]) and want[k].dtype == np.float32


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_decoder_from_the_stream_is_the_decoder_from_the_file(precision):
    """Streamed (and in any order), the fused kernel gets the same weights: the same bits."""
    c = load_config(BUNDLED).lm
    weights = load_weights(BUNDLED / LM_FILE)

    def make(pairs):
        return FusedDecoder(pairs, c.n_head, c.layernorm_eps, precision, threads=2)

    backwards = [(n, a.shape, 0, a) for n, a in reversed(weights.items())]
    decoders = [make(weights), make(backwards), _stream(BUNDLED, make)]
    ids, segs = [np.arange(9) * 31 % c.vocab_size], [np.r_[np.ones(5), np.full(4, 2)]]
    outs = []
    for d in decoders:
        shape = (c.n_layer, 2, c.n_head, 16, c.head_dim)  # (L, S, H, M, D)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        hidden = d.prefill(k, v, np.array([1]), ids, segs)
        step = d.step(k, v, np.array([1]), np.array([7]), np.array([9]))
        outs.append((hidden, step, d.head(step, (0, c.vocab_size)), k, v))
    assert decoders[0].weight_bytes == decoders[2].weight_bytes
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert np.array_equal(a, b)


def _safetensors_bytes(tensors: dict[str, np.ndarray], offsets=None) -> bytes:
    header, at = {}, 0
    for name, a in tensors.items():
        begin, end = offsets[name] if offsets else (at, at + a.nbytes)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [begin, end]}
        at = end
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"".join(a.tobytes() for a in tensors.values())


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("onnx"))
    doc = json.loads((out / CONFIG_FILE).read_text())
    doc.pop("sha256", None)  # the damage below is then found by the reading, not the record
    (out / CONFIG_FILE).write_text(json.dumps(doc))
    return out


def _overlapping(b: bytes) -> bytes:
    a, c = np.ones(4, np.float32), np.zeros(4, np.float32)
    return _safetensors_bytes({"a": a, "c": c}, {"a": (0, 16), "c": (8, 24)}) + bytes(8)


DAMAGE = {
    "shorter than a header": (lambda b: b[:4], "corrupt or not a float32/float16 safetensors"),
    "header past the end": (lambda b: (2**40).to_bytes(8, "little") + b[8:], "corrupt or not"),
    "tensors past the end": (lambda b: b[: len(b) // 2], "corrupt or not"),
    "header not an object": (lambda b: b[:8] + b"[" + b[9:], "corrupt or not"),
    "overlapping tensors": (_overlapping, "overlapping"),
    "no LM in it": (
        lambda b: _safetensors_bytes({"x": np.ones(3, np.float32)}),
        "does not hold this model's weights .*wte",
    ),  # fmt: skip
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_stream_is_a_model_file_error(model_copy, damage):
    harm, message = DAMAGE[damage]
    path = model_copy / LM_FILE
    path.write_bytes(harm(path.read_bytes()))
    c = load_config(model_copy).lm
    with pytest.raises(ModelFileError, match=message):
        _stream(model_copy, lambda t: FusedDecoder(t, c.n_head, c.layernorm_eps, "fp32", 1))
    if damage == "overlapping tensors":  # the whole-file reader refuses them as well
        with pytest.raises(ModelFileError, match="overlapping"):
            load_weights(path)


MEMORY_CHILD = """
import json, sys
from facert.kernels import cpu_library
from facert.kernels.decode import FusedDecoder
from facert.runtime.config import LM_FILE, read_model
def peak():  # this process's own (ru_maxrss would count the parent's at the fork)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
model_dir, precision = sys.argv[1:3]
cpu_library()
before = peak()
take = lambda t: FusedDecoder(t, 8, 1e-6, precision, threads=2)
decoder = read_model(model_dir, stream={LM_FILE: take}).streamed[LM_FILE]
print(json.dumps({"rise": peak() - before, "weights": decoder.weight_bytes}))
"""


@pytest.fixture(scope="module")
def larger_lm(tmp_path_factory) -> Path:
    """A random LM of 96 MB (two 32 MB embedding tables) beside stand-ins of the other files."""
    rng = np.random.default_rng(0)
    vocab, c, f, layers = 16384, 512, 1024, 4
    tensors = {
        "lm_head.weight": rng.standard_normal((vocab, c)),
        "wte.weight": rng.standard_normal((vocab, c)),
        "wpe.weight": rng.standard_normal((64, c)),
        "wse.weight": rng.standard_normal((3, c)),
        "ln_f.weight": np.ones(c),
        "ln_f.bias": np.zeros(c),
    }
    square, up, down = (c, c), (f, c), (c, f)
    for i in range(layers):
        p = f"blocks.{i}."
        for name, shape in (("attn.q", square), ("attn.k", square), ("attn.v", square),
                            ("attn.proj", square), ("mlp.fc", up), ("mlp.proj", down)):  # fmt: skip
            tensors[p + name + ".weight"] = rng.standard_normal(shape)
            tensors[p + name + ".bias"] = np.zeros(shape[0])
        for ln in ("ln_1", "ln_2"):
            tensors[p + ln + ".weight"], tensors[p + ln + ".bias"] = np.ones(c), np.zeros(c)
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    out = tmp_path_factory.mktemp("larger")
    (out / LM_FILE).write_bytes(_safetensors_bytes(tensors))
    for name in (CONFIG_FILE, *CHECKED_FILES[1:]):
        (out / name).write_text("{}")
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_loading_peaks_at_the_packed_weights_plus_one_tensor(larger_lm, precision):
    """Resident memory rises by the kernel's weights, the buffers of the stream and of the
    hashing of the other files (8 MB each) and little else: the whole file (96 MB), or its
    largest tensor (32 MB), is never held beside the packed copy."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(larger_lm), precision],
                         capture_output=True, text=True, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rise"] <= got["weights"] + 30 * 2**20, got
