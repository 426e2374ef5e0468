"""The model directory's description (`facert.json`): one config dataclass, torch-free.

A facert model directory holds `facert.json`, `lm.safetensors`, `vqgan.safetensors` and
`vocab.txt`. Everything a backend or a task needs to know about the model is read from here.
Weights may be stored in float32 or float16 (half the bytes); every backend computes in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FacertError, ModelFileError
from .limits import check_int

FORMAT_VERSION = 1
CONFIG_FILE = "facert.json"
LM_FILE = "lm.safetensors"
VQGAN_FILE = "vqgan.safetensors"
VOCAB_FILE = "vocab.txt"
# Files facert.json may record the sha256 of, under "sha256" (see model_hash).
CHECKED_FILES = (LM_FILE, VQGAN_FILE, VOCAB_FILE)

# Image input scaling fed to the VQGAN encoder, as the number of times x -> 2x - 1 is applied to
# pixels in [0, 1]. "reference" reproduces the released Talk2Face script, which applies it twice
# (the encoder sees 4x - 3); "taming" is the VQGAN's own convention (once).
IMAGE_SCALINGS = {"reference": 2, "taming": 1}
# Views of a face score mode can average, in order (made by images.face_views).
READING_VIEWS = ("face", "mirror", "shifted right", "shifted left")


@dataclass(frozen=True)
class LMConfig:
    """Prefix-LM transformer shape (TencentPretrain names in comments)."""

    vocab_size: int = 31546  # text + image codes
    text_vocab_size: int = 30522  # vocab_bias: image code k is LM id text_vocab_size + k
    n_layer: int = 12  # layers_num
    n_head: int = 12  # heads_num
    n_embd: int = 768  # hidden_size
    n_ffn: int = 3072  # feedforward_size
    max_positions: int = 1024  # rows in the position table (max_seq_length)
    seq_length: int = 334  # total length the reference generates up to
    layernorm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def image_vocab_size(self) -> int:
        return self.vocab_size - self.text_vocab_size


# taming's Normalize: GroupNorm over 32 groups with eps 1e-6, fixed in its code (not its config)
VQGAN_NORM_GROUPS = 32
VQGAN_NORM_EPS = 1e-6


@dataclass(frozen=True)
class VQGANConfig:
    """taming VQModel shape (ddconfig + embed_dim + n_embed)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def num_codes_per_image(self) -> int:
        return self.latent_size**2


def check_views(views: int, what: str = "views") -> int:
    """`views` if it counts 1 to all of READING_VIEWS, else an InvalidArgument naming `what`."""
    return check_int(views, what, 1, len(READING_VIEWS))


# What a reading's in-distribution score measures (see runtime/reading_quality.py).
READING_MEASURE = "vqgan_psnr_db"


@dataclass(frozen=True)
class ReadingCalibration:
    """How a model's reading scores are judged: `threshold` is the `percentile`-th percentile of
    the scores of `faces` held-out faces like its training faces; a face scoring below it is
    unlike them, and what the model reads from it means little."""

    measure: str
    threshold: float
    percentile: float
    faces: int

    def __post_init__(self) -> None:
        where = "reading_calibration"
        if self.measure != READING_MEASURE:
            raise FacertError(f"{where}.measure must be {READING_MEASURE!r}, not {self.measure!r}")
        if not 0 < self.percentile < 100:
            raise FacertError(f"{where}.percentile must lie in (0, 100), not {self.percentile}")
        if not math.isfinite(self.threshold):
            raise FacertError(f"{where}.threshold must be finite, not {self.threshold}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model directory except its weights."""

    name: str = "talk2face"
    lm: LMConfig = field(default_factory=LMConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    image_scaling: str = "reference"
    # Task prompt texts, tokenized into the template after [CLS].
    prompts: dict[str, str] = field(
        default_factory=lambda: {
            "to_image": "to image",
            "to_caption": "to caption",
            "to_attributes": "to attributes",
        }
    )
    # Attribute name -> candidate answers (used by score mode and to validate names).
    attributes: dict[str, list[str]] = field(default_factory=dict)
    cls_id: int = 101
    sep_id: int = 102
    max_text_ids: int = 64  # to_image prompts are cut to this many ids, as the reference does
    # Drawings per face generate_faces makes by default, keeping the one that matches the text
    # best; 1 (plain sampling, as the reference does) unless the model's author measured better.
    image_candidates: int = 1
    # Views of a face score mode reads and averages (log-probabilities summed), in the order of
    # READING_VIEWS: the face, its mirror image, and the face shifted a quarter code cell
    # right and left. 1 (the face alone, as the reference does) unless measured better.
    reading_views: int = 1
    # Judges readings' in-distribution scores; absent (None) when no held-out faces were measured
    # (converted without --calibration-faces): readings then say neither reliable nor not.
    reading_calibration: ReadingCalibration | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.image_candidates < 1:
            raise FacertError(f"image_candidates must be at least 1, got {self.image_candidates}")
        check_views(self.reading_views, "reading_views")
        if self.image_scaling not in IMAGE_SCALINGS:
            raise FacertError(
                f"image_scaling must be one of {sorted(IMAGE_SCALINGS)}, got {self.image_scaling!r}"
            )
        if self.lm.image_vocab_size != self.vqgan.n_embed:
            raise FacertError(
                f"LM has {self.lm.image_vocab_size} image ids but the VQGAN has "
                f"{self.vqgan.n_embed} codes"
            )

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """facert.json's parsed contents -> config. Every key and type is checked, so a malformed
        file is one ModelFileError naming the field rather than a TypeError deep in a backend.
        Counts and sizes must be at least 1, token ids (`*_id`) at least 0. The optional
        "sha256" record (see model_hash) is checked for shape and is not part of the config."""
        if not isinstance(d, dict):
            raise ModelFileError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ModelFileError(f"unsupported format_version {version!r}")
        _recorded_sha256(d.pop("sha256", {}))
        try:
            config = _from_json(cls, d, "")
        except ModelFileError:
            raise
        except FacertError as e:  # __post_init__'s checks
            raise ModelFileError(str(e)) from e
        lm = config.lm
        if lm.n_embd % lm.n_head:
            raise ModelFileError(
                f"lm.n_embd ({lm.n_embd}) must be divisible by lm.n_head ({lm.n_head})"
            )
        return config


def _from_json(cls: type, d: object, where: str) -> typing.Any:
    """A dataclass from a JSON object, each value checked against its field's type hint."""
    if not isinstance(d, dict):
        raise ModelFileError(f"{where.rstrip('.') or 'the file'} must be an object, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ModelFileError(
            f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(fields))})"
        )
    return cls(**{k: _from_json_value(v, hints[k], where + k) for k, v in d.items()})


def _from_json_value(v: object, hint: typing.Any, where: str) -> typing.Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: optional, absent when None
        return _from_json_value(v, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, v, where + ".")
    if origin in (tuple, list):  # tuple[int, ...] or list[str]: a JSON array
        if not isinstance(v, list):
            raise ModelFileError(f"{where} must be a list, got {v!r}")
        return origin(_from_json_value(x, args[0], f"{where}[{i}]") for i, x in enumerate(v))
    if origin is dict:  # JSON keys are always strings
        if not isinstance(v, dict):
            raise ModelFileError(f"{where} must be an object, got {v!r}")
        return {k: _from_json_value(x, args[1], f"{where}.{k}") for k, x in v.items()}
    numeric = hint in (int, float) and not isinstance(v, bool)
    if hint is float and numeric and isinstance(v, int):
        v = float(v)
    if not isinstance(v, hint) or (hint in (int, float) and not numeric):
        raise ModelFileError(f"{where} must be {hint.__name__}, got {v!r}")
    if hint is int and v < (least := 0 if where.endswith("_id") else 1):
        raise ModelFileError(f"{where} must be at least {least}, got {v}")
    if hint is float and not v > 0:
        raise ModelFileError(f"{where} must be positive, got {v}")
    return v


def _recorded_sha256(recorded: object) -> dict[str, str]:
    """facert.json's optional "sha256": {file: hex digest} for the files in CHECKED_FILES."""
    if not isinstance(recorded, dict) or not all(
        name in CHECKED_FILES and isinstance(d, str) and len(d) == 64
        for name, d in recorded.items()
    ):
        raise ModelFileError(
            f"sha256 must map some of {', '.join(CHECKED_FILES)} to sha256 digests"
        )
    return recorded


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate a model directory's facert.json, with a clear error if it is not one."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(
            f"{model_dir} is not a facert model directory (no {CONFIG_FILE}); "
            "create one with `facert convert`"
        )
    for name in (LM_FILE, VQGAN_FILE, VOCAB_FILE):
        if not (model_dir / name).is_file():
            raise ModelFileError(f"model directory {model_dir} is missing {name}")
    config = _read_json(path)
    try:
        return ModelConfig.from_dict(config)
    except ModelFileError as e:
        raise ModelFileError(f"{path} is not a valid facert config: {e}") from e


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ModelFileError(f"{path} is not readable JSON: {e}") from e


# A safetensors file's tensors as it is read, each in blocks of whole rows (along its first axis;
# a scalar in one), in order: (name, the tensor's shape, first row of the block, the block's
# rows as float32), the block valid only until the next is taken (the stream reuses its buffer).
TensorStream = Iterator[tuple[str, tuple[int, ...], int, np.ndarray]]


@dataclass(frozen=True)
class ModelFiles:
    """A model directory's files, each read once: the model's hash, the bytes of the weight
    files a backend keeps (hashed as they were read, so loading them costs no second read), and
    what the consumers of streamed files made of their tensors."""

    hash: str
    kept: dict[str, bytearray]
    streamed: dict[str, object] = field(default_factory=dict)

    def weights(self, name: str) -> dict[str, np.ndarray]:
        return load_weights(self.kept[name], name)


def read_model(
    model_dir: str | Path,
    keep: tuple[str, ...] = (),
    stream: Mapping[str, Callable[[TensorStream], object]] | None = None,
) -> ModelFiles:
    """Hash the files that define the model (so exported engines can detect staleness), keeping
    the bytes of the files named in `keep` (e.g. LM_FILE for a backend that computes with them).
    A weight file in `stream` goes to its consumer instead, tensor by tensor as it is read and
    hashed (a TensorStream), so it is never whole in memory: what the consumer returns is in
    `streamed`. Meanwhile the other files are hashed on a second thread.

    The same pass checks each file against the sha256 facert.json records for it under "sha256",
    when it does. So a bit flip in the weights of such a model is a ModelFileError here, at no
    extra read. (Without a record, a damaged safetensors header or a truncated file still fails
    in load_weights or the stream; a flip in the tensor data cannot be told from a new model and
    makes the engines stale.)"""
    model_dir, stream = Path(model_dir), stream or {}
    names = (CONFIG_FILE, *CHECKED_FILES)
    with ThreadPoolExecutor(1) as pool:
        read = {n: pool.submit(_read_hashed, model_dir / n, n in keep)
                for n in names if n not in stream}  # fmt: skip
        streamed = {n: _stream_hashed(model_dir / n, take) for n, take in stream.items()}
        read = {n: r.result() for n, r in read.items()}
    digests = {n: (read.get(n) or streamed[n])[1] for n in names}
    kept = {n: r[0] for n, r in read.items() if r[0] is not None}
    config = _read_json(model_dir / CONFIG_FILE)
    recorded = _recorded_sha256(config.get("sha256", {}) if isinstance(config, dict) else {})
    for name, digest in recorded.items():
        if digests[name] != digest:
            raise ModelFileError(
                f"{model_dir / name} does not match the sha256 that {CONFIG_FILE} records for it: "
                "it is corrupt or was replaced; restore it or convert the model again"
            )
    joined = "".join(f"{n} {d}\n" for n, d in digests.items())
    made = {n: r[0] for n, r in streamed.items()}
    return ModelFiles(hashlib.sha256(joined.encode()).hexdigest(), kept, made)


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the files that define the model (see read_model)."""
    return read_model(model_dir).hash


def write_config(model_dir: str | Path, config: ModelConfig) -> None:
    """Write facert.json with the sha256 of the weights and vocabulary beside it (call it
    after writing them): every load then checks them in the pass model_hash makes anyway.
    Optional fields that are None are left out: absent means unknown."""
    model_dir = Path(model_dir)
    record = {name: _sha256(model_dir / name) for name in CHECKED_FILES}
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    doc = {**fields, "sha256": record}
    (model_dir / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")


_CHUNK = 1 << 23  # files are hashed in pieces this size, each while it is still in cache


def _read_hashed(path: Path, keep: bool) -> tuple[bytearray | None, str]:
    """A file's sha256, and its bytes when `keep` (read and hashed in one pass)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            data = bytearray(os.fstat(f.fileno()).st_size) if keep else bytearray(_CHUNK)
            view, pos = memoryview(data), 0
            while n := f.readinto(view[pos : pos + _CHUNK] if keep else view):
                h.update(view[pos : pos + n])
                pos += n if keep else 0
            view.release()
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from e
    return (data[:pos] if keep and pos != len(data) else data) if keep else None, h.hexdigest()


def _sha256(path: Path) -> str:
    return _read_hashed(path, keep=False)[1]


_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}  # what facert's weights may hold


def _stream_hashed(path: Path, take: Callable[[TensorStream], object]) -> tuple[object, str]:
    """What `take` makes of a safetensors file's tensors, streamed to it (see _tensors), and the
    file's sha256. A damaged file, or one without the tensors `take` needs, is a
    ModelFileError."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            tensors = _tensors(f, h, path)
            try:
                made = take(tensors)
            except ValueError as e:  # the consumer's: a tensor it needs is missing or misshapen
                raise ModelFileError(
                    f"{path} does not hold this model's weights ({e}); restore it or convert "
                    "the model again"
                ) from e
            for _ in tensors:  # what `take` left unread is hashed all the same
                pass
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from e
    return made, h.hexdigest()


def _tensors(f: io.RawIOBase, h: hashlib._Hash, path: Path) -> TensorStream:
    """A safetensors file's tensors in the order of their data, read from `f` in blocks of up
    to _CHUNK bytes (or one row), each a view of one buffer reused for the next, and hashed into
    `h` (then the rest of the file): a block on a thread of its own while the consumer takes it,
    so that hashing and packing share the cores."""
    hashed = None  # the hashing of the last bytes read (every earlier one is done)

    def read(buffer: bytearray | np.ndarray) -> int:
        nonlocal hashed
        if hashed is not None:
            hashed.result()  # the buffer is free again
        n = _fill(f, buffer)
        hashed = hashing.submit(h.update, buffer)
        return n

    try:
        with ThreadPoolExecutor(1) as hashing:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError("shorter than a header")
            read(head := bytearray(8))
            length = int.from_bytes(head, "little")
            if length > size - 8:
                raise ValueError("header longer than the file")
            read(header := bytearray(length))
            entries = _entries(header, size - 8 - length)
            # bytes per row of each tensor (a scalar: one row; an empty tensor: none)
            row_bytes = [(e - b) // (shape[0] if shape else 1) if e > b else 0
                         for _, _, shape, b, e in entries]  # fmt: skip
            scratch = np.empty(max([_CHUNK, *row_bytes]), np.uint8)
            at = 0  # in the data, after the header
            for (key, dtype, shape, begin, end), row in zip(entries, row_bytes):
                while at < begin:  # bytes no tensor holds: hashed, skipped
                    at += read(scratch[: min(begin - at, len(scratch))])
                rows = shape[0] if shape else 1
                per = max(1, len(scratch) // row) if row else max(1, rows)  # rows per block
                for first in range(0, max(1, rows), per):
                    n = min(per, rows - first)
                    read(scratch[: n * row])
                    block = scratch[: n * row].view(dtype)
                    block = block.reshape((n, *shape[1:]) if shape else ())
                    yield key, tuple(shape), first, block.astype(np.float32, copy=False)
                at = end
            hashed.result()
            while n := f.readinto(scratch):  # past the last tensor: hashed all the same
                h.update(scratch[:n])
    except (ValueError, TypeError, KeyError) as e:  # truncated, or a damaged header
        raise ModelFileError(
            f"{path} is corrupt or not a float32/float16 safetensors file ({e}); restore it "
            "or convert the model again"
        ) from e


def _fill(f: io.RawIOBase, buffer: bytearray | np.ndarray) -> int:
    """Read exactly len(buffer) bytes into `buffer`; returns how many."""
    view, at = memoryview(buffer), 0
    while at < len(view):
        n = f.readinto(view[at : at + _CHUNK])
        if not n:
            raise ValueError("data outside the file")
        at += n
    return at


def load_weights(source: str | Path | bytearray, name: str = "") -> dict[str, np.ndarray]:
    """A safetensors file, or its bytes (named `name` in errors) -> float32 arrays by name
    (float16 files are widened exactly). Arrays from bytes are views into them (no copy)."""
    path = name or source
    if not isinstance(source, bytearray):
        try:
            with open(source, "rb", buffering=0) as f:
                source = bytearray(f.readall())
        except OSError as e:
            raise ModelFileError(f"cannot read {path}: {e.strerror}") from e
    try:
        weights = _safetensors(source)
    except (ValueError, TypeError, KeyError) as e:  # truncated, or a damaged header
        raise ModelFileError(
            f"{path} is corrupt or not a float32/float16 safetensors file ({e}); restore it "
            "or convert the model again"
        ) from e
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in weights.items()}


def _safetensors(data: bytearray) -> dict[str, np.ndarray]:
    """Parse the safetensors format (8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the tensors' bytes); see _entries."""
    if len(data) < 8:
        raise ValueError("shorter than a header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header longer than the file")
    body = memoryview(data)[8 + size :]
    entries = _entries(data[8 : 8 + size], len(body))
    return {k: np.frombuffer(body[b:e], dtype).reshape(shape) for k, dtype, shape, b, e in entries}


def _entries(header: bytes | bytearray, body: int) -> list[tuple[str, np.dtype, list, int, int]]:
    """A safetensors header's tensors as (name, dtype, shape, begin, end) in the order of their
    data, each checked to lie inside the `body` bytes after the header, to match its shape and
    to overlap no other, so a hostile header cannot read out of bounds."""
    header = json.loads(bytes(header))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
            raise ValueError(f"{key}: bad shape or offsets")
        count = math.prod(shape)
        if not begin <= end <= body or end - begin != count * dtype.itemsize:
            raise ValueError(f"{key}: data outside the file or of the wrong size")
        out.append((key, dtype, shape, begin, end))
    out.sort(key=lambda e: e[3:])
    for (before, *_, last), (key, _, _, begin, _) in zip(out, out[1:]):
        if begin < last:
            raise ValueError(f"{key}: data overlapping {before}'s")
    return out
