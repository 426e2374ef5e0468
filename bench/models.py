"""What a benchmark runs on: models (the random base-shape model, the bundled model when there is
one, or a model directory) and facert configurations (BACKEND:PRECISION)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from facert.export.onnx_export import PRECISIONS
from facert.runtime.backends import BACKENDS, DECODE_CHOICES
from facert.runtime.config import load_config
from facert.runtime.errors import FacertError
from facert.runtime.onnx_engines import cache_root

from .base_model import make_base_model


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path


def resolve_models(spec: str) -> tuple[list[BenchModel], list[dict]]:
    """'base', 'bundled' or model directories, comma-separated -> (models, skipped with why)."""
    models, skipped = [], []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "base":
            models.append(BenchModel("base-random", make_base_model(cache_root() / "base-random")))
        elif item == "bundled":
            try:
                import facert

                models.append(BenchModel("bundled", Path(facert.load(progress=False).model_dir)))
            except Exception as e:  # whatever load() raises, there is no bundled model to time
                why = f"facert.load() with no path raised {type(e).__name__}: {e}"
                skipped.append({"model": "bundled", "reason": why})
        else:
            load_config(item)  # a clear FacertError if it is not a model directory
            models.append(BenchModel(Path(item).name, Path(item)))
    if not models:
        reasons = "; ".join(s["reason"] for s in skipped)
        raise FacertError(f"no model to benchmark ({reasons or 'none named'})")
    return models, skipped


def parse_configs(spec: str, with_decode: bool = False) -> list[tuple[str, ...]]:
    """'onnxruntime:int8,torch:fp32' -> [(backend, precision), ...], checked; with_decode also
    takes a third part, the decode path ('onnxruntime:fp32:graph')."""
    form = "BACKEND:PRECISION[:DECODE]" if with_decode else "BACKEND:PRECISION"
    configs = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        parts = tuple(item.split(":"))
        decode_ok = (
            len(parts) == 2 or with_decode and len(parts) == 3 and parts[2] in DECODE_CHOICES
        )
        if not decode_ok or parts[0] not in BACKENDS or parts[1] not in PRECISIONS + ("bf16",):
            raise FacertError(
                f"config {item!r} is not {form} with BACKEND in {', '.join(BACKENDS)}, "
                f"PRECISION in {', '.join(PRECISIONS)} (or bf16 on cuda)"
                + (f" and DECODE in {', '.join(DECODE_CHOICES)}" if with_decode else "")
            )
        runs = _precisions(parts[0])
        if parts[1] not in runs:
            raise FacertError(f"the {parts[0]} backend runs {', '.join(runs)}, not {parts[1]}")
        configs.append(parts)
    if not configs:
        raise FacertError("no facert configuration given")
    return configs


def _precisions(backend: str) -> tuple[str, ...]:
    if backend == "cuda":
        from facert.runtime.backends.cuda_backend import PRECISIONS as CUDA_PRECISIONS

        return CUDA_PRECISIONS
    return ("fp32",) if backend == "torch" else PRECISIONS


def label(config: tuple[str, str]) -> str:
    return f"facert {config[0]} {config[1]}"
