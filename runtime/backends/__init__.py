"""Backends execute graphs; they hold no scheduling logic. Every backend has the same interface
(`Backend`), so engines, tasks and tests do not care which one runs."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import FacertError
from .base import Backend

BACKENDS = ("onnxruntime", "torch")


def create_backend(
    name: str,
    model_dir: Path,
    config: ModelConfig,
    precision: str = "fp32",
    engine_dir: Path | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> Backend:
    """Instantiate a backend by name; heavy imports (torch, onnxruntime) happen only here.
    `precision`, `engine_dir`, `providers` and `threads` are ONNX Runtime settings."""
    if name == "onnxruntime":
        from ..onnx_engines import resolve_engine
        from .onnxruntime_backend import OnnxRuntimeBackend

        engine = resolve_engine(model_dir, precision, engine_dir, progress)
        return OnnxRuntimeBackend(engine, config, providers=providers, threads=threads)
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as e:
            raise FacertError("the torch backend needs PyTorch: pip install 'facert[torch]'") from e
        return TorchBackend(model_dir, config)
    raise FacertError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
