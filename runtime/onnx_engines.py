"""Where a model's exported ONNX graphs live, exporting them on first use, and reading them back.

Looked up in order: an engine directory the caller names (used as is, or refused if stale),
MODEL_DIR/onnx/PRECISION, then the user cache ($FACERT_CACHE or ~/.cache/facert). If none is
current, the graphs are exported into the first writable of the last two, with a progress bar.

Several processes may share these places (server workers, a CLI run beside a server):
- an export is built in a temporary sibling directory, synced, and renamed into place (the old
  directory renamed aside first, then removed), so no reader ever sees half a directory;
- it runs under an advisory lock (flock on `.NAME.lock` beside the directory), so a second
  process waits for the first and then uses its result; the kernel drops a dead process's lock;
- a reader opens the files through the directory's own descriptor, so it reads one directory
  to the end, or sees that it was replaced while it read and reads the new one.

manifest.json holds the sha256 of every other file. The loader hashes each file as it reads it
into memory and hands ONNX Runtime those bytes, so checking costs no second read. A directory
that fails is re-exported (with a warning) when it was found automatically, and refused with
the command that fixes it when the caller named it.

This module imports neither onnx nor torch: loading a current engine needs neither (importing
onnx alone took 0.6 s of the bundled model's 0.8 s load).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import model_hash
from .errors import InvalidArgument, ModelFileError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# 2: int8 weights in 7 bits; 3: the sha256 of every file in the manifest; 4: a weights file per
# group of graphs, so a backend reads only the weights of the graphs it loads
ENGINE_FORMAT = 4
MANIFEST = "manifest.json"
LM_GRAPHS = ("lm_prefill", "lm_decode", "head_text", "head_image")  # share the LM's weights
_CHUNK = 1 << 23  # files are hashed in pieces this size, each while it is still in cache
# what the loader and `facert info` read from a manifest, with its JSON type
_MANIFEST_FIELDS = {
    "precision": str, "opset": int, "onnx_version": str, "onnxruntime_version": str,
    "source_model_sha256": str, "kv_cache": str, "fused_ops": dict, "graphs": dict, "files": dict,
}  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("FACERT_CACHE") or Path.home() / ".cache" / "facert")


@dataclass(frozen=True)
class EngineFiles:
    """An engine directory read into memory, every file matching its sha256 in the manifest."""

    dir: Path
    manifest: dict
    contents: dict[str, bytearray]

    def graph(self, name: str) -> bytes:
        """A graph's protobuf (small: its weights are in its weights file), as ONNX Runtime
        takes it."""
        return bytes(self.contents[self.manifest["graphs"][name]["file"]])

    def weights(self) -> dict[str, bytearray]:
        """The weights files read (those of the graphs read), by the name graphs refer to."""
        names = {self.manifest["graphs"][g]["weights"] for g in self.graphs}
        return {n: self.contents[n] for n in sorted(names)}

    @property
    def graphs(self) -> list[str]:
        """The graphs read."""
        return [g for g, e in self.manifest["graphs"].items() if e["file"] in self.contents]


def weights_file(graph: str) -> str:
    """The weights file a graph's large initializers live in: one for the LM's graphs (they
    hold the same layers), one per other graph (each VQGAN half is loaded on its own)."""
    return "lm_weights.bin" if graph in LM_GRAPHS else f"{graph}_weights.bin"


@dataclass(frozen=True)
class _Origin:
    """How resolve_engine found a directory: read_engine re-exports a corrupt one only if it was
    found automatically (`source` is then the model's hash)."""

    model_dir: Path
    precision: str
    progress: bool
    source: str | None


# create_backend hands the backend only the directory; this remembers how each was found.
_origins: dict[Path, _Origin] = {}


def _refusal(engine_dir: Path, origin: _Origin | None, why: str) -> str:
    model, precision = (origin.model_dir, origin.precision) if origin else ("MODEL", "PRECISION")
    return (
        f"engine directory {engine_dir} cannot be used: {why}. Re-export it with "
        f"`facert export {model} -o {engine_dir} --precision {precision}`"
    )


def resolve_engine(
    model_dir: Path,
    precision: str,
    engine_dir: Path | None = None,
    progress: bool = True,
    source_hash: str | None = None,
) -> Path:
    """The engine directory to load, exported first if need be. Cheap when one is current: it
    reads manifests, not graphs (read_engine checks those as it loads them). `source_hash`: the
    model's hash, if the caller has it already (computing it reads every model file)."""
    model_dir = Path(model_dir)
    source_hash = source_hash or model_hash(model_dir)
    if engine_dir is not None:
        engine_dir = Path(engine_dir)
        origin = _Origin(model_dir, precision, progress, source=None)
        why = staleness(engine_dir, model_dir, precision, source_hash)
        if why:
            raise ModelFileError(_refusal(engine_dir, origin, why))
        _origins[engine_dir] = origin
        return engine_dir
    origin = _Origin(model_dir, precision, progress, source=source_hash)
    current = (
        c for c in _candidates(origin) if not staleness(c, model_dir, precision, origin.source)
    )
    found = next(current, None) or _export(origin)
    _origins[found] = origin
    return found


def read_engine(engine_dir: str | Path, graphs: tuple[str, ...] | None = None) -> EngineFiles:
    """Read an engine directory from resolve_engine into memory (only `graphs` and their
    weights, or every file), checking each file's sha256. One that fails is re-exported if it
    was found automatically, else refused."""
    engine_dir = Path(engine_dir)
    origin = _origins.get(engine_dir)
    try:
        return _read_verified(engine_dir, graphs)
    except ModelFileError as e:
        if origin is None or origin.source is None:
            raise ModelFileError(_refusal(engine_dir, origin, str(e))) from e
        print(f"facert: warning: {e}; re-exporting", file=sys.stderr)
        target = _export(origin, bad=(str(e), _dir_id(engine_dir)))
    _origins[target] = origin
    return _read_verified(target, graphs)


def _candidates(origin: _Origin) -> list[Path]:
    return [
        origin.model_dir / "onnx" / origin.precision,
        cache_root() / "onnx" / origin.source[:16] / origin.precision,
    ]


def _writable(path: Path) -> bool:
    """Whether `path` can be created or replaced: its nearest existing parent is a directory we
    may write ($FACERT_CACHE may name a file, or a read-only place)."""
    parent = next((p for p in path.parents if p.exists()), None)
    return parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def _export(origin: _Origin, bad: tuple[str, tuple | None] | None = None) -> Path:
    """Export into the first writable candidate, unless another process has just done so.
    `bad`: why a directory failed its checksums, and its identity, so that the same directory
    is replaced but a fresh one written meanwhile by another process is kept."""
    from tqdm import tqdm

    from facert.export.onnx_export import export_engine

    candidates = _candidates(origin)
    target = next((c for c in candidates if _writable(c)), None)
    if target is None:
        raise InvalidArgument(
            f"no writable place to export ONNX graphs (tried {', '.join(map(str, candidates))}); "
            "set FACERT_CACHE to a writable directory"
        )

    def needed() -> str | None:
        if bad is not None and bad[1] is not None and _dir_id(target) == bad[1]:
            return bad[0]
        return staleness(target, origin.model_dir, origin.precision, origin.source)

    desc = f"exporting ONNX ({origin.precision})"
    with tqdm(desc=desc, file=sys.stderr, disable=not origin.progress) as bar:
        export_engine(
            origin.model_dir, target, origin.precision,
            progress=lambda step: (bar.set_postfix_str(step), bar.update()), needed=needed,
        )  # fmt: skip
    return target


def _parse_manifest(raw: bytes, engine_dir: Path) -> dict:
    """A manifest's bytes -> dict, checked for everything this facert reads from it."""
    path = engine_dir / MANIFEST
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ModelFileError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    if manifest.get("format") != ENGINE_FORMAT:
        raise ModelFileError(
            f"{path} was written by another facert export format ({manifest.get('format')}; "
            f"this facert reads {ENGINE_FORMAT})"
        )
    wrong = [k for k, t in _MANIFEST_FIELDS.items() if not isinstance(manifest.get(k), t)]
    files = manifest.get("files", {})
    if not wrong and not (
        all(_plain_name(f) and _is_sha256(d) for f, d in files.items())
        and all(
            isinstance(g, dict) and g.get("file") in files and g.get("weights") in files
            for g in manifest["graphs"].values()
        )
    ):
        wrong = ["files or graphs"]
    if wrong:
        raise ModelFileError(f"{path} is malformed (bad or missing {', '.join(wrong)})")
    return manifest


def _plain_name(name: str) -> bool:
    """A file name inside the directory: a manifest must not point anywhere else."""
    return name not in ("", ".", "..") and Path(name).name == name


def _is_sha256(digest: object) -> bool:
    return isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")


def read_manifest(engine_dir: str | Path) -> dict:
    engine_dir = Path(engine_dir)
    try:
        raw = (engine_dir / MANIFEST).read_bytes()
    except OSError as e:
        raise ModelFileError(
            f"{engine_dir} is not an exported engine directory (no readable {MANIFEST})"
        ) from e
    return _parse_manifest(raw, engine_dir)


def staleness(
    engine_dir: str | Path, model_dir: str | Path, precision: str, source_hash: str | None = None
) -> str | None:
    """Why an engine directory cannot serve this model at this precision, or None if it can.
    `source_hash`: the model's hash, if the caller has it already (it reads every weight)."""
    try:
        manifest = read_manifest(engine_dir)
    except ModelFileError as e:
        return str(e)
    if manifest["precision"] != precision:
        return f"it holds {manifest['precision']} graphs, not {precision}"
    if manifest["source_model_sha256"] != (source_hash or model_hash(model_dir)):
        return "the model directory changed since it was exported"
    missing = [f for f in manifest["files"] if not (Path(engine_dir) / f).is_file()]
    if missing:
        return f"files are missing: {', '.join(missing)}"
    return None


def _dir_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_verified(engine_dir: Path, graphs: tuple[str, ...] | None) -> EngineFiles:
    """The files of `graphs` (None: every file) read once, hashed as they are read. If a check
    fails because a concurrent export replaced the directory while we read it, the new one is
    read instead."""
    for _ in range(3):
        try:
            dir_fd = os.open(engine_dir, os.O_RDONLY)
        except OSError as e:
            raise ModelFileError(f"cannot open engine directory {engine_dir}: {e.strerror}") from e
        try:
            manifest = _parse_manifest(_read(dir_fd, MANIFEST, engine_dir)[0], engine_dir)
            listed = manifest["graphs"]
            missing = [g for g in graphs or () if g not in listed]
            if missing:
                raise ModelFileError(f"{engine_dir / MANIFEST} lists no {', '.join(missing)} graph")
            names = [listed[g][f] for g in graphs for f in ("file", "weights")] if graphs else None
            contents = {}
            for name, want in manifest["files"].items():
                if names is not None and name not in names:
                    continue
                contents[name], digest = _read(dir_fd, name, engine_dir)
                if digest != want:
                    raise ModelFileError(
                        f"{engine_dir / name} does not match its sha256 in {MANIFEST} "
                        "(corrupt or modified)"
                    )
            return EngineFiles(engine_dir, manifest, contents)
        except ModelFileError:
            st = os.fstat(dir_fd)
            if _dir_id(engine_dir) == (st.st_dev, st.st_ino):
                raise  # still the directory we read: it really is broken
        finally:
            os.close(dir_fd)
    raise ModelFileError(f"engine directory {engine_dir} kept changing while it was read")


def _read(dir_fd: int, name: str, engine_dir: Path) -> tuple[bytearray, str]:
    """A file's bytes and sha256, in one pass (each chunk is hashed while still in cache)."""
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except OSError as e:
        raise ModelFileError(f"cannot read {engine_dir / name}: {e.strerror}") from e
    with open(fd, "rb", buffering=0) as f:
        data = bytearray(os.fstat(fd).st_size)
        view, h, pos = memoryview(data), hashlib.sha256(), 0
        while pos < len(data) and (n := f.readinto(view[pos : pos + _CHUNK])):
            h.update(view[pos : pos + n])
            pos += n
        view.release()
    return data, h.hexdigest()


def check_writable(out_dir: Path) -> None:
    """Create `out_dir`'s parent (where its lock and temporary directory go), or say why not."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot write the engine directory {out_dir}: {e.strerror}") from e
    if not _writable(out_dir):
        raise InvalidArgument(f"cannot write the engine directory {out_dir}: permission denied")
