"""`facert build`: TensorRT engines from the TensorRT-ready ONNX graphs (tensorrt_graphs.py).

An engine runs only on the GPU model and TensorRT version it was built with, so engines live in
MODEL/tensorrt/<key>/, the key naming the GPU (name and compute capability), the TensorRT
version, the precision and the sha256 of the exact graphs built (`engine_key`). A directory
whose manifest names another GPU, TensorRT or graphs is refused with the command that rebuilds
it (`check_engine`).

Shapes: TensorRT tunes kernels per optimization profile (min, opt, max shape of each input).
Batches come in buckets 1, 2, 4, 8, ... up to --max-batch (the last bucket is --max-batch
itself); each bucket is one profile covering the batches above the previous one, tuned for its
largest. Prefill prompts come in length buckets the same way (16, 32, ... up to the longest
prompt), one profile per (batch bucket, length bucket). The KV cache's capacity is fixed.

Precision is in the graphs (fp16 tensors, int8 weights behind DequantizeLinear), and networks
are created strongly typed: TensorRT 11 has no other kind, and in 10.x the flag makes it obey
the graph's types instead of choosing per layer. So no FP16/INT8 builder flag is set.

Everything here but `build_engines`' calls into TensorRT is plain Python and is unit-tested;
whether TensorRT is there is asked in one place (`require_tensorrt`), which names JetPack/the
wheel when it is missing; the functions that call TensorRT then import it by name, so mypy checks
every call against tensorrt-stubs (tests/test_tensorrt_typecheck.py) and tests put a stand-in in
sys.modules. The build itself is written against TensorRT 10's documented Python API and has not
run on hardware in this project yet.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facert.runtime.config import ModelConfig
from facert.runtime.errors import FacertError, InvalidArgument

from .tensorrt_graphs import GRAPHS, PRECISIONS

if TYPE_CHECKING:
    import tensorrt

ENGINE_FORMAT = 1
MANIFEST = "manifest.json"
TIMING_CACHE = "timing.cache"  # beside the engine directories: reused by every rebuild
SMALLEST_PREFILL_BUCKET = 16
Shape = tuple[int, ...]


def require_tensorrt() -> str:
    """The version of the TensorRT importable here, or a FacertError saying how to get it."""
    how = (
        "TensorRT 10 or later with its Python bindings: on a Jetson, JetPack 6.1 or later (it "
        "ships TensorRT 10.3; `sudo apt install python3-libnvinfer`); elsewhere `pip install "
        "tensorrt` on a machine with an NVIDIA GPU and driver"
    )
    try:
        import tensorrt
    except ImportError as e:
        raise FacertError(f"TensorRT engines need {how}") from e
    version = getattr(tensorrt, "__version__", None)
    if version is None:  # a namespace package, such as the folder tensorrt-stubs installs
        raise FacertError(f"TensorRT engines need {how} (the tensorrt here has no version)")
    major = re.match(r"\d+", str(version))
    if major is None or int(major[0]) < 10:
        raise FacertError(f"TensorRT {version} is too old: TensorRT engines need {how}")
    return str(version)


# ----------------------------------------------------------------------------- cache keys


@dataclass(frozen=True)
class BuildTarget:
    """What an engine is bound to: it runs only where all of these are the same."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    precision: str
    graphs_sha256: str


def engine_key(target: BuildTarget) -> str:
    """A directory name for a target, readable and unique: GPU, SM, TensorRT version,
    precision, and a digest of all five fields (so two GPUs whose names slug alike differ)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", target.gpu_name.lower()).strip("-") or "gpu"
    major, minor = target.compute_capability
    trt = re.sub(r"[^0-9.]+", "", target.tensorrt_version) or "unknown"
    digest = hashlib.sha256(json.dumps(asdict(target), sort_keys=True).encode()).hexdigest()
    return f"{gpu[:40]}-sm{major}{minor}-trt{trt}-{target.precision}-{digest[:12]}"


def rebuild_command(model_dir: str | Path, precision: str, max_batch: int) -> str:
    return f"facert build -m {model_dir} --precision {precision} --max-batch {max_batch}"


def check_engine(manifest: dict, target: BuildTarget, model_dir: str | Path) -> None:
    """Refuse an engine directory built for another target, naming what differs and the
    command that rebuilds it here."""
    built = manifest.get("target") or {}
    wanted = asdict(target)
    wanted["compute_capability"] = list(target.compute_capability)
    differs = [
        f"{field} {built.get(field)!r} (here {value!r})"
        for field, value in wanted.items()
        if built.get(field) != value
    ]
    if manifest.get("format") != ENGINE_FORMAT:
        differs.append(f"format {manifest.get('format')!r} (here {ENGINE_FORMAT})")
    if differs:
        max_batch = int(manifest.get("max_batch", 16))
        raise FacertError(
            "these TensorRT engines were built for another target: "
            + ", ".join(differs)
            + f"; rebuild them here with: {rebuild_command(model_dir, target.precision, max_batch)}"
        )


def current_target(precision: str, graphs_sha256: str) -> BuildTarget:
    """This machine's target: GPU 0 (through torch or cuda-python) and the TensorRT imported."""
    version = require_tensorrt()
    name, capability = gpu_identity()
    return BuildTarget(name, capability, version, precision, graphs_sha256)


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device 0, from torch when it has CUDA, else cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), (major, minor)
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise FacertError(
                "cannot identify the GPU: install cuda-python (`pip install cuda-python`) or a "
                "CUDA build of PyTorch"
            ) from e
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise FacertError(f"no CUDA device 0 (cudaGetDeviceProperties: {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\0"), (int(props.major), int(props.minor))


# ----------------------------------------------------------------------------- profiles


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """smallest, 2*smallest, 4*smallest, ... below `largest`, then `largest` itself."""
    if largest < 1 or smallest < 1:
        raise InvalidArgument(f"bucket bounds must be positive, not {smallest}..{largest}")
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= 2
    return [*out, largest]


def _ranges(largest: int, smallest: int = 1) -> list[tuple[int, int]]:
    """Each bucket as (first, last): the sizes above the previous bucket, up to this one."""
    bs = buckets(largest, smallest)
    return [(prev + 1, b) for prev, b in zip([0, *bs[:-1]], bs)]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def covers(self, shapes: dict[str, Shape]) -> bool:
        return all(
            all(lo <= s <= hi for lo, s, hi in zip(self.shapes[n][0], shape, self.shapes[n][2]))
            for n, shape in shapes.items()
        )


def plan_profiles(
    config: ModelConfig, max_batch: int, max_prompt: int, capacity: int, max_images: int = 4
) -> dict[str, list[Profile]]:
    """The optimization profiles of every graph (see the module docstring)."""
    lm, vq = config.lm, config.vqgan
    if not 1 <= max_prompt <= capacity:
        raise InvalidArgument(
            f"max_prompt must be in 1..{capacity} (the KV cache), not {max_prompt}"
        )
    batches = _ranges(max_batch)
    lengths = _ranges(max_prompt, min(SMALLEST_PREFILL_BUCKET, max_prompt))

    def same(names, lo: Shape, hi: Shape) -> dict[str, tuple[Shape, Shape, Shape]]:
        return {n: (lo, hi, hi) for n in names}

    prefill = [
        Profile(same(("input_ids", "segment_ids"), (b0, t0), (b1, t1)))
        for b0, b1 in batches
        for t0, t1 in lengths
    ]
    cache = [f"past_{kv}_{i}" for i in range(lm.n_layer) for kv in ("key", "value")]
    decode = [
        Profile(
            {
                **same(("input_ids", "position_ids"), (b0, 1), (b1, 1)),
                **same(
                    cache,
                    (b0, lm.n_head, capacity, lm.head_dim),
                    (b1, lm.n_head, capacity, lm.head_dim),
                ),
            }
        )
        for b0, b1 in batches
    ]
    head = [Profile(same(("hidden",), (b0, lm.n_embd), (b1, lm.n_embd))) for b0, b1 in batches]
    image = (vq.in_channels, vq.resolution, vq.resolution)
    return {
        "lm_prefill": prefill,
        "lm_decode": decode,
        "head_text": head,
        "head_image": head,
        "vqgan_encoder": [Profile(same(("images",), (1, *image), (max_images, *image)))],
        "vqgan_decoder": [
            Profile(
                same(("codes",), (1, vq.num_codes_per_image), (max_images, vq.num_codes_per_image))
            )
        ],
    }


def pick_profile(profiles: list[Profile], shapes: dict[str, Shape]) -> int:
    """The index of the first profile covering these input shapes (a runtime's choice)."""
    for i, p in enumerate(profiles):
        if p.covers(shapes):
            return i
    raise InvalidArgument(f"no optimization profile covers {shapes}: rebuild with a larger limit")


# ----------------------------------------------------------------------------- build


def build_engines(
    onnx_dir: str | Path,
    engines_root: str | Path,
    config: ModelConfig,
    model_dir: str | Path,
    max_batch: int = 16,
    max_prompt: int | None = None,
    max_images: int = 4,
    workspace_bytes: int = 1 << 30,
    progress: Callable[[str], None] | None = None,
    plugins: bool = False,
) -> dict:
    """Build one engine per graph of a TensorRT-ready ONNX directory (tensorrt_graphs.export_
    tensorrt) into engines_root/<engine_key>/, reusing engines_root/timing.cache; returns the
    manifest. `plugins`: register facert's Triton kernels as TensorRT plugins first
    (tensorrt_plugins.py; no graph calls them yet, so the engines are the same)."""
    onnx_dir, engines_root = Path(onnx_dir), Path(engines_root)
    source = json.loads((onnx_dir / MANIFEST).read_text())
    precision = source["precision"]
    if precision not in PRECISIONS:
        raise InvalidArgument(f"{onnx_dir} holds {precision!r} graphs, not TensorRT-ready ones")
    target = current_target(precision, source["graphs_sha256"])  # asks for TensorRT first
    import tensorrt as trt

    registered: list[str] = []
    if plugins:
        from .tensorrt_plugins import register_plugins

        registered = register_plugins(target.compute_capability)
    capacity = min(config.lm.seq_length, config.lm.max_positions)
    max_prompt = max_prompt or capacity
    profiles = plan_profiles(config, max_batch, max_prompt, capacity, max_images)
    out = engines_root / engine_key(target)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = engines_root / TIMING_CACHE
    logger = trt.Logger(trt.Logger.WARNING)
    files = {}
    for name in GRAPHS:
        if progress:
            progress(f"building {name} ({len(profiles[name])} profiles)")
        plan = _build_one(
            logger, onnx_dir / f"{name}.onnx", profiles[name], cache_path, workspace_bytes
        )
        path = out / f"{name}.engine"
        _write_atomic(path, plan)
        files[path.name] = hashlib.sha256(plan).hexdigest()
    target_fields = asdict(target)
    manifest = {
        "format": ENGINE_FORMAT,
        "target": {**target_fields, "compute_capability": list(target.compute_capability)},
        "key": out.name,
        "max_batch": max_batch,
        "max_prompt": max_prompt,
        "max_images": max_images,
        "capacity": capacity,
        "source_model_sha256": source["source_model_sha256"],
        "profiles": {
            n: [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in ps]
            for n, ps in profiles.items()
        },
        "files": files,
        "plugins": registered,
        "rebuild": rebuild_command(model_dir, precision, max_batch),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _build_one(
    logger: tensorrt.ILogger,
    onnx_path: Path,
    profiles: list[Profile],
    cache_path: Path,
    workspace_bytes: int,
) -> bytes:
    import tensorrt as trt

    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external weights beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FacertError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, False)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)
    plan: tensorrt.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:  # what TensorRT returns on failure, though its stubs do not say so
        raise FacertError(f"TensorRT could not build {onnx_path.name} (see its log above)")
    _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ----------------------------------------------------------------------------- entry points


def build(
    model_dir: str | Path,
    precision: str = "fp16",
    max_batch: int = 16,
    max_prompt: int | None = None,
    max_images: int = 4,
    engines_root: str | Path | None = None,
    workspace_bytes: int = 1 << 30,
    progress: Callable[[str], None] | None = None,
    plugins: bool = False,
) -> dict:
    """`facert build`: export the TensorRT-ready graphs (kept in ROOT/onnx-PRECISION while
    they match the model) and build their engines into ROOT/<key>/; ROOT is MODEL/tensorrt
    unless `engines_root` says otherwise. Returns the engines' manifest."""
    from facert.runtime.config import load_config

    from .tensorrt_graphs import export_tensorrt

    if precision not in PRECISIONS:
        raise InvalidArgument(
            f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    if max_batch < 1:
        raise InvalidArgument(f"max_batch must be at least 1, not {max_batch}")
    require_tensorrt()  # before minutes of export, say what is missing
    model_dir = Path(model_dir)
    root = Path(engines_root) if engines_root else model_dir / "tensorrt"
    onnx_dir = root / f"onnx-{precision}"
    if current_graphs(onnx_dir, model_dir) is None:
        if progress:
            progress(f"exporting TensorRT-ready {precision} graphs")
        export_tensorrt(model_dir, onnx_dir, precision)
    return build_engines(
        onnx_dir,
        root,
        load_config(model_dir),
        model_dir,
        max_batch,
        max_prompt,
        max_images,
        workspace_bytes,
        progress,
        plugins,
    )


def current_graphs(onnx_dir: Path, model_dir: Path) -> dict | None:
    """The manifest of a TensorRT-ready ONNX directory exported from this model, else None."""
    from facert.runtime.config import model_hash

    from .tensorrt_graphs import FORMAT

    try:
        manifest = json.loads((onnx_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    fresh = manifest.get("format") == FORMAT and manifest.get("target") == "tensorrt"
    return (
        manifest if fresh and manifest.get("source_model_sha256") == model_hash(model_dir) else None
    )


def find_engines(
    model_dir: str | Path,
    precision: str,
    engines_root: str | Path | None = None,
) -> tuple[Path, dict]:
    """The engine directory built for this machine (GPU, TensorRT, precision, graphs) and its
    manifest; a FacertError with the rebuild command when there is none or it does not match."""
    model_dir = Path(model_dir)
    root = Path(engines_root) if engines_root else model_dir / "tensorrt"
    graphs = current_graphs(root / f"onnx-{precision}", model_dir)
    if graphs is None:
        raise FacertError(
            f"no TensorRT engines for {model_dir} at {precision} (or the model changed since they "
            f"were built): build them with: {rebuild_command(model_dir, precision, 16)}"
        )
    target = current_target(precision, graphs["graphs_sha256"])
    engine_dir = root / engine_key(target)
    try:
        manifest = json.loads((engine_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        others = (
            sorted(
                p.name
                for p in root.iterdir()
                if (p / MANIFEST).is_file() and not p.name.startswith("onnx-")
            )
            if root.is_dir()
            else []
        )
        built = f" (built here for: {', '.join(others)})" if others else ""
        raise FacertError(
            f"no TensorRT engines for this GPU and TensorRT ({engine_dir.name}){built}: build them "
            f"with: {rebuild_command(model_dir, precision, 16)}"
        ) from None
    check_engine(manifest, target, model_dir)
    return engine_dir, manifest
